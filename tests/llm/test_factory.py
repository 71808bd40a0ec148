"""build_llm: the configured backend by name, behind the run's cache."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from tests.support.fake_openai import FakeOpenAIServer, unused_port

from doctune.config import Config, build_config
from doctune.errors import ConfigError, LLMError
from doctune.llm.base import LLM, Completion
from doctune.llm.cache import CachedLLM
from doctune.llm.factory import build_llm
from doctune.llm.openai_backend import OpenAIBackend

MESSAGES = [{"role": "user", "content": "What is in the documents?"}]


def config(tmp_path: Path, models: dict[str, Any]) -> Config:
    """A valid config holding `models` (plus an hf student, which finetune needs), run_dir runs/r1."""
    models = {"student": {"backend": "hf", "model": "some/model"}, **models}
    raw = {
        "run_dir": "runs/r1",
        "models": models,
        "generate": {"model": "student"},
        "curate": {"mode": "off"},
        "eval": {"judge": None, "candidates": {"base": {"model": "student"}}},
    }
    return build_config(raw, tmp_path)


def teacher(base_url: str) -> dict[str, Any]:
    return {"backend": "openai", "base_url": base_url, "model": "fake-model"}


async def ask_and_close(llm: LLM) -> Completion:
    try:
        await llm.preflight()
        return await llm.chat(MESSAGES, max_tokens=8)
    finally:
        await llm.aclose()


def test_openai_model_behind_the_run_cache(tmp_path):
    with FakeOpenAIServer() as srv:
        cfg = config(tmp_path, {"teacher": teacher(srv.base_url)})
        llm = build_llm(cfg, "teacher")
        assert isinstance(llm, CachedLLM) and isinstance(llm.inner, OpenAIBackend)
        assert llm.name == "fake-model"
        first = asyncio.run(ask_and_close(llm))
        second = asyncio.run(ask_and_close(build_llm(cfg, "teacher")))
        assert srv.total_requests() == 1
    assert (first.cached, second.cached, second.text) == (False, True, first.text)
    assert (tmp_path / "runs" / "r1" / "cache.sqlite").is_file()


def test_no_cache_and_other_cache_path(tmp_path):
    with FakeOpenAIServer() as srv:
        cfg = config(tmp_path, {"teacher": teacher(srv.base_url)})
        plain = build_llm(cfg, "teacher", use_cache=False)
        assert isinstance(plain, OpenAIBackend)
        asyncio.run(ask_and_close(plain))
        asyncio.run(ask_and_close(build_llm(cfg, "teacher", use_cache=False)))
        assert srv.total_requests() == 2
        assert not (tmp_path / "runs").exists()
        other = tmp_path / "elsewhere" / "c.sqlite"
        asyncio.run(ask_and_close(build_llm(cfg, "teacher", cache_path=other)))
        reply = asyncio.run(ask_and_close(build_llm(cfg, "teacher", cache_path=other)))
    assert reply.cached and other.is_file() and not (tmp_path / "runs").exists()


def test_unreachable_server_fails_before_any_file_is_written(tmp_path):
    url = f"http://127.0.0.1:{unused_port()}/v1"
    cfg = config(tmp_path, {"teacher": teacher(url)})
    llm = build_llm(cfg, "teacher")
    with pytest.raises(LLMError, match=r"cannot connect .*models\.teacher\.base_url"):
        asyncio.run(ask_and_close(llm))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unknown_name_and_missing_base_url_are_config_errors(tmp_path):
    cfg = config(tmp_path, {"teacher": {"backend": "openai", "model": "m"}})
    with pytest.raises(ConfigError, match=r"models\.judge: no such model \(defined: student, teacher\)"):
        build_llm(cfg, "judge")
    with pytest.raises(ConfigError, match=r"models\.teacher\.base_url: required for backend openai"):
        build_llm(cfg, "teacher")


def test_hf_model_gets_its_adapter_resolved_against_the_config(tmp_path):
    cfg = config(tmp_path, {})
    llm = build_llm(cfg, "student", adapter="{run_dir}/adapter", use_cache=False)
    assert llm.adapter == tmp_path / "runs" / "r1" / "adapter"
    assert build_llm(cfg, "student", use_cache=False).adapter is None
    cached = build_llm(cfg, "student", adapter="{run_dir}/adapter")
    assert cached.name != build_llm(cfg, "student").name  # separate cache keys with and without the adapter


@pytest.mark.slow
def test_hf_model_answers_and_caches(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, {"student": {"backend": "hf", "model": str(tiny_model_dir), "max_concurrency": 2}})
    first = asyncio.run(ask_and_close(build_llm(cfg, "student")))
    second = asyncio.run(ask_and_close(build_llm(cfg, "student")))
    assert isinstance(first, Completion) and first.completion_tokens > 0
    assert (first.cached, second.cached, second.text) == (False, True, first.text)
