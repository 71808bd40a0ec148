"""The one interface every model backend implements, and what a call returns.

```python
llm = build_llm(cfg, "teacher")           # llm/factory.py: backend + cache.sqlite in run_dir
await llm.preflight()                      # unreachable server / bad key / unknown model → LLMError, at once
reply = await llm.chat(messages, max_tokens=512, json_schema=schema)
reply.text, reply.prompt_tokens, reply.completion_tokens, reply.finish_reason, reply.cached
await llm.aclose()
```

A request that still fails after the backend's retries raises `RequestFailed` (the stage records it and goes
on); a failure that no retry can fix (server unreachable at start, 401/403/404) raises `errors.LLMError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    cached: bool = False


@dataclass
class Usage:
    """Token totals of a stage's LLM replies, split into those answered from the cache and those sent."""

    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_cached: int = 0
    completion_tokens_cached: int = 0

    def add_reply(self, reply: Completion | None) -> None:
        if reply is None:
            return
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        if reply.cached:
            self.cached += 1
            self.prompt_tokens_cached += reply.prompt_tokens
            self.completion_tokens_cached += reply.completion_tokens

    def tokens(self) -> dict[str, int]:
        """What manifest.json records under `tokens`."""
        return {
            "prompt": self.prompt_tokens,
            "completion": self.completion_tokens,
            "prompt_cached": self.prompt_tokens_cached,
            "completion_cached": self.completion_tokens_cached,
            "prompt_sent": self.prompt_tokens - self.prompt_tokens_cached,
            "completion_sent": self.completion_tokens - self.completion_tokens_cached,
        }


class RequestFailed(Exception):
    """One request could not be answered (after retries). `reason` is one line; `status` the HTTP code if any."""

    def __init__(self, reason: str, status: int | None = None, raw: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.raw = raw


@runtime_checkable
class LLM(Protocol):
    name: str

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        stop: list[str] | None = None,
    ) -> Completion: ...

    async def preflight(self) -> None:
        """Fail fast (LLMError naming the server or model) before a stage writes anything."""
        ...

    async def aclose(self) -> None: ...
