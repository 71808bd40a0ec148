"""Many LLM requests at once: one coroutine per item, bounded if asked, results as they finish or in order.

```python
async for i, outcome in completed(ask, requests, limit=64):   # (index, result) in the order they finish
    ...
outcomes = await ordered(ask, requests, on_result=tally.add)  # results in the items' order
```

An error in any request (a fatal LLMError: server gone, bad key), Ctrl-C (asyncio.run cancels the main task),
or a caller that stops reading, cancels every request still in flight and waits until they are gone, so no
request outlives the call. Replies already answered are in the cache, so a rerun sends only the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def completed(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], *, limit: int | None = None
) -> AsyncIterator[tuple[int, R]]:
    """`(index, fn(item))` for every item, in the order the calls finish. At most `limit` calls run at once
    (None: all at once; the LLM then bounds concurrency itself); the next item starts as one finishes. The
    first call that raises ends the iteration with its exception, after the others were cancelled."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    queue = enumerate(items)
    finished: asyncio.Queue[asyncio.Future[R]] = asyncio.Queue()
    index: dict[asyncio.Future[R], int] = {}

    def start_next() -> bool:
        item = next(queue, None)
        if item is None:
            return False
        task = asyncio.ensure_future(fn(item[1]))
        index[task] = item[0]
        task.add_done_callback(finished.put_nowait)
        return True

    try:
        while (limit is None or len(index) < limit) and start_next():
            pass
        while index:
            task = await finished.get()
            i = index.pop(task)
            result = task.result()
            start_next()
            yield i, result
    finally:
        await _cancel(index)


async def _cancel(tasks: Iterable[asyncio.Future]) -> None:
    """Cancel `tasks` and wait until each has ended (their own errors are dropped: the caller has one)."""
    running = list(tasks)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


async def ordered(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T],
    *,
    limit: int | None = None,
    on_result: Callable[[R], None] | None = None,
) -> list[R]:
    """`[fn(item) for item in items]`, run concurrently as `completed` runs them, in the items' order.
    `on_result` sees each result as it finishes (running totals, progress bars).

    >>> async def double(x):
    ...     for _ in range(3 - x):  # the last item finishes first
    ...         await asyncio.sleep(0)
    ...     return 2 * x
    >>> asyncio.run(ordered(double, [1, 2, 3], on_result=print))
    6
    4
    2
    [2, 4, 6]
    """
    results: dict[int, R] = {}
    async with aclosing(completed(fn, items, limit=limit)) as stream:
        async for i, result in stream:
            results[i] = result
            if on_result is not None:
                on_result(result)
    return [results[i] for i in range(len(results))]
