"""The response cache: hits skip the server, failures are asked again, answers survive SIGKILL."""

from __future__ import annotations

import asyncio
import doctest
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support.fake_openai import FakeOpenAIServer, FaultPlan, Reply, prompt_key

from doctune.config import ModelConfig
from doctune.llm import cache as cache_module
from doctune.llm.base import Completion, RequestFailed
from doctune.llm.cache import CachedLLM, ResponseCache, cache_key
from doctune.llm.openai_backend import OpenAIBackend

KEY_ENV = "DOCTUNE_TEST_API_KEY"
SECRET = "sk-doctune-test-SECRET-cache-0a1b2c"
REPO = Path(__file__).resolve().parents[2]


def cached_llm(base_url: str, path: Path, **fields: Any) -> CachedLLM:
    cfg = ModelConfig(backend="openai", model="fake-model", base_url=base_url, api_key_env=KEY_ENV, **fields)
    return CachedLLM(OpenAIBackend(cfg, backoff_base=0.01), ResponseCache(path))


def ask(n: int, tag: str = "q") -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{tag} {i}"}] for i in range(n)]


async def chat_all(llm: CachedLLM, prompts: list, **kw: Any) -> list[Any]:
    kw.setdefault("max_tokens", 16)
    try:
        return await asyncio.gather(*(llm.chat(m, **kw) for m in prompts), return_exceptions=True)
    finally:
        await llm.aclose()


def test_doctests():
    assert doctest.testmod(cache_module).failed == 0


def test_key_depends_on_every_part_of_the_request():
    messages = [{"role": "user", "content": "hi"}]
    params = {"max_tokens": 5, "temperature": 0.0, "stop": None}
    base = cache_key("m", messages, params, None)
    assert base == cache_key("m", [{"content": "hi", "role": "user"}], dict(reversed(params.items())), None)
    variants = [
        cache_key("other", messages, params, None),
        cache_key("m", [{"role": "user", "content": "hi!"}], params, None),
        cache_key("m", messages, {**params, "max_tokens": 6}, None),
        cache_key("m", messages, {**params, "temperature": 0.7}, None),
        cache_key("m", messages, params, {"type": "object"}),
    ]
    assert len({base, *variants}) == 6


def test_second_ask_is_a_hit_without_a_request(tmp_path):
    path = tmp_path / "cache.sqlite"
    with FakeOpenAIServer(reply=lambda req: "answer " + req["messages"][0]["content"]) as srv:
        first = asyncio.run(chat_all(cached_llm(srv.base_url, path), ask(5)))
        second = asyncio.run(chat_all(cached_llm(srv.base_url, path), ask(5)))
        sent = srv.total_requests()
    assert [r.text for r in first] == [r.text for r in second] == [f"answer q {i}" for i in range(5)]
    assert [r.cached for r in first] == [False] * 5 and [r.cached for r in second] == [True] * 5
    assert [(r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in first] == [
        (r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in second
    ]
    assert sent == 5


def test_a_different_request_is_a_miss(tmp_path):
    path = tmp_path / "cache.sqlite"
    schema = {"type": "object"}
    with FakeOpenAIServer() as srv:
        asyncio.run(chat_all(cached_llm(srv.base_url, path), ask(1)))
        variants = [{"max_tokens": 17}, {"temperature": 0.5}, {"json_schema": schema}, {"stop": ["\n"]}]
        for kw in variants:
            [reply] = asyncio.run(chat_all(cached_llm(srv.base_url, path), ask(1), **kw))
            assert reply.cached is False
        assert srv.total_requests() == 1 + len(variants)


def test_failed_requests_are_not_cached_and_asked_again(tmp_path):
    path = tmp_path / "cache.sqlite"
    calls: Counter[str] = Counter()

    def reply(request: dict[str, Any]) -> str | Reply:
        key = prompt_key(request["messages"])
        calls[key] += 1
        return Reply(status=400, message="try later") if calls[key] == 1 else "fine"

    with FakeOpenAIServer(reply=reply) as srv:
        [failed] = asyncio.run(chat_all(cached_llm(srv.base_url, path), ask(1)))
        [answered] = asyncio.run(chat_all(cached_llm(srv.base_url, path), ask(1)))
        [hit] = asyncio.run(chat_all(cached_llm(srv.base_url, path), ask(1)))
        assert srv.total_requests() == 2
    assert isinstance(failed, RequestFailed)
    assert answered.text == "fine" and not answered.cached
    assert hit.text == "fine" and hit.cached


def test_a_rerun_sends_only_what_never_got_an_answer(tmp_path):
    """A faulty server and few retries leave some requests unanswered; the rerun asks exactly those."""
    path = tmp_path / "cache.sqlite"
    prompts = ask(120)
    plan = FaultPlan(rate_500=0.25, rate_drop=0.1, rate_invalid_json=0.1)
    with FakeOpenAIServer(faults=plan, seed=3) as srv:
        first = asyncio.run(chat_all(cached_llm(srv.base_url, path, max_retries=1), prompts))
        failed = [prompt_key(m) for m, r in zip(prompts, first, strict=True) if isinstance(r, RequestFailed)]
        assert 0 < len(failed) < len(prompts)
        before = Counter(srv.requests_per_prompt)
        second = asyncio.run(chat_all(cached_llm(srv.base_url, path, max_retries=6), prompts))
        asked_again = {k for k, n in srv.requests_per_prompt.items() if n > before[k]}
        assert asked_again == set(failed)
        assert max(srv.answered_per_prompt.values()) == 1  # no answered request was ever sent again
    assert all(isinstance(r, Completion) for r in second)
    assert sum(r.cached for r in second) == len(prompts) - len(failed)


def test_forget_makes_the_next_ask_go_to_the_server(tmp_path):
    path = tmp_path / "cache.sqlite"
    with FakeOpenAIServer() as srv:
        asyncio.run(chat_all(cached_llm(srv.base_url, path), ask(2)))
        llm = cached_llm(srv.base_url, path)
        llm.forget(ask(1)[0], max_tokens=16)
        replies = asyncio.run(chat_all(llm, ask(2)))
        assert srv.total_requests() == 3
    assert [r.cached for r in replies] == [False, True]


def test_no_cache_is_a_transparent_wrapper(tmp_path):
    cfg = ModelConfig(backend="openai", model="fake-model", base_url="http://unused/v1")
    with FakeOpenAIServer() as srv:
        cfg = cfg.model_copy(update={"base_url": srv.base_url})
        llm = CachedLLM(OpenAIBackend(cfg), None)
        asyncio.run(chat_all(llm, ask(1)))
        replies = asyncio.run(chat_all(CachedLLM(OpenAIBackend(cfg), None), ask(1)))
        assert srv.total_requests() == 2 and not replies[0].cached
    assert list(tmp_path.iterdir()) == []


def test_the_file_appears_only_when_used(tmp_path):
    path = tmp_path / "run" / "cache.sqlite"
    cache = ResponseCache(path)
    cache.close()
    assert not path.parent.exists()
    with ResponseCache(path) as cache:
        assert cache.get("nothing") is None
    assert path.is_file()


def test_many_concurrent_writers_and_readers(tmp_path):
    path = tmp_path / "cache.sqlite"
    with ResponseCache(path) as cache:
        for i in range(2000):
            cache.put(f"k{i}", "m", Completion(text=f"t{i}", prompt_tokens=i, completion_tokens=1))
            assert cache.get(f"k{i}").text == f"t{i}"  # readable at once, committed or not
        assert len(cache) == 2000
    with ResponseCache(path) as cache:
        got = cache.get("k1234")
    assert (got.text, got.prompt_tokens, got.cached) == ("t1234", 1234, True)


KILLED_WRITER = """
import sys, time
sys.path.insert(0, {src!r})
from doctune.llm.base import Completion
from doctune.llm.cache import ResponseCache

cache = ResponseCache({path!r})
for i in range({n}):
    cache.put(f"k{{i}}", "m", Completion(text=f"answer {{i}}", prompt_tokens=3, completion_tokens=4))
print("stored", flush=True)
time.sleep(60)
"""


def test_answers_survive_sigkill_a_second_after_put(tmp_path):
    path = tmp_path / "cache.sqlite"
    code = textwrap.dedent(KILLED_WRITER.format(src=str(REPO / "src"), path=str(path), n=500))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stored"
        time.sleep(1.0)  # the promise: committed within a second of put()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    with ResponseCache(path) as cache:
        assert len(cache) == 500
        last = cache.get("k499")
    assert (last.text, last.prompt_tokens, last.completion_tokens) == ("answer 499", 3, 4)


def test_the_api_key_is_in_no_file_and_no_log(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "cache.sqlite"
    with FakeOpenAIServer(api_key=SECRET, faults=FaultPlan(rate_500=0.3)) as srv:
        replies = asyncio.run(chat_all(cached_llm(srv.base_url, path), ask(20)))
        assert srv.headers_seen[0]["authorization"] == f"Bearer {SECRET}"
    assert all(isinstance(r, Completion) for r in replies)
    files = list(tmp_path.iterdir())
    assert path in files
    for f in files:
        assert SECRET.encode() not in f.read_bytes(), f
    assert caplog.text and SECRET not in caplog.text


# ------------------------------------------------------------------------------ identical requests in flight


class CountingLLM:
    """A backend that answers after `delay` seconds and counts its calls; `fail` makes every call fail."""

    name = "counting"

    def __init__(self, delay: float = 0.2, fail: bool = False):
        self.delay = delay
        self.fail = fail
        self.calls = 0
        self.finished = 0

    async def chat(self, messages: list[dict[str, Any]], **kw: Any) -> Completion:
        self.calls += 1
        call = self.calls
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RequestFailed(f"HTTP 503 on call {call}", status=503)
        self.finished += 1
        return Completion(text=f"answer {call}", prompt_tokens=7, completion_tokens=3, finish_reason="stop")

    async def preflight(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


SAME = [{"role": "user", "content": "the same question"}]


def test_identical_requests_in_flight_are_sent_once(tmp_path):
    inner = CountingLLM()
    llm = CachedLLM(inner, ResponseCache(tmp_path / "cache.sqlite"))
    replies = asyncio.run(chat_all(llm, [SAME] * 3 + [ask(1)[0]]))
    assert inner.calls == 2  # the three identical ones shared one call
    assert [r.text for r in replies[:3]] == ["answer 1"] * 3
    assert [r.cached for r in replies] == [False, True, True, False]  # the sharers cost nothing
    assert {(r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in replies} == {(7, 3, "stop")}
    assert llm.cache.coalesced == 2 and len(ResponseCache(tmp_path / "cache.sqlite")) == 2


def test_a_failure_reaches_every_waiter_is_not_stored_and_the_next_call_asks_again(tmp_path):
    inner = CountingLLM(fail=True)
    path = tmp_path / "cache.sqlite"
    failed = asyncio.run(chat_all(CachedLLM(inner, ResponseCache(path)), [SAME] * 3))
    assert inner.calls == 1
    assert [type(r) for r in failed] == [RequestFailed] * 3
    assert {r.reason for r in failed} == {"HTTP 503 on call 1"}

    inner.fail = False
    llm = CachedLLM(inner, ResponseCache(path))
    [reply] = asyncio.run(chat_all(llm, [SAME]))
    assert inner.calls == 2 and reply.text == "answer 2" and reply.cached is False
    assert llm.cache.coalesced == 0


def test_a_cancelled_waiter_does_not_cancel_the_request_for_the_others(tmp_path):
    inner = CountingLLM(delay=0.3)
    llm = CachedLLM(inner, ResponseCache(tmp_path / "cache.sqlite"))

    async def main() -> list[Any]:
        tasks = [asyncio.create_task(llm.chat(SAME, max_tokens=16)) for _ in range(3)]
        await asyncio.sleep(0.05)
        tasks[0].cancel()  # the one that started the request goes away
        try:
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await llm.aclose()

    first, second, third = asyncio.run(main())
    assert isinstance(first, asyncio.CancelledError)
    assert second.text == third.text == "answer 1" and inner.calls == 1 and inner.finished == 1


def test_a_request_every_waiter_left_is_cancelled(tmp_path):
    inner = CountingLLM(delay=0.5)
    llm = CachedLLM(inner, ResponseCache(tmp_path / "cache.sqlite"))

    async def main() -> None:
        tasks = [asyncio.create_task(llm.chat(SAME, max_tokens=16)) for _ in range(2)]
        await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.7)  # longer than the backend takes: had the request lived on, it would finish
        await llm.aclose()

    asyncio.run(main())
    assert inner.calls == 1 and inner.finished == 0


def test_three_identical_chunks_cost_one_request_in_doctune_generate(tmp_path):
    same = "The relay listens on port 7300 unless LUMEN_PORT says otherwise."
    texts = [same, "The Team edition costs 6 euros per user per month.", same, same]
    rows = [
        {"chunk_id": f"doc{i}.md#0000", "doc": f"doc{i}.md", "doc_sha256": "0" * 64, "pages": None}
        | {"char_start": 0, "char_end": len(t), "n_tokens": 16, "text": t}
        for i, t in enumerate(texts)
    ]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "chunks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def reply(request: dict[str, Any]) -> dict[str, Any]:
        chunk = request["messages"][-1]["content"]
        return {"pairs": [{"question": f"What does «{chunk[:20]}» say?", "answer": chunk}]}

    with FakeOpenAIServer(reply, latency=0.3) as srv:
        model = {"backend": "openai", "base_url": srv.base_url, "model": "fake-model", "api_key_env": None}
        cfg = {
            "run_dir": str(run_dir),
            "models": {"teacher": model, "judge": model, "student": {"backend": "hf", "model": "unused"}},
            "generate": {"total_questions": 4, "max_tokens": 256},
        }
        path = tmp_path / "doctune.yaml"
        path.write_text(json.dumps(cfg), encoding="utf-8")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
        proc = subprocess.run(
            [sys.executable, "-m", "doctune", "generate", "-c", str(path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        sent = Counter(r["messages"][-1]["content"] for r in srv.received)
    assert proc.returncode == 0, proc.stderr
    assert sent == {same: 1, texts[1]: 1}  # the server saw the repeated chunk once
    pairs = [json.loads(line) for line in (run_dir / "qa_raw.jsonl").read_text().splitlines()]
    assert sorted(p["chunk_id"] for p in pairs) == [f"doc{i}.md#0000" for i in range(4)]  # still a pair each
    manifest = json.loads((run_dir / "manifest.json").read_text())
    counts = manifest["stages"]["generate"]["counts"]
    assert counts["requests"] == 4 and counts["requests_coalesced"] == 2 and counts["requests_cached"] == 0
    assert "shared with an identical request" in proc.stdout + proc.stderr
