"""`doctune serve` in its own process, as a user starts it, for tests that talk to it over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

DOCTUNE = str(Path(sys.executable).with_name("doctune"))


def start_serve(*args: str, cwd: Path) -> subprocess.Popen:
    """`doctune serve ARGS` with stdout and stderr in one text pipe (read it with wait_for_url)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [DOCTUNE, "serve", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def wait_for_url(proc: subprocess.Popen, timeout: float) -> str:
    """The URL the server printed, once its /health answers 200 (it prints the URL just before it binds)."""
    deadline = time.monotonic() + timeout
    url = None
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, f"serve ended before it printed its URL (exit {proc.poll()})"
        if "doctune serve: http://" in line:
            url = line.split("doctune serve: ")[1].split()[0]
    if url is None:
        pytest.fail("doctune serve printed no URL")
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as reply:
                assert reply.status == 200
                return url
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"nothing answers at {url}")
