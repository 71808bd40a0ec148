"""Fixtures for the server tests: two LoRA adapters on the tiny model, one engine, real servers on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import ADAPTER_SYSTEM_PROMPT, ADAPTER_TEMPLATE, ServerThread, make_adapter, running, wait_idle


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """docs: with chat_template.jinja and doctune_finetune.json (as `doctune finetune` writes); plain: neither."""
    root = tmp_path_factory.mktemp("adapters")
    docs = make_adapter(tiny_model_dir, root / "docs", seed=1)
    (docs / "chat_template.jinja").write_text(ADAPTER_TEMPLATE, encoding="utf-8")
    (docs / "doctune_finetune.json").write_text(
        json.dumps({"system_prompt": ADAPTER_SYSTEM_PROMPT}), encoding="utf-8"
    )
    plain = make_adapter(tiny_model_dir, root / "plain", seed=2)
    return {"docs": docs, "plain": plain}


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path, adapter_dirs: dict[str, Path]) -> Iterator[Any]:
    """The tiny model served as "tiny", with adapters "docs" and "plain"."""
    from doctune.serve.engine import Engine

    eng = Engine.load(
        str(tiny_model_dir),
        {name: str(path) for name, path in adapter_dirs.items()},
        served_name="tiny",
        max_batch=16,
        max_tokens_cap=4096,
    )
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def server(engine: Any) -> Iterator[ServerThread]:
    """doctune's server (no API key) over the shared engine."""
    from doctune.serve.app import create_app

    with running(create_app(engine)) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server: ServerThread) -> Any:
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def idle_engine(engine: Any) -> Any:
    """The shared engine, once every earlier request has finished (tests that count batches need that)."""
    wait_idle(engine)
    return engine
