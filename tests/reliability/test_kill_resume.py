"""SIGKILL `doctune generate`, `doctune curate` and `doctune eval` at random points (two seeds each), run them
again: the rerun completes, its outputs equal an uninterrupted run's, no output file is left truncated, and
the cache survives. (finetune has its own kill test in tests/finetune/test_cli_runs.py.)"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.support.fake_openai import FakeOpenAIServer

from doctune.runs import atomic_write_jsonl

PAIRS = [
    {
        "id": f"c{i % 12:02d}:q{i}",
        "question": f"How many snapshots does relay number {i} keep each night?",
        "answer": f"Relay {i} keeps {i + 3} nightly snapshots.",
        "context": f"Relay {i} keeps {i + 3} nightly snapshots, taken at 02:00.",
        "chunk_id": f"c{i % 12:02d}",
        "doc": "relays.md",
        "teacher": "teacher-m",
        "prompt_sha256": "0" * 64,
    }
    for i in range(40)
]
EVAL = [{"question": f"Which port does relay {i} use?", "answer": f"Port {7300 + i}."} for i in range(16)]
OUTPUTS = {
    "generate": ["qa_raw.jsonl", "generate_failures.jsonl"],
    "curate": ["qa_curated.jsonl", "qa_rejected.jsonl", "data.json", "train.jsonl", "val.jsonl"],
    "eval": ["eval/results.jsonl", "eval/summary.json", "eval/report.md"],
}


def reply(request: dict) -> str | dict:
    if request["model"] == "teacher-m":
        fact = request["messages"][-1]["content"]
        return {"pairs": [{"question": f"What does this say: {fact[:30]}?", "answer": fact}]}
    if request["model"] == "judge-m":
        text = request["messages"][-1]["content"]
        return {"reason": "Checked.", "score": 3 + len(text) % 3}
    return f"Relay port {len(request['messages'][-1]['content'])}."


def make_run(folder: Path, url: str) -> Path:
    remote = {"backend": "openai", "base_url": url, "max_concurrency": 4}
    raw = {
        "run_dir": "run",
        "models": {
            "teacher": {**remote, "model": "teacher-m"},
            "judge": {**remote, "model": "judge-m"},
            "a": {**remote, "model": "answer-a"},
            "student": {"backend": "hf", "model": "unused"},
        },
        "generate": {"total_questions": len(PAIRS)},
        "curate": {"val_fraction": 0.25},
        "finetune": {"model": "student"},
        "eval": {"eval_set": "eval.json", "similarity": False, "candidates": {"a": {"model": "a"}}},
    }
    folder.mkdir(parents=True)
    (folder / "doctune.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    (folder / "eval.json").write_text(json.dumps(EVAL), encoding="utf-8")
    atomic_write_jsonl(folder / "run" / "qa_raw.jsonl", PAIRS)
    chunks = [
        {"chunk_id": f"k{i:02d}", "doc": "relays.md", "doc_sha256": "0" * 64, "pages": None, "char_start": 0}
        | {"char_end": len(p["context"]), "n_tokens": 20, "text": p["context"]}
        for i, p in enumerate(PAIRS)
    ]
    atomic_write_jsonl(folder / "run" / "chunks.jsonl", chunks)
    return folder / "doctune.yaml"


def command(stage: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "doctune", stage, "-c", str(config)]


def snapshot(folder: Path, stage: str) -> dict[str, bytes]:
    """The stage's outputs, with this run's own folder (named in reports) replaced by a placeholder."""
    return {
        name: (folder / "run" / name).read_bytes().replace(str(folder).encode(), b"<folder>")
        for name in OUTPUTS[stage]
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["generate", "curate", "eval"])
def test_killed_stage_reruns_to_the_same_outputs(tmp_path, stage):
    with FakeOpenAIServer(reply=reply, models=["teacher-m", "judge-m", "answer-a"], latency=0.3) as srv:
        reference = make_run(tmp_path / "reference", srv.base_url)
        subprocess.run(command(stage, reference), check=True, capture_output=True, timeout=300)
        expected = snapshot(tmp_path / "reference", stage)

        for seed in (1, 2):
            config = make_run(tmp_path / f"killed-{seed}", srv.base_url)
            delay = random.Random(seed).uniform(1.5, 3.0)  # start-up takes ~1.5 s, the requests ~3 s more
            proc = subprocess.Popen(
                command(stage, config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(delay)
            assert proc.poll() is None, "the stage ended before the kill: the test would prove nothing"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            folder = config.parent
            for name in OUTPUTS[stage]:  # whatever exists is whole: written atomically or not at all
                path = folder / "run" / name
                if path.exists() and path.suffix == ".json":
                    json.loads(path.read_text(encoding="utf-8"))
            assert not list((folder / "run").rglob(".*.tmp")), "a temp file was left behind"
            rerun = subprocess.run(command(stage, config), capture_output=True, text=True, timeout=300)
            assert rerun.returncode == 0, rerun.stderr[-2000:]
            assert snapshot(folder, stage) == expected, f"seed {seed}: outputs differ after the kill"
