"""With an API key set, a whole `doctune run` (teacher, judge and one candidate behind a key-protected server)
leaves the key in no artifact, log, cache or report."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.support.fake_openai import FakeOpenAIServer

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart"


def reply(request: dict) -> str | dict:
    if request["model"] == "teacher-m":
        passage = request["messages"][-1]["content"]
        words = [w.strip(".,;:()`*#") for w in passage.split() if len(w) > 5][:3] or ["Lumen"]
        return {
            "pairs": [
                {"question": f"What does the manual say about {w}?", "answer": f"It explains {w}."}
                for w in words
            ]
        }
    if request["model"] == "judge-m":
        return {"reason": "The answer follows from the text.", "score": 5}
    return "Port 7300, as the installation guide says."


@pytest.mark.slow
def test_the_api_key_appears_in_no_artifact_or_log(tmp_path, tiny_model_dir):
    key = "sk-doctune-" + secrets.token_hex(16)
    shutil.copytree(QUICKSTART / "data", tmp_path / "data")
    shutil.copy(QUICKSTART / "eval_set.json", tmp_path / "eval_set.json")
    with FakeOpenAIServer(reply=reply, models=["teacher-m", "judge-m", "answer-m"], api_key=key) as srv:
        remote = {"backend": "openai", "base_url": srv.base_url, "api_key_env": "DOCTUNE_TEST_KEY"}
        raw = {
            "run_dir": "run",
            "data": {"dir": "data", "chunk_tokens": 192, "chunk_overlap": 16},
            "models": {
                "teacher": {**remote, "model": "teacher-m"},
                "judge": {**remote, "model": "judge-m"},
                "answerer": {**remote, "model": "answer-m"},
                "student": {"backend": "hf", "model": str(tiny_model_dir)},
            },
            "generate": {"total_questions": 30},
            "curate": {"eval_set": "eval_set.json", "val_fraction": 0.2},
            "finetune": {"epochs": 1, "report_to": ["tensorboard"], "max_length": 256},
            "eval": {
                "eval_set": "eval_set.json",
                "max_tokens": 16,
                "similarity": False,
                "candidates": {
                    "finetuned": {"model": "student", "adapter": "{run_dir}/adapter"},
                    "remote": {"model": "answerer"},
                },
            },
        }
        (tmp_path / "doctune.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
        proc = subprocess.run(
            [sys.executable, "-m", "doctune", "run", "-v", "-c", str(tmp_path / "doctune.yaml")],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "DOCTUNE_TEST_KEY": key},
        )
        used = sum(h.get("authorization") == f"Bearer {key}" for h in srv.headers_seen)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert used > 0, "the key was never sent: the test proves nothing"
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert set(stages) == {"ingest", "generate", "curate", "finetune", "eval"}

    found = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    found += [name for name, text in (("stdout", proc.stdout), ("stderr", proc.stderr)) if key in text]
    assert found == []
    files = sum(1 for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert files > 20  # chunks, pairs, cache, adapter, checkpoints, tensorboard, eval reports
