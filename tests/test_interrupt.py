"""Ctrl-C in a real `doctune generate` and `doctune finetune`: exit 130, how to go on, no traceback; and the
command run again goes on from where it stopped."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tests.finetune.helpers import write_chat_data, yaml_config
from tests.support.fake_openai import FakeOpenAIServer
from tests.test_generate import server_config, teacher_reply

from doctune.adapters import AdapterDir
from doctune.finetune import outputs, train
from doctune.runs import read_jsonl

HINT = "interrupted: run the same command again to resume"


def start(args: list[str], cwd: Path) -> tuple[subprocess.Popen, Path]:
    """`doctune ARGS` in the background, its stderr (progress bars, errors) going to a file."""
    log = cwd / f"stderr-{time.monotonic_ns()}.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "doctune", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, env=env
        )
    return proc, log


def finish(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "doctune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def interrupt(proc: subprocess.Popen, log: Path) -> str:
    """Ctrl-C as a terminal sends it; the process must end by itself within a minute."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"doctune did not stop within 60 s of Ctrl-C: {log.read_text()[-2000:]}")
    return log.read_text()


def test_ctrl_c_in_generate_exits_130_and_the_rerun_resends_nothing_answered(tmp_path):
    texts = [f"Paragraph {i}: the pump runs at {i * 10} rpm when the valve is open." for i in range(16)]
    answered_before: set[str] = set()
    blocked, release = threading.Event(), threading.Event()
    replies = itertools.count()

    def reply_then_hang(request: dict[str, Any]) -> str:
        # after 6 answers, note which prompts were answered and hold every request until the test lets go
        if next(replies) >= 6 and not release.is_set():
            answered_before.update(k for k, n in srv.answered_per_prompt.items() if n)
            blocked.set()
            release.wait(60)
        return teacher_reply(request)

    with FakeOpenAIServer(reply_then_hang, latency=0.05) as srv:
        config = server_config(tmp_path, srv.base_url, texts, max_concurrency=2)
        proc, log = start(["generate", "-c", str(config)], tmp_path)
        try:
            assert blocked.wait(60), (
                log.read_text()[-2000:] if proc.poll() is not None else "server never blocked"
            )
            time.sleep(1.0)  # the answers it got are in the cache (it commits within milliseconds)
            stderr = interrupt(proc, log)
        finally:
            release.set()
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, stderr[-2000:]
        assert HINT in stderr and "Traceback" not in stderr, stderr[-2000:]
        assert not (tmp_path / "run" / "qa_raw.jsonl").exists()
        assert len(answered_before) >= 4

        again = finish(["generate", "-c", str(config)], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(srv.requests_per_prompt[key] == 1 for key in answered_before)  # not sent again
    rows = read_jsonl(tmp_path / "run" / "qa_raw.jsonl")
    assert {row["chunk_id"] for row in rows} == {f"notes.md#{i:04d}" for i in range(16)}


@pytest.mark.slow
def test_ctrl_c_in_finetune_exits_130_and_resume_continues_from_the_checkpoint(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    write_chat_data(run_dir, n_train=16, n_val=4)
    # 4 steps an epoch, 40 in all, a checkpoint every 2: still training when the first checkpoint appears
    config = yaml_config(tmp_path / "doctune.yaml", run_dir, tiny_model_dir, epochs=10, eval_steps=2)
    adapter = AdapterDir(run_dir / "adapter")
    proc, log = start(["finetune", "-c", str(config)], tmp_path)
    deadline = time.monotonic() + 300
    while not train.checkpoints(adapter.checkpoints) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    stderr = interrupt(proc, log)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted: run the same command again with --resume" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert not adapter.info_file.exists(), "the run finished before Ctrl-C"
    stopped_at = train.checkpoints(adapter.checkpoints)[-1].name

    plain = finish(["finetune", "-c", str(config)], tmp_path)  # what the user types first
    assert plain.returncode != 0 and "--resume" in plain.stderr and "Traceback" not in plain.stderr

    resumed = finish(["finetune", "-c", str(config), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads(adapter.info_file.read_text())
    assert info["resumed_from"].endswith(stopped_at) and info["training"]["steps"] == 40
    assert outputs.adapter_tensor_count(adapter.path) > 0
