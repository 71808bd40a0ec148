"""A real OpenAI-compatible HTTP server on 127.0.0.1, for tests and benchmarks, with fault injection.

```python
from tests.support.fake_openai import FakeOpenAIServer, FaultPlan, Reply

with FakeOpenAIServer(reply=lambda req: {"pairs": []}, latency=0.25, faults=FaultPlan.uniform(0.3)) as srv:
    ...  # point a client at srv.base_url ("http://127.0.0.1:PORT/v1")
    srv.requests_per_prompt[prompt_key(messages)], srv.answered_per_prompt[...], srv.max_in_flight
```

It serves `GET /v1/models` and `POST /v1/chat/completions` over HTTP/1.1 with keep-alive, from one asyncio loop
in a background thread (one loop serves many connections for little CPU: ~200 req/s with 64 clients and 250 ms
latency on two cores). `reply(request_json)` gives the answer: a str is the message content, a dict or list is
sent as its JSON text, a `Reply(status=...)` is an error answer with its message and headers.
With `api_key` set, a request without `Authorization: Bearer KEY` gets 401; a model not in `models` gets 404.

A request with `"stream": true` gets server-sent events as vLLM sends them (chunked transfer encoding): a role
chunk, the content in word-sized pieces (`stream_interval` seconds before each), a finish_reason chunk, a usage
chunk when `stream_options.include_usage` asks for it (and `stream_usage` is True), then `data: [DONE]`.
`streaming=False` makes the server reject streaming requests with a 400 naming `stream` (as some servers do).

Counters (read them after the requests are done): `requests_per_prompt` and `answered_per_prompt` (good 200
replies) keyed by `prompt_key(messages)`, `outcomes` ("ok", a fault kind or a status), `received` (request
bodies), `arrivals` (time.monotonic() of each chat request), `headers_seen`, `max_in_flight`.

Faults are drawn per request, deterministically from (seed, the request's messages, how many times that prompt
was asked before), so a retry of a request can get a different outcome than its first try.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

FAULT_KINDS = (
    "429",  # rate limited, with Retry-After
    "500",  # internal error
    "503",  # overloaded, with Retry-After
    "slow",  # the answer comes after slow_s (beyond the client's timeout)
    "drop",  # the connection is reset without an answer
    "truncated",  # status 200, Content-Length promises more than is sent, connection closed
    "invalid_json",  # status 200, application/json body that is not JSON
    "wrong_shape",  # status 200, JSON that is not a chat completion
    "empty_choices",  # status 200, a chat completion with `choices: []`
)
# Drawn only when their rate is set (FaultPlan.uniform leaves them out, so the draws of existing plans stay
# as they were). A non-streaming request meets "stall" as "slow".
EXTRA_FAULT_KINDS = ("stall",)  # a stream that sends its first piece, then nothing for slow_s, then the rest


UNAUTHORIZED = "Incorrect API key provided. Check the key you sent."


def prompt_key(messages: Any) -> str:
    """The key of `requests_per_prompt`: sha256 of the messages as canonical JSON."""
    text = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class FaultPlan:
    """How often each fault happens (rates in [0, 1], summing to at most 1)."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_slow: float = 0.0
    rate_drop: float = 0.0
    rate_truncated: float = 0.0
    rate_invalid_json: float = 0.0
    rate_wrong_shape: float = 0.0
    rate_empty_choices: float = 0.0
    rate_stall: float = 0.0
    retry_after: str | None = "0"  # Retry-After header value sent with 429 and 503 (None: no header)
    slow_s: float = 5.0  # how late a "slow" answer comes

    def __post_init__(self) -> None:
        total = sum(self.rates().values())
        if any(r < 0 for r in self.rates().values()) or total > 1 + 1e-9:
            raise ValueError(f"fault rates must be >= 0 and sum to at most 1, got {self.rates()}")

    @classmethod
    def uniform(cls, total: float, **overrides: Any) -> FaultPlan:
        """`total` spread evenly over every fault kind; `overrides` set other fields."""
        each = total / len(FAULT_KINDS)
        return cls(**{f"rate_{kind}": each for kind in FAULT_KINDS}, **overrides)

    def rates(self) -> dict[str, float]:
        return {kind: getattr(self, f"rate_{kind}") for kind in (*FAULT_KINDS, *EXTRA_FAULT_KINDS)}

    def pick(self, u: float) -> str | None:
        """The fault for a uniform draw `u` in [0, 1), or None (a good answer)."""
        edge = 0.0
        for kind, rate in self.rates().items():
            edge += rate
            if u < edge:
                return kind
        return None


@dataclass
class Reply:
    """Full control over one answer: `content` of a 200 reply, or an error `status` with `message`."""

    content: str = ""
    status: int = 200
    message: str | None = None
    finish_reason: str = "stop"
    headers: dict[str, str] = field(default_factory=dict)
    stall: float = 0.0  # seconds of silence: after the first piece of a stream, before a whole answer


def _default_reply(request: dict[str, Any]) -> str:
    return "answer " + prompt_key(request.get("messages"))[:12]


def _uniform(seed: int, key: str, attempt: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class FakeOpenAIServer:
    """An OpenAI-compatible server in a background thread. Use as a context manager (or start()/close())."""

    def __init__(
        self,
        reply: Callable[[dict[str, Any]], str | dict | list | Reply] = _default_reply,
        *,
        latency: float = 0.0,
        faults: FaultPlan | None = None,
        seed: int = 0,
        models: list[str] | None = None,
        api_key: str | None = None,
        streaming: bool = True,
        stream_interval: float = 0.0,
        stream_usage: bool = True,
    ):
        self.reply = reply
        self.latency = latency
        self.streaming = streaming
        self.stream_interval = stream_interval
        self.stream_usage = stream_usage
        self.faults = faults or FaultPlan()
        self.seed = seed
        self.models = list(models) if models is not None else ["fake-model"]
        self.api_key = api_key
        self._lock = threading.Lock()
        self.requests_per_prompt: Counter[str] = Counter()
        self.answered_per_prompt: Counter[str] = Counter()  # good 200 replies sent (not faults, not errors)
        self.outcomes: Counter[str] = Counter()  # "ok", a fault kind, or an HTTP status for errors
        self.received: list[dict[str, Any]] = []  # chat request bodies, in arrival order
        self.arrivals: list[float] = []  # time.monotonic() of each chat request
        self.headers_seen: list[dict[str, str]] = []  # headers of every request (chat and models)
        self.reply_errors: list[Exception] = []  # what `reply` raised (each answered as a 500)
        self.in_flight = 0
        self.max_in_flight = 0
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self._run, name="fake-openai", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._start_error is not None or self.port is None:
            raise RuntimeError(f"fake OpenAI server did not start: {self._start_error!r}")
        return self

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); the thread ends either way
            self._start_error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=2048)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

    # ------------------------------------------------------------------ counters

    def total_requests(self) -> int:
        with self._lock:
            return sum(self.requests_per_prompt.values())

    def reset_counters(self) -> None:
        with self._lock:
            self.requests_per_prompt.clear()
            self.answered_per_prompt.clear()
            self.outcomes.clear()
            self.received.clear()
            self.arrivals.clear()
            self.headers_seen.clear()
            self.max_in_flight = self.in_flight

    # ------------------------------------------------------------------ HTTP

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _version = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                if not await self._dispatch(method, path, headers, body, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return  # the server is closing (returning, not re-raising: Python 3.11's streams log cancelled tasks)
        finally:
            writer.close()

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        *,
        raw: bytes | None = None,
        declared_length: int | None = None,
    ) -> None:
        body = raw if raw is not None else json.dumps(payload).encode("utf-8")
        length = declared_length if declared_length is not None else len(body)
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "content-type: application/json",
            f"content-length: {length}",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _send_error(
        self, writer: asyncio.StreamWriter, status: int, message: str, headers: dict[str, str] | None = None
    ) -> bool:
        payload = {"error": {"message": message, "type": HTTPStatus(status).phrase, "code": status}}
        await self._send(writer, status, payload, headers)
        return True

    async def _dispatch(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection must be closed."""
        path = path.split("?", 1)[0].rstrip("/")
        with self._lock:
            self.headers_seen.append(headers)
        if method == "GET" and path == "/v1/models":
            if not self._authorized(headers):
                return await self._send_error(writer, 401, UNAUTHORIZED)
            data = [{"id": m, "object": "model", "owned_by": "fake"} for m in self.models]
            await self._send(writer, 200, {"object": "list", "data": data})
            return True
        if method == "POST" and path == "/v1/chat/completions":
            try:
                request = json.loads(body)
            except ValueError:
                return await self._send_error(writer, 400, "request body is not JSON")
            return await self._chat(request, headers, writer)
        return await self._send_error(writer, 404, f"no route {method} {path}")

    def _authorized(self, headers: dict[str, str]) -> bool:
        return self.api_key is None or headers.get("authorization") == f"Bearer {self.api_key}"

    async def _chat(
        self, request: dict[str, Any], headers: dict[str, str], writer: asyncio.StreamWriter
    ) -> bool:
        key = prompt_key(request.get("messages"))
        with self._lock:
            attempt = self.requests_per_prompt[key]
            self.requests_per_prompt[key] += 1
            self.received.append(request)
            self.arrivals.append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            fault = self.faults.pick(_uniform(self.seed, key, attempt))
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            if not self._authorized(headers):
                self._count(key, "401")
                return await self._send_error(writer, 401, UNAUTHORIZED)
            if request.get("model") not in self.models:
                self._count(key, "404")
                return await self._send_error(
                    writer, 404, f"The model `{request.get('model')}` does not exist."
                )
            stream = bool(request.get("stream"))
            if stream and not self.streaming:
                self._count(key, "400")
                return await self._send_error(writer, 400, "stream=true is not supported by this server")
            if fault is not None:
                self._count(key, fault)
                if stream:
                    return await self._stream_fault(fault, request, writer)
                return await self._fault("slow" if fault == "stall" else fault, request, writer)
            try:
                answer = self.reply(request)
            except Exception as exc:  # a bug in the test's reply function: a 500 here, kept for the test
                self.reply_errors.append(exc)
                self._count(key, "reply_error")
                return await self._send_error(writer, 500, f"reply function raised {exc!r}")
            if isinstance(answer, Reply) and answer.status != 200:
                self._count(key, str(answer.status))
                return await self._send_error(
                    writer, answer.status, answer.message or answer.content, answer.headers
                )
            stall = answer.stall if isinstance(answer, Reply) else 0.0
            if stream:
                await self._stream(writer, request, answer, stall_after_first=stall)
            else:
                await asyncio.sleep(stall)
                await self._send(writer, 200, _completion(request, answer))
            self._count(key, "ok")
            return True
        finally:
            with self._lock:
                self.in_flight -= 1

    def _count(self, key: str, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            if outcome == "ok":
                self.answered_per_prompt[key] += 1

    async def _fault(self, fault: str, request: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        retry = {"retry-after": self.faults.retry_after} if self.faults.retry_after is not None else {}
        if fault == "429":
            return await self._send_error(writer, 429, "Rate limit reached, slow down.", retry)
        if fault == "500":
            return await self._send_error(writer, 500, "Internal server error.")
        if fault == "503":
            return await self._send_error(writer, 503, "Server overloaded, try again later.", retry)
        if fault == "slow":
            await asyncio.sleep(self.faults.slow_s)
            await self._send(writer, 200, _completion(request, "too late"))
            return True
        if fault == "drop":
            writer.transport.abort()
            return False
        good = json.dumps(_completion(request, "cut short")).encode()
        if fault == "truncated":
            await self._send(writer, 200, None, raw=good[: len(good) // 2], declared_length=len(good))
            writer.transport.abort()
            return False
        if fault == "invalid_json":
            await self._send(writer, 200, None, raw=good[: len(good) // 2])
            return True
        if fault == "wrong_shape":
            await self._send(writer, 200, {"result": "ok", "output": [1, 2, 3]})
            return True
        if fault == "empty_choices":
            payload = _completion(request, "")
            payload["choices"] = []
            await self._send(writer, 200, payload)
            return True
        raise ValueError(f"unknown fault {fault!r}")

    # ------------------------------------------------------------------ streaming

    async def _start_stream(self, writer: asyncio.StreamWriter) -> None:
        head = [
            "HTTP/1.1 200 OK",
            "content-type: text/event-stream; charset=utf-8",
            "cache-control: no-cache",
            "transfer-encoding: chunked",
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()

    async def _event(self, writer: asyncio.StreamWriter, data: Any) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        payload = f"data: {text}\n\n".encode()
        writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        await writer.drain()

    async def _end_stream(self, writer: asyncio.StreamWriter) -> None:
        await self._event(writer, "[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        request: dict[str, Any],
        answer: str | dict | list | Reply,
        *,
        stall_after_first: float = 0.0,
    ) -> None:
        """The whole answer as server-sent events (`stall_after_first`: a pause after the first piece)."""
        events = _stream_events(request, answer, usage=self.stream_usage)
        await self._start_stream(writer)
        for i, event in enumerate(events):
            if _is_content(event) and self.stream_interval > 0:
                await asyncio.sleep(self.stream_interval)
            await self._event(writer, event)
            if i == 1 and stall_after_first > 0:
                await asyncio.sleep(stall_after_first)
        await self._end_stream(writer)

    async def _stream_fault(self, fault: str, request: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        """A fault as a streaming server shows it: errors and drops before the stream, the rest inside it."""
        if fault in ("429", "500", "503", "drop"):
            return await self._fault(fault, request, writer)
        if fault == "slow":
            await asyncio.sleep(self.faults.slow_s)
            await self._stream(writer, request, "too late")
            return True
        if fault == "stall":
            await self._stream(writer, request, "stalled half way", stall_after_first=self.faults.slow_s)
            return True
        events = _stream_events(request, "cut short", usage=self.stream_usage)
        await self._start_stream(writer)
        if fault == "truncated":
            for event in events[: len(events) // 2]:
                await self._event(writer, event)
            writer.transport.abort()
            return False
        if fault == "invalid_json":
            await self._event(writer, events[0])
            await self._event(writer, json.dumps(events[1])[:20])
        elif fault == "wrong_shape":
            await self._event(writer, {"result": "ok", "output": [1, 2, 3]})
        elif fault == "empty_choices":
            await self._event(writer, {**events[0], "choices": []})
        else:
            raise ValueError(f"unknown fault {fault!r}")
        await self._end_stream(writer)
        return True


def _is_content(event: dict[str, Any]) -> bool:
    choices = event.get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


def _stream_events(
    request: dict[str, Any], answer: str | dict | list | Reply, *, usage: bool
) -> list[dict[str, Any]]:
    """The chunks of a streamed answer, as a vLLM-like server sends them (without the final [DONE])."""
    whole = _completion(request, answer)
    content = whole["choices"][0]["message"]["content"]
    base = {k: whole[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in re.findall(r"\s*\S+|\s+", content)]
    events.append(chunk({}, whole["choices"][0]["finish_reason"]))
    if usage and (request.get("stream_options") or {}).get("include_usage"):
        events.append(base | {"choices": [], "usage": whole["usage"]})
    return events


def _completion(request: dict[str, Any], answer: str | dict | list | Reply) -> dict[str, Any]:
    finish_reason = "stop"
    if isinstance(answer, Reply):
        finish_reason = answer.finish_reason
        answer = answer.content
    content = answer if isinstance(answer, str) else json.dumps(answer)
    prompt_chars = sum(len(str(m.get("content", ""))) for m in request.get("messages") or [])
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_chars // 4 + 1,
            "completion_tokens": len(content) // 4 + 1,
            "total_tokens": prompt_chars // 4 + len(content) // 4 + 2,
        },
    }


def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connecting to it is refused)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers (a hung server)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._sock.close()


__all__ = [
    "EXTRA_FAULT_KINDS",
    "FAULT_KINDS",
    "FakeOpenAIServer",
    "FaultPlan",
    "Reply",
    "SilentServer",
    "prompt_key",
    "unused_port",
]
