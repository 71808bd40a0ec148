"""`doctune finetune --nproc N`: each torchrun worker gets the command line as the user typed it, less --nproc."""

from __future__ import annotations

import sys

import pytest
from tests.finetune.helpers import yaml_config

from doctune.finetune import launch


def test_worker_args_drop_only_nproc_and_keep_flags_launch_does_not_know():
    argv = [
        "finetune",
        "-c",
        "doctune.yaml",
        "--nproc",
        "2",
        "--set",
        "finetune.lr=3e-4",
        "--a-flag-added-after-launch-py",
        "its value",
        "-v",
    ]
    assert launch.worker_args(argv) == [a for a in argv if a not in ("--nproc", "2")]
    assert launch.worker_args(["finetune", "--nproc=4", "--resume"]) == ["finetune", "--resume"]
    # a value that reads --nproc is a value, and nothing after `--` is touched
    assert launch.worker_args(["finetune", "--run-dir", "--nproc", "--", "--nproc", "2"], {"--run-dir"}) == [
        "finetune",
        "--run-dir",
        "--nproc",
        "--",
        "--nproc",
        "2",
    ]


def test_value_options_come_from_the_finetune_command_itself():
    import typer.main

    from doctune.cli import app

    command = typer.main.get_command(app).commands["finetune"]  # type: ignore[attr-defined]
    options = launch.value_options(command)
    assert {"-c", "--config", "--set", "--run-dir", "--output-dir", "--from-adapter", "--nproc"} <= options
    assert not options & {"--resume", "--overwrite", "-v", "--verbose"}


@pytest.mark.parametrize("nproc", [["--nproc", "2"], ["--nproc=2"]])
def test_finetune_nproc_starts_torchrun_with_the_users_own_arguments(
    nproc, tiny_model_dir, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from doctune.cli import app

    config = yaml_config(tmp_path / "doctune.yaml", tmp_path / "run", tiny_model_dir)
    typed = [
        "finetune",
        "-c",
        str(config),
        *nproc,
        "--set",
        "finetune.lr=3e-4",
        "--output-dir",
        str(tmp_path / "out"),
        "--resume",
        "-v",
    ]
    started: list[tuple[int, list[str]]] = []
    monkeypatch.setattr(sys, "argv", ["doctune", *typed])
    monkeypatch.setattr(launch, "run_torchrun", lambda n, args: started.append((n, args)) or 0)
    result = CliRunner().invoke(app, typed)
    assert result.exit_code == 0, result.output
    expected = [a for a in typed if a not in nproc]
    assert started == [(2, expected)]
    command = launch.torchrun_command(2, expected)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc-per-node=2" in command
    assert command[command.index("doctune") + 1 :] == expected
    assert not (tmp_path / "out").exists()  # nothing trained in the launching process
