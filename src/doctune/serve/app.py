"""The OpenAI-compatible server: FastAPI routes over the batching engine, plus the chat page.

```
doctune serve --model models/tiny --adapter docs=runs/my-chatbot/adapter     # → http://127.0.0.1:8000
```

- `GET /v1/models` (and `/v1/models/NAME`): the base model (under the name it was given, or
  --served-model-name) and each adapter.
- `POST /v1/chat/completions`: the request's `model` picks the base or an adapter. Streams server-sent events
  ending in `data: [DONE]` when `stream` is true. `response_format` json_schema / json_object is enforced
  with xgrammar. Errors are OpenAI's error JSON: 400 bad request (unknown field, wrong type, context too long
  with the limit in the message, max_tokens over the cap), 401 missing or wrong key, 404 unknown model, 413 body
  too large, 503 queue full.
- `GET /health`: no key needed. `GET /`: the chat page (web/index.html).
- A client that disconnects, mid-stream or while waiting, cancels its request and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from doctune.serve.engine import AsyncEvents, Engine
from doctune.serve.guard import Guard
from doctune.serve.protocol import (
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    models_body,
    now,
    parse_chat_request,
    usage_chunk_body,
)
from doctune.serve.requests import Delta, Done, Failed, RequestRejected

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20


def create_app(
    engine: Engine, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> Any:
    """The ASGI app serving `engine`. With `api_key`, every path but /health needs it."""
    app = FastAPI(title="doctune", docs_url=None, redoc_url=None, openapi_url=None)
    started = now()

    @app.exception_handler(RequestRejected)
    async def _rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, code=exc.status_code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return JSONResponse(
            error_body("internal server error; the server log has the details", "server_error"),
            status_code=500,
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return models_body([(m.name, m.parent) for m in engine.models], started)

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        served = engine.model(name)  # 404 when unknown
        return models_body([(served.name, served.parent)], started)["data"][0]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_chat_request(await request.body())
        engine.model(body.model)  # 404 before any work
        response_format = body.response_format
        prepared = await asyncio.to_thread(
            engine.prepare,
            body.model,
            body.messages_as_dicts(),
            max_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_list(),
            seed=body.seed,
            json_schema=body.json_schema(),
            json_object=response_format is not None and response_format.type == "json_object",
        )
        events = engine.start(prepared)
        cid, created = completion_id(), now()
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _EventStreamResponse(
                events, _sse(events, cid, created, body.model, include_usage), media_type="text/event-stream"
            )
        return await _complete(request, events, cid, created, body.model)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page_html(), headers={"cache-control": "no-store"})

    return Guard(app, api_key=api_key, max_body_bytes=max_body_bytes)


def _page_html() -> str:
    return (resources.files("doctune.serve") / "web" / "index.html").read_text(encoding="utf-8")


class _EventStreamResponse(StreamingResponse):
    """A streaming response that cancels its request however it ends (done, client gone, server stopping)."""

    def __init__(self, events: AsyncEvents, content: AsyncIterator[str], **kwargs: Any):
        super().__init__(content, headers={"cache-control": "no-cache", "x-accel-buffering": "no"}, **kwargs)
        self._events = events

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._events.cancel()


def _data(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(
    events: AsyncEvents, cid: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    yield _data(chunk_body(cid, created, model, {"role": "assistant", "content": ""}))
    async with events:
        async for event in events:
            if isinstance(event, Delta):
                yield _data(chunk_body(cid, created, model, {"content": event.text}))
            elif isinstance(event, Done):
                yield _data(chunk_body(cid, created, model, {}, event.finish_reason))
                if include_usage:
                    yield _data(
                        usage_chunk_body(cid, created, model, event.prompt_tokens, event.completion_tokens)
                    )
            elif isinstance(event, Failed):
                yield _data(error_body(event.message, "server_error"))
    yield "data: [DONE]\n\n"


async def _complete(request: Request, events: AsyncEvents, cid: str, created: int, model: str) -> Response:
    """Collect a whole answer; if the client goes away first, cancel the request."""

    async def collect() -> tuple[str, Done | Failed]:
        parts = []
        async for event in events:
            if isinstance(event, Delta):
                parts.append(event.text)
            else:
                return "".join(parts), event
        raise RuntimeError("the engine ended a request without Done or Failed")

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not answer.done():
            events.cancel()
            answer.cancel()
        # A cancelled task is cancelled only once the loop runs it again: wait for both to end (asyncio.wait
        # never raises their outcome), so answer.result() below never meets a task that is still running.
        await asyncio.wait({answer, watcher})
    if answer.cancelled():
        return Response(status_code=499)
    text, end = answer.result()
    if isinstance(end, Failed):
        return JSONResponse(error_body(end.message, "server_error"), status_code=500)
    return JSONResponse(
        completion_body(
            cid, created, model, text, end.finish_reason, end.prompt_tokens, end.completion_tokens
        )
    )


def is_loopback(host: str) -> bool:
    """>>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def serve(
    engine: Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Run the server until interrupted (uvicorn), then stop the engine."""
    import uvicorn

    if not is_loopback(host) and api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach this port can use it", host)
    log.info("doctune serve: http://%s:%d (chat page at /, API at /v1)", host, port)
    app = create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes)
    try:
        uvicorn.run(
            app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5
        )
    finally:
        engine.close()
