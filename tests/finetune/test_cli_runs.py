"""`doctune finetune` as a user runs it: killed and resumed, two processes, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.finetune.helpers import write_chat_data, yaml_config

from doctune.adapters import ADAPTER_WEIGHTS, CHECKPOINTS_DIR, FINETUNE_INFO, LAST_DIR, METRICS
from doctune.finetune import train
from doctune.finetune.outputs import adapter_tensor_count

pytestmark = pytest.mark.slow

WEIGHTS = ADAPTER_WEIGHTS[0]  # adapter_model.safetensors


def doctune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "doctune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "doctune", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def equal_weights(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_killed_run_resumes_to_the_same_adapter_as_an_uninterrupted_one(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    write_chat_data(run_dir, n_train=16, n_val=4)
    # 40 steps, a checkpoint after each, LoRA dropout on: resuming must restore optimizer, scheduler, data order
    # and RNG for the adapters to match bit for bit.
    config = yaml_config(tmp_path / "doctune.yaml", run_dir, tiny_model_dir, epochs=10, eval_steps=1)
    full = doctune("finetune", "-c", str(config), "--output-dir", str(tmp_path / "full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    proc = start("finetune", "-c", str(config), "--output-dir", str(interrupted), cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not train.checkpoints(interrupted / CHECKPOINTS_DIR) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (interrupted / FINETUNE_INFO).exists(), "the run finished before it could be killed"
    killed_at = train.checkpoints(interrupted / CHECKPOINTS_DIR)[-1].name

    resumed = doctune(
        "finetune", "-c", str(config), "--output-dir", str(interrupted), "--resume", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads((interrupted / FINETUNE_INFO).read_text())
    assert info["resumed_from"].endswith(killed_at) and info["training"]["steps"] == 40
    weights = WEIGHTS
    assert equal_weights(interrupted / weights, tmp_path / "full" / weights)
    assert equal_weights(interrupted / LAST_DIR / weights, tmp_path / "full" / LAST_DIR / weights)
    full_metrics = json.loads((tmp_path / "full" / METRICS).read_text())
    resumed_metrics = json.loads((interrupted / METRICS).read_text())
    assert resumed_metrics["eval"] == full_metrics["eval"]


def test_two_processes_both_train_and_save_one_adapter(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    write_chat_data(run_dir, n_train=16, n_val=4)
    # batch 2 per process x 2 processes = the global batch of one process with batch 4; eval_steps reaches the
    # workers only through the command line that --nproc passes on
    config = yaml_config(
        tmp_path / "doctune.yaml", run_dir, tiny_model_dir, batch_size=2, lora={"dropout": 0.0}
    )
    result = doctune(
        "finetune", "-c", str(config), "--nproc", "2", "--set", "finetune.eval_steps=4", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = run_dir / "adapter"
    info = json.loads((adapter / FINETUNE_INFO).read_text())
    assert info["training"]["mode"] == "ddp" and info["training"]["world_size"] == 2
    assert info["config"]["eval_steps"] == 4
    ranks = info["training"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["batches"] == 8 and r["tokens"] > 0 for r in ranks)  # 2 epochs x 4 steps, each rank
    assert info["data"]["train_samples"] == 16 and info["training"]["steps"] == 8
    checkpoint = train.checkpoints(adapter / CHECKPOINTS_DIR)[-1]
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert adapter_tensor_count(adapter) > 0
    assert not list(adapter.glob("**/.best.partial"))
    assert result.stdout.count("wrote ") == 3  # one summary, from rank 0

    single = yaml_config(
        tmp_path / "single.yaml", run_dir, tiny_model_dir, batch_size=4, eval_steps=4, lora={"dropout": 0.0}
    )
    one = doctune("finetune", "-c", str(single), "--output-dir", str(tmp_path / "single"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    ddp_losses = [r["loss"] for r in json.loads((adapter / METRICS).read_text())["train"]]
    one_losses = [r["loss"] for r in json.loads((tmp_path / "single" / METRICS).read_text())["train"]]
    assert ddp_losses == pytest.approx(one_losses, rel=1e-4)


def test_fsdp_on_a_cpu_machine_is_a_one_line_error_naming_the_setting(tiny_model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA error")
    run_dir = tmp_path / "run"
    write_chat_data(run_dir, n_train=4, n_val=1)
    config = yaml_config(tmp_path / "doctune.yaml", run_dir, tiny_model_dir, fsdp="full_shard")
    result = doctune("finetune", "-c", str(config), "--nproc", "2", cwd=tmp_path)
    assert result.returncode == 2
    assert "finetune.fsdp: 'full_shard' needs CUDA" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "adapter").exists()
