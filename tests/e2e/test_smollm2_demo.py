"""The demo's promise on the real model, in CI's time: SmolLM2-135M-Instruct (the GGUF as it ships), LoRA-trained by
`doctune finetune` on part of the quickstart's hand-written FAQ, answers held-out paraphrased questions about those
facts better than its base, by `doctune eval`'s key-fact recall with a 95% CI above zero.

A reduced version of `make demo` (examples/quickstart/doctune.yaml): the FAQ pairs of eight numeric facts
(ports, prices, sizes, counts, times: 36 pairs, 2-7 phrasings each) and the ten eval questions about them, with the
demo's recipe (LoRA r 32, lr 1e-3, no dropout, the last adapter) and fewer epochs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
SYSTEM = "You are the support assistant of Lumen Notes. Answer from the documentation."
# faq.json groups pairs by their doc passage (Context); these passages hold one number each worth asking about
FACTS = (
    "Lumen Notes comes in two editions.",  # 6 euros per user per month
    "The desktop app runs on Windows 10",  # macOS 12, iOS 16, 512 MB
    "Lumen Relay is a single binary.",  # port 7300
    "Version 3.0 (October 2025): The relay listens",  # 7000 before
    "The vault key is created on the first device",  # 24 words
    "Lumen Relay writes a snapshot of every vault",  # 02:00, 30 snapshots
    "Attachments larger than 50 MB",  # 50 MB
    "Version 3.1 (January 2026)",  # 14 before
)
EVAL_QUESTIONS = (
    "Which port does Lumen Relay listen on by default?",
    "How many nightly snapshots does Lumen Relay keep?",
    "How much does the Team edition cost?",
    "What is the minimum iPhone operating system for the mobile app?",
    "Will the desktop app install on a Mac running macOS 11?",
    "How much RAM must a machine have to host the relay?",
    "Which port did older relay releases use before 3.0?",
    "How long is the secret phrase that protects a vault?",
    "What time of day are the server's nightly copies made?",
    "How many nightly backups did the relay retain prior to 3.1?",
)


def chat(pair: dict[str, str]) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": pair["Question"]},
            {"role": "assistant", "content": pair["Answer"]},
        ]
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def doctune(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "doctune", *args],
        capture_output=True,
        text=True,
        timeout=1800,  # pytest-timeout (pyproject) bounds the whole test
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning:" not in proc.stderr, proc.stderr[-3000:]  # no library warning the user cannot act on
    return proc


@pytest.mark.slow
def test_smollm2_learns_the_faq_facts_and_beats_its_base_on_held_out_questions(tmp_path, smollm2_gguf):
    faq = json.loads((QUICKSTART / "faq.json").read_text(encoding="utf-8"))
    train = [p for p in faq if p["Context"].startswith(FACTS)]
    val = [p for p in faq if p["Context"].startswith("The search index is updated")]
    assert len(train) == 36 and val
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_jsonl(run_dir / "train.jsonl", [chat(p) for p in train])
    write_jsonl(run_dir / "val.jsonl", [chat(p) for p in val])
    items = json.loads((QUICKSTART / "eval_set.json").read_text(encoding="utf-8"))
    held_out = [it for it in items if it["question"] in EVAL_QUESTIONS]
    assert len(held_out) == len(EVAL_QUESTIONS)
    assert not {it["question"] for it in held_out} & {p["Question"] for p in faq}
    (tmp_path / "eval_set.json").write_text(json.dumps(held_out), encoding="utf-8")
    config = {
        "run_dir": "run",
        "models": {"smollm2": {"backend": "hf", "model": str(smollm2_gguf), "max_concurrency": 10}},
        "curate": {"system_prompt": SYSTEM},
        "finetune": {
            "model": "smollm2",
            "lora": {"r": 32, "alpha": 64, "dropout": 0.0},
            "epochs": 12,
            "batch_size": 4,
            "lr": 1.0e-3,
            "eval_steps": 100,
            "select": "last",
            "report_to": [],
        },
        "eval": {
            "eval_set": "eval_set.json",
            "judge": None,
            "similarity": False,
            "max_tokens": 32,
            "candidates": {
                "finetuned": {"model": "smollm2", "adapter": "{run_dir}/adapter"},
                "base": {"model": "smollm2"},
            },
        },
    }
    (tmp_path / "doctune.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    doctune("finetune", "-c", str(tmp_path / "doctune.yaml"))
    doctune("eval", "-c", str(tmp_path / "doctune.yaml"))

    summary = json.loads((run_dir / "eval" / "summary.json").read_text(encoding="utf-8"))
    comparison = summary["comparison"]
    assert (comparison["a"], comparison["b"]) == ("finetuned", "base")
    diff = comparison["metrics"]["key_fact_recall"]
    assert diff["n"] == len(held_out)
    assert diff["ci"][0] > 0, f"finetuned - base key facts {diff}: not ahead with 95% confidence"
    finetuned = summary["metrics"]["finetuned"]["key_fact_recall"]["mean"]
    assert finetuned >= 0.5, f"the fine-tuned model states only {finetuned:.0%} of the key facts"
