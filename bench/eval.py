"""How much time does `doctune eval` spend outside model calls?

500 eval items (by default) × 2 candidates — the tiny model in-process, with and without a LoRA adapter — and a
judge on loopback (tests/support/fake_openai.py: an OpenAI-compatible server answering valid verdicts at once),
score mode plus the pairwise judge (both orders). In one run it times:

  baseline      the same model calls with nothing else: every candidate answers every question, the judge
                grades every answer and compares every pair, all gathered at once (no cache, no metrics)
  eval (cold)   `doctune eval` with an empty cache: answers, metrics (ROUGE, F1, MiniLM similarity),
                judge, bootstrap CIs, report.md and report.html
  eval (warm)   the same stage again: every request answered from cache.sqlite, so what is left is the
                stage's own work (metrics, statistics, reports)
  --no-similarity  cold, without the MiniLM similarity (22M parameters: a hundred times the tiny model)

For the eval runs it measures the wall time while at least one model call is in flight (candidates or
judge, any backend): the rest is time spent outside model calls, split into model loading (preflight) and
everything else. Target: under 5% of wall time outside model calls (cold run).

    .venv/bin/python bench/eval.py [--items 500] [--max-tokens 128] [--batch 32]

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


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA with random (non-zero) B matrices, as `doctune finetune` would leave (weights + its info file)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--batch", type=int, default=32, help="hf backend batch size (models.tiny.max_concurrency)"
    )
    args = parser.parse_args()

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    model_dir = WORK / "tiny-model"
    build_tiny_model(model_dir, size="tiny", seed=0)
    adapter = make_adapter(model_dir, WORK / "adapter")
    items = eval_items(args.items)
    (WORK / "eval_set.json").write_text(json.dumps(items), encoding="utf-8")

    with FakeOpenAIServer(reply=judge_reply, models=["judge-model"]) as server:
        tiny = {"backend": "hf", "model": str(model_dir), "max_concurrency": args.batch}
        raw = {
            "run_dir": "run",
            "models": {
                "tiny": tiny,
                "teacher": tiny,
                "student": tiny,
                "judge": {
                    "backend": "openai",
                    "base_url": server.base_url,
                    "model": "judge-model",
                    "api_key_env": None,
                },
            },
            "eval": {
                "eval_set": "eval_set.json",
                "max_tokens": args.max_tokens,
                "candidates": {
                    "finetuned": {"model": "tiny", "adapter": str(adapter)},
                    "base": {"model": "tiny"},
                },
                "pairwise": ["finetuned", "base"],
            },
        }
        cfg = build_config(raw, WORK)
        baseline = asyncio.run(bare_calls(cfg, items, adapter))
        cold = timed_eval(cfg)
        summary_cold = (cfg.run_path / "eval" / "summary.json").read_bytes()
        warm = timed_eval(cfg)
        same = (cfg.run_path / "eval" / "summary.json").read_bytes() == summary_cold
        no_sim_raw = {**raw, "run_dir": "run-no-similarity", "eval": {**raw["eval"], "similarity": False}}
        no_sim = timed_eval(build_config(no_sim_raw, WORK))

    n = args.items
    rows = [
        ("baseline: bare model calls", baseline, None, None),
        ("doctune eval (cold cache)", cold, cold["outside_share"], cold["outside_share_without_loading"]),
        ("doctune eval (warm cache)", warm, warm["outside_share"], warm["outside_share_without_loading"]),
        (
            "eval --no-similarity (cold)",
            no_sim,
            no_sim["outside_share"],
            no_sim["outside_share_without_loading"],
        ),
    ]
    print(
        f"\n{n} items × 2 candidates (tiny model, max_tokens {args.max_tokens}), judge on loopback, pairwise on"
    )
    print(
        f"{'run':<28} {'wall s':>7} {'items/s':>8} {'x base':>7} {'CPU s':>7} {'x base':>7} "
        f"{'outside calls':>14} {'excl. loading':>14}"
    )
    for name, r, share, share_nl in rows:
        fmt = lambda v: f"{v:.1%}" if v is not None else "-"  # noqa: E731
        print(
            f"{name:<28} {r['wall_s']:>7.1f} {n / r['wall_s']:>8.2f} {r['wall_s'] / baseline['wall_s']:>7.2f} "
            f"{r['cpu_s']:>7.1f} {r['cpu_s'] / baseline['cpu_s']:>7.2f} {fmt(share):>14} {fmt(share_nl):>14}"
        )
    print(
        f"cold: {cold['model_calls_s']:.1f} s with a model call in flight, {cold['model_loading_s']:.1f} s loading "
        f"models, {cold['outside_s'] - cold['model_loading_s']:.1f} s other; warm re-run summary identical: {same}"
    )
    print("(2 shared CPU cores; other engineers' jobs load the machine: treat the numbers as noisy)")

    result = {
        "items": n,
        "candidates": 2,
        "max_tokens": args.max_tokens,
        "batch": args.batch,
        "baseline": baseline,
        "eval_cold": cold,
        "eval_warm": warm,
        "eval_no_similarity_cold": no_sim,
        "items_per_s": {
            "baseline": n / baseline["wall_s"],
            "cold": n / cold["wall_s"],
            "warm": n / warm["wall_s"],
            "no_similarity_cold": n / no_sim["wall_s"],
        },
        "ratio_cold_vs_baseline": {
            "wall": cold["wall_s"] / baseline["wall_s"],
            "cpu": cold["cpu_s"] / baseline["cpu_s"],
        },
        "target_outside_share": 0.05,
        "warm_summary_identical": same,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load": os.getloadavg()},
    }
    atomic_write_json(RESULTS, result)
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
