"""SIGKILL between a write and its rename (deterministic: tests/reliability/kill_rename_runner.py kills
`doctune ingest` right before atomic_open renames the new file over the old one): the old file is intact byte
for byte, the killed write's temporary file is the only trace, and the next run succeeds and removes it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
RUNNER = Path(__file__).with_name("kill_rename_runner.py")
ADDED = "Lumen Notes also syncs over Bluetooth since version 4.2."


def doctune(*args: str, runner: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, *(runner or ["-m", "doctune"]), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture
def project(tmp_path, tiny_model_dir) -> Path:
    shutil.copytree(QUICKSTART / "data", tmp_path / "data")
    raw = yaml.safe_load((QUICKSTART / "doctune.tiny.yaml").read_text(encoding="utf-8"))
    raw["run_dir"] = "run"
    raw["models"]["tiny"]["model"] = str(tiny_model_dir)
    (tmp_path / "doctune.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("target", ["chunks.jsonl", "manifest.json"])
def test_a_kill_before_the_rename_keeps_the_old_file_and_the_next_run_cleans_up(project, target):
    config = str(project / "doctune.yaml")
    run = project / "run"
    first = doctune("ingest", "-c", config)
    assert first.returncode == 0, first.stderr[-2000:]
    old = (run / target).read_bytes()
    doc = project / "data" / "overview.md"
    doc.write_text(doc.read_text(encoding="utf-8") + f"\n{ADDED}\n", encoding="utf-8")

    killed = doctune(target, "ingest", "-c", config, runner=[str(RUNNER)])

    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (run / target).read_bytes() == old
    (stray,) = run.glob(f".{target}.*.tmp")  # the new version, written in full but never renamed
    assert stray.read_bytes() != old and stray.stat().st_size > 0

    rerun = doctune("ingest", "-c", config)

    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "removed 1 temporary file(s)" in rerun.stderr
    assert not list(run.rglob("*.tmp"))
    assert ADDED in (run / "chunks.jsonl").read_text(encoding="utf-8")
    assert (run / target).read_bytes() != old
