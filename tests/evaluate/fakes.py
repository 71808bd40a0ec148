"""An in-process LLM that implements doctune.llm.base.LLM with a reply function, for judge tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from doctune.llm.base import Completion, RequestFailed


class ScriptedLLM:
    """`reply(messages) -> str` answers each chat; a reply of RequestFailed is raised. Records every call."""

    def __init__(self, reply: Callable[[list[dict[str, Any]]], str | RequestFailed], name: str = "scripted"):
        self.name = name
        self.reply = reply
        self.calls: list[dict[str, Any]] = []

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        stop: list[str] | None = None,
    ) -> Completion:
        self.calls.append({"messages": messages, "max_tokens": max_tokens, "json_schema": json_schema})
        out = self.reply(messages)
        if isinstance(out, RequestFailed):
            raise out
        return Completion(text=out, prompt_tokens=10, completion_tokens=5, finish_reason="stop")

    async def preflight(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
