"""The OpenAI-compatible API, through the official `openai` client (and raw HTTP where the client hides things)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from .helpers import ADAPTER_SYSTEM_PROMPT, LONG_ANSWER_FORMAT, wait_idle

HI = [{"role": "user", "content": "What is in the handbook?"}]
# Where a server's errors end up: uvicorn's loggers do not propagate to the root (so caplog misses them), asyncio
# logs "Task exception was never retrieved", the app logs through doctune.*.
SERVER_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.asgi", "asyncio")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))  # with the traceback, when the record has one


@pytest.fixture()
def server_log() -> Iterator[_Lines]:
    """Everything the in-process server logs while the test runs, tracebacks included."""
    handler = _Lines()
    for name in SERVER_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    try:
        yield handler
    finally:
        for name in SERVER_LOGGERS:
            logging.getLogger(name).removeHandler(handler)


def assert_no_traceback(log: _Lines) -> None:
    time.sleep(0.5)  # the handler of a request whose client left ends a moment after the engine lets go of it
    text = "\n".join(log.lines)
    assert "Traceback" not in text and "InvalidStateError" not in text and " ERROR " not in text, text


def test_models_lists_the_base_and_each_adapter(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny", "docs", "plain"}
    assert models["docs"].model_extra["parent"] == "tiny"
    assert models["tiny"].model_extra["parent"] is None
    assert client.models.retrieve("plain").id == "plain"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize("model", ["tiny", "docs", "plain"])
def test_chat_with_base_and_adapters_by_name(client, model):
    reply = client.chat.completions.create(model=model, messages=HI, max_tokens=12, temperature=0)
    assert reply.model == model
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_adapters_answer_differently_from_the_base(client):
    answers = {
        model: client.chat.completions.create(model=model, messages=HI, max_tokens=16, temperature=0)
        .choices[0]
        .message.content
        for model in ("tiny", "docs", "plain")
    }
    assert len(set(answers.values())) == 3


def test_streaming_gives_the_same_answer_in_pieces(client):
    whole = client.chat.completions.create(model="docs", messages=HI, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(
        model="docs",
        messages=HI,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]

    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(pieces) > 1
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_event_stream_ends_with_done(server):
    body = {"model": "tiny", "messages": HI, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_adapter_system_prompt_is_used_when_the_client_sends_none(client):
    implicit = client.chat.completions.create(model="docs", messages=HI, max_tokens=16, temperature=0)
    explicit = client.chat.completions.create(
        model="docs",
        messages=[{"role": "system", "content": ADAPTER_SYSTEM_PROMPT}, *HI],
        max_tokens=16,
        temperature=0,
    )
    other = client.chat.completions.create(
        model="docs",
        messages=[{"role": "system", "content": "Reply in French."}, *HI],
        max_tokens=16,
        temperature=0,
    )
    assert implicit.choices[0].message.content == explicit.choices[0].message.content
    assert implicit.usage.prompt_tokens == explicit.usage.prompt_tokens
    assert other.usage.prompt_tokens != implicit.usage.prompt_tokens


def test_json_schema_response_format(client):
    schema = {
        "type": "object",
        "properties": {
            "question": {"type": "string", "pattern": "^[a-z ?]{1,40}$"},
            "n": {"type": "integer"},
        },
        "required": ["question", "n"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="plain",
        messages=HI,
        max_tokens=80,
        temperature=0.7,
        seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "q", "schema": schema}},
    )
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"question", "n"} and isinstance(value["n"], int)


def test_stop_sequences_and_seed(client):
    free = client.chat.completions.create(model="tiny", messages=HI, max_tokens=30, temperature=0)
    text = free.choices[0].message.content
    cut_at = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=30, temperature=0, stop=[cut_at]
    )
    assert stopped.choices[0].message.content == text[: text.index(cut_at)]
    assert stopped.choices[0].finish_reason == "stop"

    one, two = (
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=20, temperature=1.2, seed=11)
        .choices[0]
        .message.content
        for _ in range(2)
    )
    assert one == two


def test_errors_come_in_openai_format(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=HI)
    assert err.value.body["code"] == "model_not_found" and "tiny" in err.value.body["message"]

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=HI, temperature="hot")
    assert err.value.body["param"] == "temperature"

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=HI, extra_body={"frobnicate": True})
    assert "frobnicate" in err.value.body["message"]

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 5000}])
    assert err.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 8192 tokens" in err.value.body["message"]

    with pytest.raises(openai.BadRequestError, match="more than this server allows"):
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=100_000)

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=HI, seed=2**70, temperature=1)
    assert err.value.body["param"] == "seed"

    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.chat.completions.create(model="tiny", messages=HI, n=2)

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny",
            messages=HI,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "bogus"}},
            },
        )
    assert err.value.body["param"] == "response_format"


def test_raw_bad_bodies_get_400(server):
    url = server.url + "/v1/chat/completions"
    for body in (b"{not json", b"[1, 2]", b'{"model": "tiny"}', b'{"model": "tiny", "messages": []}'):
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, body
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, engine, server_log):
    wait_idle(engine)
    cancelled_before = engine.stats["cancelled"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="docs",
        messages=HI,
        max_tokens=400,
        temperature=0,
        stream=True,
        response_format=LONG_ANSWER_FORMAT,
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received >= 3:
            break
    stream.close()
    client.close()

    deadline = time.monotonic() + 10
    while engine.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.pending() == 0
    assert engine.stats["cancelled"] == cancelled_before + 1
    assert_no_traceback(server_log)  # and the server logged no error for the client that left


def test_a_client_that_disconnects_while_waiting_frees_its_slot(server, engine, server_log):
    wait_idle(engine)
    cancelled_before = engine.stats["cancelled"]
    body = {"model": "tiny", "messages": HI, "max_tokens": 3000, "response_format": LONG_ANSWER_FORMAT}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=1.0))

    deadline = time.monotonic() + 10
    while engine.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.pending() == 0  # 2000+ tokens were asked for; the request stopped when its client left
    assert engine.stats["cancelled"] == cancelled_before + 1
    assert_no_traceback(server_log)  # no "InvalidStateError: Result is not set" on a client that leaves


@pytest.mark.slow
def test_32_concurrent_clients_all_get_answers_in_shared_batches(server, engine):
    wait_idle(engine)
    batches_before, rows_before = engine.stats["batches"], engine.stats["rows"]

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        models = ["tiny", "docs", "plain"]

        async def one(i):
            if i % 2:
                reply = await client.chat.completions.create(
                    model=models[i % 3],
                    messages=[{"role": "user", "content": f"Question {i}?"}],
                    max_tokens=16,
                )
                return reply.choices[0].message.content, reply.usage.completion_tokens
            stream = await client.chat.completions.create(
                model=models[i % 3],
                messages=[{"role": "user", "content": f"Question {i}?"}],
                max_tokens=16,
                stream=True,
            )
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return "".join(parts), None

        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 32
    assert all(tokens is None or 1 <= tokens <= 16 for _, tokens in results)
    batches = engine.stats["batches"] - batches_before
    assert engine.stats["rows"] - rows_before >= 32
    assert batches < 16  # 32 requests shared forward passes, not one call each
