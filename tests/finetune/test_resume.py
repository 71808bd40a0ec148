"""`doctune finetune --resume` after a checkpoint cut short: a kill during the Trainer's checkpoint save leaves a
checkpoint folder without trainer_state.json, with it half-written, or without whole weights. Resume skips it,
continues from the last complete checkpoint, and ends with the adapters an uninterrupted run writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.finetune.helpers import finetune_config, write_chat_data, yaml_config

from doctune.adapters import TRAINER_STATE, AdapterDir
from doctune.finetune import train


def snapshot(adapter: AdapterDir) -> dict:
    """What a user compares: both adapters' weights and the val losses."""
    return {
        "chosen": load_file(str(adapter.weights)),
        "last": load_file(str(AdapterDir(adapter.last).weights)),
        "eval": json.loads(adapter.metrics.read_text())["eval"],
    }


def same(a: dict, b: dict) -> bool:
    return a["eval"] == b["eval"] and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][t], b[k][t]) for t in a[k])
        for k in ("chosen", "last")
    )


def cut_weights_no_state(checkpoint: Path) -> None:
    """Killed while the adapter weights were written: half a safetensors file, nothing after it."""
    weights = AdapterDir(checkpoint).weights
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for path in checkpoint.iterdir():
        if path.suffix in (".pt", ".pth") or path.name == TRAINER_STATE:
            path.unlink()


def cut_state(checkpoint: Path) -> None:
    """Killed while trainer_state.json was written (the Trainer writes it in place, last)."""
    state = checkpoint / TRAINER_STATE
    state.write_text(state.read_text()[:100])


def weights_missing(checkpoint: Path) -> None:
    AdapterDir(checkpoint).weights.unlink()


@pytest.mark.parametrize("cut", [cut_weights_no_state, cut_state, weights_missing])
def test_resume_skips_a_checkpoint_cut_short_and_finishes_as_an_uninterrupted_run(
    tiny_model_dir, tmp_path, cut
):
    run_dir = tmp_path / "run"
    write_chat_data(run_dir, n_train=16, n_val=4)
    cfg = finetune_config(
        run_dir, tiny_model_dir
    )  # 8 steps, a checkpoint every 2 (the best and the newest kept)
    train.run(cfg)
    adapter = cfg.run_folder.adapter
    uninterrupted = snapshot(adapter)
    *earlier, newest = train.checkpoints(adapter.checkpoints)
    assert newest.name == "checkpoint-8" and earlier

    cut(newest)
    assert train.checkpoints(adapter.checkpoints) == earlier
    summary = train.run(cfg, resume=True)

    info = json.loads(adapter.info_file.read_text())
    assert info["resumed_from"] == str(earlier[-1]) and info["training"]["steps"] == 8
    assert same(snapshot(adapter), uninterrupted)
    assert train.checkpoint_complete(newest)  # saved again, whole
    assert dict(summary.rows)["steps"] == 8


@pytest.mark.slow
def test_a_run_killed_inside_a_checkpoint_save_resumes_from_the_last_complete_one(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    write_chat_data(run_dir, n_train=16, n_val=4)
    reference = tmp_path / "reference"
    train.run(finetune_config(run_dir, tiny_model_dir), output_dir=reference)

    config = yaml_config(tmp_path / "doctune.yaml", run_dir, tiny_model_dir)
    killed = tmp_path / "killed"
    runner = Path(__file__).with_name("kill_in_save.py")
    args = ["finetune", "-c", str(config), "--output-dir", str(killed)]
    proc = subprocess.run(
        [sys.executable, str(runner), "6", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL, inside the save of step 6
    cut_short = AdapterDir(killed).checkpoints / "checkpoint-6"
    assert (cut_short / TRAINER_STATE).is_file() and not train.checkpoint_complete(cut_short)
    assert train.checkpoints(AdapterDir(killed).checkpoints)[-1].name == "checkpoint-4"

    resumed = subprocess.run(
        [sys.executable, "-m", "doctune", *args, "--resume"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads(AdapterDir(killed).info_file.read_text())
    assert info["resumed_from"].endswith("checkpoint-4") and info["training"]["steps"] == 8
    assert same(snapshot(AdapterDir(killed)), snapshot(AdapterDir(reference)))
