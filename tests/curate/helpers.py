"""Helpers of the curate tests: a protocol-level judge, configs and qa_raw.jsonl files in tmp dirs."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.fake_llm import ScriptedLLM

from doctune.config import Config, build_config
from doctune.llm.base import RequestFailed
from doctune.runs import atomic_write_jsonl


def field_of(messages: list[dict[str, Any]], name: str) -> str:
    """`Question`/`Answer`/`Context` as the judge's user message states it."""
    user = messages[-1]["content"]
    match = re.search(rf"^{name}: (.*?)(?=\n(?:Question|Answer|Context): |\Z)", user, re.S | re.M)
    assert match, f"{name} not in the judge's message: {user!r}"
    return match.group(1)


class FakeJudge(ScriptedLLM):
    """A protocol-level judge: `reply(messages)` gives the text (or raises RequestFailed)."""

    def __init__(self, reply: Callable[[list[dict[str, Any]]], str], name: str = "fake-judge"):
        super().__init__(reply, name, prompt_tokens=100, completion_tokens=20)

    def questions(self) -> list[str]:
        return [field_of(c["messages"], "Question") for c in self.calls]


def scored(scores: dict[str, int], default: int = 5) -> Callable[[list[dict[str, Any]]], str]:
    """A judge reply function: the score for the pair's answer (by answer text), `default` otherwise."""

    def reply(messages: list[dict[str, Any]]) -> str:
        answer = field_of(messages, "Answer")
        return f'{{"reason": "checked against the context", "score": {scores.get(answer, default)}}}'

    return reply


def failing(reason: str = "503 after 6 retries") -> Callable[[list[dict[str, Any]]], str]:
    def reply(messages: list[dict[str, Any]]) -> str:
        raise RequestFailed(reason, status=503, raw="Server overloaded")

    return reply


def make_config(tmp_path: Path, **curate: Any) -> Config:
    raw = {
        "run_dir": "run",
        "curate": {"mode": "off", **curate},
        "models": {
            "teacher": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "teacher-m"},
            "judge": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "judge-m"},
            "student": {"backend": "hf", "model": "student-m"},
        },
    }
    return build_config(raw, tmp_path)


def pair(
    i: int | str, question: str, answer: str | None = None, chunk: str | None = None, **extra: Any
) -> dict:
    return {
        "id": f"p{i}",
        "question": question,
        "answer": answer if answer is not None else f"The documented answer number {i}.",
        "context": f"Context passage {chunk or i}: the documented answer number {i}.",
        "chunk_id": chunk or f"doc.md#{i}",
        "doc": "doc.md",
        "teacher": "teacher-m",
        "prompt_sha256": "0" * 64,
        **extra,
    }


def write_raw(cfg: Config, pairs: list[dict[str, Any]]) -> Path:
    path = cfg.run_path / "qa_raw.jsonl"
    atomic_write_jsonl(path, pairs)
    return path


# Distinct questions on unrelated topics: no two are near, semantic or eval duplicates of each other.
TOPICS = [
    "How do I rotate the signing keys of the billing service?",
    "Which port does the metrics exporter listen on by default?",
    "What happens to queued jobs when a worker node is drained?",
    "Why does the installer refuse to run on a read-only filesystem?",
    "When are nightly database snapshots copied to cold storage?",
    "Who can approve a change to the firewall allow list?",
    "What is the maximum attachment size accepted by the mail gateway?",
    "How long are audit logs retained before they are deleted?",
    "Which compression codec does the archive tool use for images?",
    "What does the error code E4012 mean during a firmware update?",
    "How can a tenant export its invoices as a spreadsheet?",
    "Where is the proxy configuration stored on a Windows laptop?",
]
