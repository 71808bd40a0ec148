"""Shared fixtures. Everything runs offline: models come from `doctune tiny-model`, servers bind 127.0.0.1."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run servers, training processes and clients side by side on 2 cores: one OpenMP thread each avoids
# the spin-wait collapse of oversubscribed torch kernels (a tiny matmul went from 0.03 ms to 24 ms).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A `doctune tiny-model` folder (size tiny, seed 0), built once per test session. Treat it as read-only."""
    from doctune.tinymodel import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model") / "model"
    build_tiny_model(out, size="tiny", seed=0)
    return out
