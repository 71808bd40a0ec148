"""generate → curate → eval through an OpenAI-compatible server that fails 30% of the time (429 with
Retry-After, 500, 503, too late, dropped connections, truncated bodies, invalid JSON, wrong shapes, empty
choices): every chunk, pair and item ends in a result or in a failure list with its reason; no request that
was answered is ever sent again, in the run or in a rerun; the stage fails only above max_failure_rate."""

from __future__ import annotations

import json

import pytest
from tests.support.fake_openai import FakeOpenAIServer, FaultPlan

from doctune.config import build_config
from doctune.curate.stage import run as curate
from doctune.errors import FailureRateError
from doctune.evaluate.stage import run as evaluate
from doctune.generate import run as generate
from doctune.runs import atomic_write_jsonl, read_jsonl

FACTS = [
    f"The Lumen relay number {i} listens on port {7300 + i} and keeps {i + 3} snapshots." for i in range(24)
]
EVAL = [{"question": f"Which port does relay {i} use?", "answer": f"Port {7300 + i}."} for i in range(10)]


def reply(request: dict) -> str | dict:
    if request["model"] == "teacher-m":
        fact = request["messages"][-1]["content"]
        return {"pairs": [{"question": f"What is true of this: {fact[:40]}?", "answer": fact}]}
    if request["model"] == "judge-m":
        return {"reason": "Supported by the text.", "score": 5}
    return f"{request['model']} says port 73{len(request['messages'][-1]['content']) % 10}."


def config(tmp_path, url: str, max_failure_rate: float, url_a: str | None = None, url_b: str | None = None):
    remote = {
        "backend": "openai",
        "base_url": url,
        "timeout": 0.5,
        "max_retries": 1,
        "max_concurrency": 16,
    }
    raw = {
        "run_dir": "run",
        "models": {
            "teacher": {**remote, "model": "teacher-m"},
            "judge": {**remote, "model": "judge-m"},
            # both candidates get the same messages: one server each, so per-prompt counts stay per model
            "a": {**remote, "base_url": url_a or url, "model": "answer-a"},
            "b": {**remote, "base_url": url_b or url, "model": "answer-b"},
            "student": {"backend": "hf", "model": "unused"},
        },
        "generate": {"total_questions": len(FACTS), "max_failure_rate": max_failure_rate},
        "curate": {"val_fraction": 0.2, "max_failure_rate": max_failure_rate},
        "eval": {
            "eval_set": "eval.json",
            "similarity": False,
            "candidates": {"a": {"model": "a"}, "b": {"model": "b"}},
            "max_failure_rate": max_failure_rate,
        },
    }
    return build_config(raw, tmp_path)


def write_inputs(tmp_path) -> None:
    (tmp_path / "eval.json").write_text(json.dumps(EVAL), encoding="utf-8")
    rows = [
        {"chunk_id": f"c{i:03d}", "doc": "relays.md", "doc_sha256": "0" * 64, "pages": None, "char_start": 0}
        | {"char_end": len(text), "n_tokens": 20, "text": text}
        for i, text in enumerate(FACTS)
    ]
    atomic_write_jsonl(tmp_path / "run" / "chunks.jsonl", rows)


def run_all(cfg) -> None:
    for stage in (generate, curate, evaluate):
        stage(cfg)


@pytest.mark.slow
def test_thirty_percent_faults_lose_nothing_and_resend_nothing_answered(tmp_path):
    write_inputs(tmp_path)
    faults = FaultPlan.uniform(0.3, slow_s=1.5, retry_after="0")
    with (
        FakeOpenAIServer(reply=reply, models=["teacher-m", "judge-m"], faults=faults) as srv,
        FakeOpenAIServer(reply=reply, models=["answer-a"], faults=faults, seed=1) as srv_a,
        FakeOpenAIServer(reply=reply, models=["answer-b"], faults=faults, seed=2) as srv_b,
    ):
        servers = (srv, srv_a, srv_b)
        cfg = config(tmp_path, srv.base_url, 1.0, srv_a.base_url, srv_b.base_url)
        run_all(cfg)
        first = [dict(s.answered_per_prompt) for s in servers]
        run_all(cfg)  # a rerun asks only what never got an answer
        answered = [dict(s.answered_per_prompt) for s in servers]
        injected = sum(n for s in servers for kind, n in s.outcomes.items() if kind != "ok")

    assert injected >= 20, [s.outcomes for s in servers]
    for before, after in zip(first, answered, strict=True):
        assert all(n <= 1 for n in after.values()), "an answered request was sent again"
        assert all(after[k] == 1 for k, n in before.items() if n), "a cached answer was lost"

    run_dir = tmp_path / "run"
    pairs, gen_failures = (
        read_jsonl(run_dir / "qa_raw.jsonl"),
        read_jsonl(run_dir / "generate_failures.jsonl"),
    )
    assert {p["chunk_id"] for p in pairs} | {f["chunk_id"] for f in gen_failures} == {
        f"c{i:03d}" for i in range(len(FACTS))
    }
    assert all(f["reason"] for f in gen_failures)

    kept, rejected = read_jsonl(run_dir / "qa_curated.jsonl"), read_jsonl(run_dir / "qa_rejected.jsonl")
    assert sorted(p["id"] for p in kept + rejected) == sorted(p["id"] for p in pairs)
    for row in rejected:
        assert row["rule"]
        if row["rule"] == "judge_error":
            assert row.get("reason") or row.get("raw")

    results = read_jsonl(run_dir / "eval" / "results.jsonl")
    assert len(results) == 2 * len(EVAL)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    failed = summary["failures"]
    assert sum(1 for r in results if r["answer_error"]) == sum(failed["answers"].values())
    assert len(summary["missing_judgement_items"]) == failed["missing_judgements"]


@pytest.mark.slow
def test_failures_above_max_failure_rate_fail_the_stage_after_writing_everything(tmp_path):
    write_inputs(tmp_path)
    faults = FaultPlan(rate_500=0.6)
    with FakeOpenAIServer(reply=reply, models=["teacher-m"], faults=faults, seed=1) as srv:
        cfg = config(tmp_path, srv.base_url, max_failure_rate=0.05)
        with pytest.raises(FailureRateError) as info:
            generate(cfg)
    failures = read_jsonl(tmp_path / "run" / "generate_failures.jsonl")
    assert failures and str(len(failures)) in str(info.value)
    assert "generate_failures.jsonl" in str(info.value)
