"""Fixtures of the finetune tests: one adapter trained once per session on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.finetune.helpers import finetune_config, write_chat_data


@pytest.fixture(scope="session")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run dir with train/val data and an adapter trained on it (16 train / 4 val samples, 8 steps)."""
    from doctune.finetune.train import run

    run_dir = tmp_path_factory.mktemp("finetune-run") / "run"
    write_chat_data(run_dir, n_train=16, n_val=4)
    cfg = finetune_config(run_dir, tiny_model_dir)
    summary = run(cfg)
    return {"cfg": cfg, "run_dir": run_dir, "adapter": run_dir / "adapter", "summary": summary}
