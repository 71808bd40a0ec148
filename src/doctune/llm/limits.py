"""How fast a backend may send: a bound on requests in flight, and optional request/token rate limits.

```python
limits = Limits(max_concurrency=64, requests_per_minute=600, tokens_per_minute=200_000)
async with limits.slot(estimate_tokens(messages, max_tokens)):
    reply = await client.chat.completions.create(...)
```

The rate limits are leaky buckets (aiolimiter) that hold at most one second of budget, so a run never sends a
minute's worth of requests in one burst: 600 requests/minute means at most 10 at once, then 10 per second. A
request's tokens are estimated before it is sent (prompt characters / 4 + max_tokens: the most it can use), and
taken from the token bucket in pieces of at most one second's budget, so a request larger than that waits its
turn instead of failing. Requests first wait for the rate limits, then for a free slot; a slot is held only
while the request is on the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiolimiter import AsyncLimiter

CHARS_PER_TOKEN = 4


def estimate_tokens(messages: list[dict[str, Any]], max_tokens: int) -> int:
    """Tokens a request may use at most: its prompt (characters / 4, rounded up) plus `max_tokens`.

    >>> estimate_tokens([{"role": "user", "content": "x" * 40}], max_tokens=100)
    110
    """
    chars = sum(len(m["content"]) if isinstance(m.get("content"), str) else 0 for m in messages)
    return -(-chars // CHARS_PER_TOKEN) + max_tokens


def per_second_bucket(per_minute: float) -> AsyncLimiter:
    """A leaky bucket for `per_minute` that holds one second of budget (at least 1)."""
    per_second = per_minute / 60.0
    capacity = max(1.0, per_second)
    return AsyncLimiter(capacity, time_period=capacity / per_second)


class Limits:
    """Concurrency bound + optional requests/tokens per minute. Create one per event loop."""

    def __init__(
        self,
        max_concurrency: int,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
    ):
        self.max_concurrency = max_concurrency
        self._slots = asyncio.Semaphore(max_concurrency)
        self._requests = per_second_bucket(requests_per_minute) if requests_per_minute else None
        self._tokens = per_second_bucket(tokens_per_minute) if tokens_per_minute else None

    async def wait_rate(self, tokens: int) -> None:
        """Wait until one more request of `tokens` tokens fits the rate limits."""
        if self._requests is not None:
            await self._requests.acquire()
        if self._tokens is not None:
            left = float(tokens)
            while left > 0:
                piece = min(left, self._tokens.max_rate)
                await self._tokens.acquire(piece)
                left -= piece

    @asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[None]:
        """Held around one request on the wire (each retry takes a new slot)."""
        await self.wait_rate(tokens)
        async with self._slots:
            yield
