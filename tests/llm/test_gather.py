"""Many requests at once (llm/gather.py): order, bounded concurrency, and nothing left running after an error,
a caller that stops reading, or Ctrl-C."""

from __future__ import annotations

import asyncio
import doctest
from contextlib import aclosing

import pytest

from doctune.llm import gather
from doctune.llm.gather import completed, ordered


class Requests:
    """Fake requests that finish when the test says so; records which started, ended and were cancelled."""

    def __init__(self) -> None:
        self.release: dict[int, asyncio.Event] = {}
        self.started: list[int] = []
        self.cancelled: list[int] = []
        self.running = 0
        self.most_running = 0

    def finish(self, *items: int) -> None:
        for i in items:
            self.release.setdefault(i, asyncio.Event()).set()

    async def __call__(self, i: int) -> str:
        self.started.append(i)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.setdefault(i, asyncio.Event()).wait()
            if i < 0:
                raise RuntimeError(f"request {i} failed")
            return f"r{i}"
        except asyncio.CancelledError:
            self.cancelled.append(i)
            raise
        finally:
            self.running -= 1


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _no_other_tasks() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


def test_doctests():
    result = doctest.testmod(gather)
    assert result.attempted > 0 and result.failed == 0


def test_results_come_in_the_items_order_while_on_result_sees_them_as_they_finish():
    async def main():
        requests = Requests()
        seen: list[str] = []
        job = asyncio.ensure_future(ordered(requests, [0, 1, 2, 3], on_result=seen.append))
        for i in (2, 0, 3, 1):
            requests.finish(i)
            await _settle()
        return await job, seen

    results, seen = asyncio.run(main())
    assert results == ["r0", "r1", "r2", "r3"]
    assert seen == ["r2", "r0", "r3", "r1"]


def test_completed_yields_each_index_with_its_result_as_it_finishes():
    async def main():
        requests = Requests()
        got = []
        async with aclosing(completed(requests, [10, 11, 12])) as stream:
            await _settle()
            requests.finish(12)
            got.append(await anext(stream))
            requests.finish(10, 11)
            got += [pair async for pair in stream]
        return got

    assert asyncio.run(main()) == [(2, "r12"), (0, "r10"), (1, "r11")]


def test_a_limit_bounds_the_requests_in_flight_and_starts_the_next_as_one_finishes():
    async def main():
        requests = Requests()
        job = asyncio.ensure_future(ordered(requests, range(6), limit=2))
        await _settle()
        first = list(requests.started)
        requests.finish(1)
        await _settle()
        after_one = list(requests.started)
        requests.finish(0, 2, 3, 4, 5)
        return first, after_one, await job, requests.most_running

    first, after_one, results, most = asyncio.run(main())
    assert first == [0, 1]
    assert after_one == [0, 1, 2]
    assert results == [f"r{i}" for i in range(6)]
    assert most == 2


def test_items_are_drawn_only_as_slots_free_up():
    drawn: list[int] = []

    def items():
        for i in range(100):
            drawn.append(i)
            yield i

    async def main():
        requests = Requests()
        job = asyncio.ensure_future(ordered(requests, items(), limit=3))
        await _settle()
        before = len(drawn)
        requests.finish(*range(100))
        return before, await job

    before, results = asyncio.run(main())
    assert before == 3 and len(results) == 100


def test_an_error_cancels_every_request_still_in_flight_and_is_raised():
    async def main():
        requests = Requests()
        job = asyncio.ensure_future(ordered(requests, [0, 1, -1, 2, 3]))
        await _settle()
        requests.finish(0, -1)
        with pytest.raises(RuntimeError, match="request -1 failed"):
            await job
        return requests, _no_other_tasks()

    requests, alone = asyncio.run(main())
    assert sorted(requests.cancelled) == [1, 2, 3]
    assert requests.running == 0 and alone


def test_a_caller_that_stops_reading_cancels_the_rest():
    async def main():
        requests = Requests()
        async with aclosing(completed(requests, range(5))) as stream:
            await _settle()
            requests.finish(3)
            assert await anext(stream) == (3, "r3")
        return requests, _no_other_tasks()

    requests, alone = asyncio.run(main())
    assert sorted(requests.cancelled) == [0, 1, 2, 4]
    assert requests.running == 0 and alone


def test_cancelling_the_caller_as_ctrl_c_does_cancels_every_request():
    async def main():
        requests = Requests()
        job = asyncio.ensure_future(ordered(requests, range(4), limit=3))
        await _settle()
        job.cancel()  # what asyncio.run does to the main task on SIGINT
        with pytest.raises(asyncio.CancelledError):
            await job
        return requests, _no_other_tasks()

    requests, alone = asyncio.run(main())
    assert sorted(requests.cancelled) == [0, 1, 2]
    assert requests.started == [0, 1, 2]  # the fourth never started
    assert requests.running == 0 and alone


def test_no_items_no_requests_and_a_limit_below_one_is_refused():
    assert asyncio.run(ordered(Requests(), [])) == []
    with pytest.raises(ValueError, match="limit must be at least 1"):
        asyncio.run(ordered(Requests(), [1], limit=0))
