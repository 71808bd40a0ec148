"""The quickstart end to end on the tiny random model (doctune.tiny.yaml, the demo's pipeline with a random model):
every stage, then a rerun that skips them all, then an edited document that re-runs the pipeline from ingest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
OUTPUTS = [
    "chunks.jsonl",
    "qa_raw.jsonl",
    "data.json",
    "train.jsonl",
    "val.jsonl",
    "adapter",
    "eval/report.html",
]


def doctune_run(config: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "doctune", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_quickstart_runs_skips_and_reruns_from_an_edited_document(tmp_path, tiny_model_dir):
    shutil.copytree(QUICKSTART / "data", tmp_path / "data")
    shutil.copy(QUICKSTART / "eval_set.json", tmp_path / "eval_set.json")
    shutil.copy(QUICKSTART / "faq.json", tmp_path / "faq.json")
    raw = yaml.safe_load((QUICKSTART / "doctune.tiny.yaml").read_text(encoding="utf-8"))
    raw["models"]["tiny"]["model"] = str(tiny_model_dir)
    raw["generate"]["total_questions"] = 60
    config = tmp_path / "doctune.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    run_dir = tmp_path / raw["run_dir"]

    first = doctune_run(config)
    for name in OUTPUTS:
        assert (run_dir / name).exists(), name
    assert "doctune run:" in first.stdout and "report.html" in first.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"ingest", "generate", "curate", "finetune", "eval"}
    summary_before = (run_dir / "eval/summary.json").read_bytes()

    second = doctune_run(config)
    assert second.stderr.count("unchanged since its last run, skipped") == 5
    assert (run_dir / "eval/summary.json").read_bytes() == summary_before

    doc = tmp_path / "data" / "overview.md"
    doc.write_text(
        doc.read_text(encoding="utf-8") + "\nLumen Notes also syncs over Bluetooth.\n", encoding="utf-8"
    )
    third = doctune_run(config)
    assert "unchanged since its last run" not in third.stderr
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stages["generate"]["counts"]["requests_cached"] >= 1  # unchanged chunks are not asked again
