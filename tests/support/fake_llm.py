"""An in-process LLM implementing doctune.llm.base.LLM with a reply function, for stage tests without a server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from doctune.llm.base import Completion, RequestFailed


class ScriptedLLM:
    """`reply(messages)` gives each answer's text; a returned or raised RequestFailed fails that request.
    Every call is recorded in `calls`; every answer reports `prompt_tokens`/`completion_tokens`."""

    def __init__(
        self,
        reply: Callable[[list[dict[str, Any]]], str | RequestFailed],
        name: str = "scripted",
        *,
        prompt_tokens: int = 10,
        completion_tokens: int = 5,
    ):
        self.name = name
        self.reply = reply
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.calls: list[dict[str, Any]] = []
        self.closed = False

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
        return Completion(
            text=out,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            finish_reason="stop",
        )

    async def preflight(self) -> None:
        return None

    async def aclose(self) -> None:
        self.closed = True
