"""Every command's --help answers fast and without importing the heavy libraries."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from doctune.cli import app

COMMANDS = sorted(c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands)
HEAVY = ("torch", "transformers", "peft", "trl", "xgrammar", "openai", "datasets", "accelerate")

PROBE = """
import sys
from doctune.cli import app
try:
    app(args=sys.argv[1:], standalone_mode=False)
finally:
    heavy = [m for m in {heavy!r} if m in sys.modules]
    print("HEAVY:" + ",".join(heavy))
"""


def test_the_stages_are_listed():
    assert {"init", "tiny-model", "ingest"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_fast_and_light(command):
    args = ["--help"] if command is None else [command, "--help"]
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True, timeout=60
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    assert proc.stdout.strip().endswith("HEAVY:"), f"--help imported {proc.stdout.strip().splitlines()[-1]}"
    assert elapsed < 2.0, f"{' '.join(args)} took {elapsed:.2f} s"
