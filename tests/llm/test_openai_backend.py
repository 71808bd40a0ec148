"""The openai backend against a real HTTP server on 127.0.0.1 (tests/support/fake_openai.py)."""

from __future__ import annotations

import asyncio
import doctest
import logging
import time
from collections import Counter
from typing import Any

import pytest
from tests.support.fake_openai import (
    EXTRA_FAULT_KINDS,
    FAULT_KINDS,
    FakeOpenAIServer,
    FaultPlan,
    Reply,
    SilentServer,
    prompt_key,
    unused_port,
)

from doctune.config import ModelConfig
from doctune.errors import LLMError
from doctune.llm import openai_backend
from doctune.llm.base import Completion, RequestFailed
from doctune.llm.openai_backend import OpenAIBackend

KEY_ENV = "DOCTUNE_TEST_API_KEY"
SECRET = "sk-doctune-test-SECRET-9f8e7d"


def model_cfg(base_url: str | list[str], **fields: Any) -> ModelConfig:
    return ModelConfig(backend="openai", model="fake-model", base_url=base_url, api_key_env=KEY_ENV, **fields)


def ask(n: int, tag: str = "q") -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{tag} {i}"}] for i in range(n)]


async def chat_all(llm: OpenAIBackend, prompts: list, **kw: Any) -> list[Any]:
    kw.setdefault("max_tokens", 16)
    try:
        return await asyncio.gather(*(llm.chat(m, **kw) for m in prompts), return_exceptions=True)
    finally:
        await llm.aclose()


def once_then_ok(first: Reply):
    """A reply function that answers `first` to the first request of each prompt and "ok" afterwards."""
    seen: Counter[str] = Counter()

    def reply(request: dict[str, Any]) -> str | Reply:
        key = prompt_key(request["messages"])
        seen[key] += 1
        return first if seen[key] == 1 else "ok"

    return reply


def test_doctests():
    assert doctest.testmod(openai_backend).failed == 0


def test_chat_returns_the_servers_answer_and_usage():
    with FakeOpenAIServer(reply=lambda req: "Paris is the capital.") as srv:
        llm = OpenAIBackend(model_cfg(srv.base_url))
        [reply] = asyncio.run(chat_all(llm, ask(1)))
    assert isinstance(reply, Completion)
    assert reply.text == "Paris is the capital."
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0
    assert reply.finish_reason == "stop" and reply.cached is False
    sent = srv.received[0]
    assert sent["model"] == "fake-model" and sent["max_tokens"] == 16 and sent["temperature"] == 0.0


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("json_schema", {"type": "json_schema", "json_schema": {"name": "reply", "strict": True}}),
        ("json_object", {"type": "json_object"}),
        ("none", None),
    ],
)
def test_response_format_follows_structured_output(mode, expected):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    with FakeOpenAIServer(reply=lambda req: {"a": 1}) as srv:
        llm = OpenAIBackend(model_cfg(srv.base_url, structured_output=mode))
        [reply] = asyncio.run(chat_all(llm, ask(1), json_schema=schema))
        [plain] = asyncio.run(chat_all(OpenAIBackend(model_cfg(srv.base_url)), ask(1, "plain")))
    assert reply.text == '{"a": 1}' and isinstance(plain, Completion)
    sent, sent_plain = srv.received
    if expected is None:
        assert "response_format" not in sent
    elif mode == "json_schema":
        fmt = sent["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == schema
        assert {k: fmt["json_schema"][k] for k in ("name", "strict")} == expected["json_schema"]
    else:
        assert sent["response_format"] == expected
    assert "response_format" not in sent_plain  # no schema, no response_format


def test_stop_sequences_are_sent():
    with FakeOpenAIServer() as srv:
        asyncio.run(chat_all(OpenAIBackend(model_cfg(srv.base_url)), ask(1), stop=["\n\n"]))
    assert srv.received[0]["stop"] == ["\n\n"]


def test_retry_after_is_honoured():
    first = Reply(status=429, message="slow down", headers={"retry-after": "1"})
    with FakeOpenAIServer(reply=once_then_ok(first)) as srv:
        llm = OpenAIBackend(model_cfg(srv.base_url), backoff_base=0.01)
        [reply] = asyncio.run(chat_all(llm, ask(1)))
        waited = srv.arrivals[1] - srv.arrivals[0]
    assert reply.text == "ok"
    assert 1.0 <= waited < 3.0, waited  # the server's 1 s, not the 0.01 s backoff (loose: busy machines)


def test_retry_after_ms_on_503_is_honoured():
    first = Reply(status=503, message="overloaded", headers={"retry-after-ms": "400"})
    with FakeOpenAIServer(reply=once_then_ok(first)) as srv:
        [reply] = asyncio.run(chat_all(OpenAIBackend(model_cfg(srv.base_url), backoff_base=0.01), ask(1)))
        waited = srv.arrivals[1] - srv.arrivals[0]
    assert reply.text == "ok" and 0.4 <= waited < 2.0, waited


def test_retry_after_is_capped():
    first = Reply(status=429, message="come back tomorrow", headers={"retry-after": "86400"})
    with FakeOpenAIServer(reply=once_then_ok(first)) as srv:
        llm = OpenAIBackend(model_cfg(srv.base_url), retry_after_cap=0.2)
        [reply] = asyncio.run(chat_all(llm, ask(1)))
    assert reply.text == "ok"


def test_backoff_grows_without_retry_after():
    with FakeOpenAIServer(faults=FaultPlan(rate_500=1.0)) as srv:
        llm = OpenAIBackend(model_cfg(srv.base_url, max_retries=3), backoff_base=0.1)
        [failed] = asyncio.run(chat_all(llm, ask(1)))
        gaps = [b - a for a, b in zip(srv.arrivals, srv.arrivals[1:], strict=False)]
    assert isinstance(failed, RequestFailed)
    assert len(gaps) == 3
    # jittered in [0.5, 1] x 0.1 * 2**k
    for k, gap in enumerate(gaps):
        assert 0.05 * 2**k - 0.01 <= gap <= 0.1 * 2**k + 0.5, gaps


@pytest.mark.parametrize("kind", [*FAULT_KINDS, *EXTRA_FAULT_KINDS])
def test_every_fault_kind_is_retried_then_reported(kind):
    plan = FaultPlan(**{f"rate_{kind}": 1.0}, slow_s=1.0)
    with FakeOpenAIServer(faults=plan) as srv:
        timeout = 0.3 if kind in ("slow", "stall") else 10.0
        llm = OpenAIBackend(model_cfg(srv.base_url, max_retries=2, timeout=timeout), backoff_base=0.01)
        [failed] = asyncio.run(chat_all(llm, ask(1)))
        sent = srv.total_requests()
    assert isinstance(failed, RequestFailed), failed
    assert sent == 3  # first try + max_retries
    assert "gave up after 3 attempts" in failed.reason and srv.base_url in failed.reason
    assert "\n" not in failed.reason
    if kind in ("429", "500", "503"):
        assert failed.status == int(kind)
    if kind in ("invalid_json", "wrong_shape", "empty_choices"):
        assert failed.raw  # the raw reply is kept for the failures file


@pytest.mark.parametrize("status", [400, 422])
def test_request_errors_fail_at_once_with_the_servers_message(status):
    reply = Reply(status=status, message="This model's maximum context length is 8192 tokens.")
    with FakeOpenAIServer(reply=lambda req: reply) as srv:
        [failed] = asyncio.run(chat_all(OpenAIBackend(model_cfg(srv.base_url)), ask(1)))
    assert isinstance(failed, RequestFailed) and failed.status == status
    assert "maximum context length is 8192" in failed.reason
    assert srv.total_requests() == 1


def test_bad_key_fails_the_run_naming_url_and_env_var_never_the_key(monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer(api_key="the-right-key") as srv:
        llm = OpenAIBackend(model_cfg(srv.base_url))
        errors = asyncio.run(chat_all(llm, ask(3)))
        with pytest.raises(LLMError) as pre:
            asyncio.run(llm.preflight())
        assert srv.total_requests() == 3  # no retries
    for exc in [*errors, pre.value]:
        assert isinstance(exc, LLMError)
        message = str(exc)
        assert "401" in message and srv.base_url in message and KEY_ENV in message
        assert "Incorrect API key" in message  # the server's own words
        assert SECRET not in message
    assert srv.headers_seen[0]["authorization"] == f"Bearer {SECRET}"  # the key was sent...
    assert SECRET not in caplog.text  # ...and never logged, not even at DEBUG by the SDK or httpx


def test_unset_key_env_sends_a_placeholder_and_says_the_variable_is_unset(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with FakeOpenAIServer(api_key="needed") as srv:
        [error] = asyncio.run(chat_all(OpenAIBackend(model_cfg(srv.base_url)), ask(1)))
    assert isinstance(error, LLMError) and f"${KEY_ENV}, which is not set" in str(error)
    assert srv.headers_seen[0]["authorization"] == "Bearer EMPTY"


def test_unknown_model_is_a_run_error_naming_the_model():
    with FakeOpenAIServer(models=["other-model"]) as srv:
        [error] = asyncio.run(chat_all(OpenAIBackend(model_cfg(srv.base_url)), ask(1)))
        with pytest.raises(LLMError, match="not served there \\(served: other-model\\)"):
            asyncio.run(OpenAIBackend(model_cfg(srv.base_url)).preflight())
    assert isinstance(error, LLMError)
    assert "404" in str(error) and "'fake-model'" in str(error) and srv.base_url in str(error)


def test_requests_go_round_robin_over_base_urls():
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        llm = OpenAIBackend(model_cfg([a.base_url, b.base_url]))
        replies = asyncio.run(chat_all(llm, ask(20)))
        assert all(isinstance(r, Completion) for r in replies)
        assert a.total_requests() == b.total_requests() == 10


def test_a_dead_replica_costs_retries_not_answers():
    with FakeOpenAIServer() as alive:
        dead = f"http://127.0.0.1:{unused_port()}/v1"
        llm = OpenAIBackend(model_cfg([dead, alive.base_url]), backoff_base=0.01)
        replies = asyncio.run(chat_all(llm, ask(10)))
    assert all(isinstance(r, Completion) for r in replies), replies


def test_concurrency_bound_is_respected():
    with FakeOpenAIServer(latency=0.05) as srv:
        llm = OpenAIBackend(model_cfg(srv.base_url, max_concurrency=5))
        replies = asyncio.run(chat_all(llm, ask(40)))
    assert all(isinstance(r, Completion) for r in replies)
    assert srv.max_in_flight == 5


def _arrivals_under_limit(prompts: list, **fields: Any) -> list[float]:
    """Seconds from the start of the run to each request's arrival at the server, all answered."""
    max_tokens = fields.pop("max_tokens", 16)
    with FakeOpenAIServer() as srv:
        llm = OpenAIBackend(model_cfg(srv.base_url, **fields))
        t0 = time.monotonic()
        replies = asyncio.run(chat_all(llm, prompts, max_tokens=max_tokens))
        assert all(isinstance(r, Completion) for r in replies)
        return [t - t0 for t in sorted(srv.arrivals)]


def assert_paced(arrivals: list[float], burst: int, per_second: float) -> None:
    """No request before a leaky bucket of `burst` draining at `per_second` lets it through, and not
    grossly later (the upper bound is loose: the machine may be busy)."""
    assert len(arrivals) > burst + 10
    for k, t in enumerate(arrivals):
        assert t >= (k + 1 - burst) / per_second - 0.02, (k, t)
    ideal = (len(arrivals) - burst) / per_second
    assert arrivals[-1] < ideal + 3.0


def test_requests_per_minute_limit():
    # 600/min: a bucket of one second's budget (10 requests) that refills at 10/s
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(30)]
    assert_paced(_arrivals_under_limit(prompts, requests_per_minute=600), burst=10, per_second=10)


def test_tokens_per_minute_limit():
    # each request counts 40 chars / 4 = 10 prompt tokens + 90 max_tokens = 100;
    # 60000/min = 1000 tokens/s, so again 10 requests at once, then 10 per second
    prompts = [[{"role": "user", "content": f"{i:040d}"}] for i in range(30)]
    arrivals = _arrivals_under_limit(prompts, tokens_per_minute=60_000, max_tokens=90)
    assert_paced(arrivals, burst=10, per_second=10)


def test_preflight_passes_on_a_healthy_server():
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        asyncio.run(OpenAIBackend(model_cfg([a.base_url, b.base_url])).preflight())
        assert a.outcomes == Counter() and len(a.headers_seen) == len(b.headers_seen) == 1  # one GET /models


def test_unreachable_server_fails_preflight_within_seconds_naming_the_url():
    url = f"http://127.0.0.1:{unused_port()}/v1"
    t0 = time.monotonic()
    with pytest.raises(LLMError) as err:
        asyncio.run(OpenAIBackend(model_cfg(url), label="models.teacher").preflight())
    assert time.monotonic() - t0 < 5
    message = str(err.value)
    assert (
        message.startswith(url) and "is the server running?" in message and "vllm serve fake-model" in message
    )
    assert "\n" not in message


def test_hung_server_fails_preflight_after_the_short_timeout():
    with SilentServer() as silent:
        llm = OpenAIBackend(model_cfg(silent.base_url, timeout=120))
        llm.preflight_timeout = 0.5
        t0 = time.monotonic()
        with pytest.raises(LLMError, match=r"no answer to GET /models within 0\.5 s"):
            asyncio.run(llm.preflight())
        assert time.monotonic() - t0 < 5


@pytest.mark.slow
def test_with_30_percent_faults_every_request_ends_as_an_answer_or_a_request_failure():
    def reply(request: dict[str, Any]) -> str:
        return "echo " + request["messages"][0]["content"]

    plan = FaultPlan.uniform(0.3, slow_s=2.0, retry_after="0")
    with FakeOpenAIServer(reply=reply, faults=plan, seed=7) as srv:
        llm = OpenAIBackend(model_cfg(srv.base_url, max_retries=3, timeout=1.0), backoff_base=0.01)
        prompts = ask(200)
        results = asyncio.run(chat_all(llm, prompts))
        answered = Counter(srv.answered_per_prompt)
        faults = sum(n for outcome, n in srv.outcomes.items() if outcome != "ok")
    unexpected = [r for r in results if not isinstance(r, Completion | RequestFailed)]
    assert unexpected == []
    answers = [(m, r) for m, r in zip(prompts, results, strict=True) if isinstance(r, Completion)]
    assert all(r.text == "echo " + m[0]["content"] for m, r in answers)  # every answer is its own prompt's
    assert all(answered[prompt_key(m)] >= 1 for m, _ in answers)  # and the server did send it
    assert len(answers) >= 180  # a prompt fails only if all 4 tries do: 0.3**4, about 2 of 200
    assert faults > 40
    failures = [r for r in results if isinstance(r, RequestFailed)]
    assert all("gave up after 4 attempts" in f.reason for f in failures)


def test_backend_works_across_event_loops():
    with FakeOpenAIServer() as srv:
        llm = OpenAIBackend(model_cfg(srv.base_url))
        first = asyncio.run(llm.chat(ask(1)[0], max_tokens=5))
        second = asyncio.run(llm.chat(ask(1)[0], max_tokens=5))
        asyncio.run(llm.aclose())
    assert first.text == second.text


def test_preflight_accepts_ollamas_latest_tag():
    with FakeOpenAIServer(models=["fake-model:latest"]) as srv:
        asyncio.run(OpenAIBackend(model_cfg(srv.base_url)).preflight())


# ------------------------------------------------------------------------------------------ streaming


def test_requests_stream_and_the_pieces_make_one_completion():
    answer = "Lumen Relay listens on port 7300 by default."
    with FakeOpenAIServer(reply=lambda req: answer) as srv:
        [streamed] = asyncio.run(chat_all(OpenAIBackend(model_cfg(srv.base_url)), ask(1)))
    sent = srv.received[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert streamed.text == answer and streamed.finish_reason == "stop"
    # the usage chunk's counts (the fake server counts 4 characters a token)
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (len("q 0") // 4 + 1, len(answer) // 4 + 1)


def test_stream_false_sends_whole_requests():
    answer = "Lumen Relay listens on port 7300 by default."
    with FakeOpenAIServer(reply=lambda req: answer) as srv:
        [whole] = asyncio.run(chat_all(OpenAIBackend(model_cfg(srv.base_url, stream=False)), ask(1)))
    assert not srv.received[0].get("stream")
    assert whole.text == answer and whole.finish_reason == "stop"


def test_a_stream_without_usage_counts_its_content_deltas():
    answer = "one two three four five"
    with FakeOpenAIServer(reply=lambda req: Reply(answer, finish_reason="length"), stream_usage=False) as srv:
        [reply] = asyncio.run(chat_all(OpenAIBackend(model_cfg(srv.base_url)), ask(1)))
    assert reply.text == answer and reply.finish_reason == "length"
    assert reply.completion_tokens == 5 and reply.prompt_tokens == 0  # 5 word deltas; the prompt's is unknown


def test_a_server_that_rejects_streaming_gets_whole_requests():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    with FakeOpenAIServer(reply=lambda req: {"a": 1}, streaming=False) as srv:
        llm = OpenAIBackend(model_cfg(srv.base_url))

        async def main() -> list[Any]:
            first = await llm.chat(ask(1)[0], max_tokens=16, json_schema=schema)
            return [first, *await chat_all(llm, ask(3, "later"), json_schema=schema)]

        replies = asyncio.run(main())
    assert [r.text for r in replies] == ['{"a": 1}'] * 4
    assert [bool(r.get("stream")) for r in srv.received] == [True, False, False, False, False]  # asked once
    assert all(r["response_format"]["json_schema"]["schema"] == schema for r in srv.received)


def test_a_slow_server_that_keeps_streaming_is_not_cut_off():
    answer = " ".join(f"w{i}" for i in range(10))  # 10 pieces, one every 0.3 s: 3 s in all
    with FakeOpenAIServer(reply=lambda req: answer, stream_interval=0.3) as srv:
        llm = OpenAIBackend(model_cfg(srv.base_url, timeout=1.0, max_retries=2), backoff_base=0.01)
        t0 = time.monotonic()
        [reply] = asyncio.run(chat_all(llm, ask(1)))
        took = time.monotonic() - t0
    assert isinstance(reply, Completion), reply
    assert reply.text == answer and took >= 3.0
    assert srv.total_requests() == 1  # three times the timeout, and never sent again


def test_a_server_that_accepts_and_sends_nothing_fails_after_the_timeout_and_is_retried():
    with SilentServer() as silent:
        llm = OpenAIBackend(model_cfg(silent.base_url, timeout=0.5, max_retries=1), backoff_base=0.01)
        t0 = time.monotonic()
        [failed] = asyncio.run(chat_all(llm, ask(1)))
        took = time.monotonic() - t0
    assert isinstance(failed, RequestFailed), failed
    assert "nothing received for 0.5 s" in failed.reason and "gave up after 2 attempts" in failed.reason
    assert 1.0 <= took < 5.0, took  # two attempts of 0.5 s each (loose above: a busy machine)


def test_a_stream_that_stalls_half_way_is_retried():
    first = Reply("this answer stops after its first word", stall=3.0)
    with FakeOpenAIServer(reply=once_then_ok(first)) as srv:
        llm = OpenAIBackend(model_cfg(srv.base_url, timeout=0.5), backoff_base=0.01)
        t0 = time.monotonic()
        [reply] = asyncio.run(chat_all(llm, ask(1)))
        took = time.monotonic() - t0
    assert isinstance(reply, Completion) and reply.text == "ok"
    assert srv.total_requests() == 2 and took < 2.5, took  # given up after 0.5 s of silence, not 3 s
