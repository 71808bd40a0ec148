"""The `openai` backend: any OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama, OpenAI) via the official SDK.

```python
llm = OpenAIBackend(cfg.models["teacher"])
await llm.preflight()        # GET /models on every base_url: unreachable, bad key or unknown model → LLMError
reply = await llm.chat(messages, max_tokens=512, json_schema=schema)
await llm.aclose()
```

- One `AsyncOpenAI` client per base_url, its connection pool sized to `max_concurrency`; requests go to the
  base_urls in turn (round-robin), and so do retries.
- `max_concurrency` requests in flight at most; optional requests/tokens per minute (limits.py).
- Requests stream (`stream=True`, `stream_options.include_usage`), so `timeout` is an IDLE timeout: a request
  lives as long as the server keeps sending (a slow CPU server, Ollama, a busy vLLM finish long answers) and is
  abandoned, then retried, only when nothing arrives for `timeout` seconds (a dead or hung server). The
  pieces are put together into one `Completion`: text, finish_reason, and the token counts of the server's
  usage chunk; a server that sends none gets completion_tokens = the number of content deltas (about one
  token each on vLLM, llama.cpp, Ollama, doctune serve) and prompt_tokens = 0 (unknown). A stream that ends
  without a finish_reason was cut short and is retried. A server that rejects streaming (HTTP 400 whose
  message names `stream`) gets whole requests from then on; one that answers a streaming request with a
  plain JSON body is read as such.
- The SDK's own retries are off. Here: 408, 409, 429, 5xx, timeouts, dropped connections and malformed replies
  (no choices, a body that is not JSON or not a chat completion, an error event in the stream) are retried up
  to `max_retries` times, after a jittered exponential backoff or the server's `Retry-After` (seconds or HTTP
  date, capped). 400, 413, 422 and other request errors raise `RequestFailed` at once (that request is
  wrong); 401, 403, 404 raise `LLMError` (the whole run is wrong: key, permissions, model name or URL).
- The API key comes from the env var `api_key_env` names ("EMPTY" when unset, as vLLM without auth expects);
  it is never logged and never part of an error message.
- `json_schema` goes out as `response_format` per `structured_output`: json_schema (strict), json_object, none.
- Clients, semaphore and rate limiters belong to one event loop; they are made on first use and made again if
  the backend is used from a new loop (e.g. a second `asyncio.run`).
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai

from doctune.config import ModelConfig
from doctune.errors import ConfigError, LLMError
from doctune.llm.base import Completion, RequestFailed
from doctune.llm.limits import Limits, estimate_tokens

log = logging.getLogger(__name__)

NO_KEY = "EMPTY"
FATAL_STATUSES = {401, 403, 404}
RETRY_STATUSES = {408, 409, 429}


def retry_after_seconds(headers: Any, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms`, `Retry-After` in seconds or as an HTTP date).

    >>> retry_after_seconds({"retry-after": "2"})
    2.0
    >>> retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:05 GMT"}, now=1445412480.0)
    5.0
    >>> retry_after_seconds({"retry-after-ms": "250"}), retry_after_seconds({"retry-after": "soon"})
    (0.25, None)
    """
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(
    attempt: int,
    retry_after: float | None,
    *,
    base: float = 0.5,
    cap: float = 30.0,
    retry_after_cap: float = 60.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number `attempt` (0 = first retry): the server's Retry-After (capped) plus
    up to 20%, else `base * 2**attempt` (capped) times a random factor in [0.5, 1] so clients spread out.

    >>> backoff_delay(0, None, rng=random.Random(0)) <= 0.5, backoff_delay(10, None) <= 30.0
    (True, True)
    >>> 3.0 <= backoff_delay(0, 3.0) <= 3.6, backoff_delay(0, 3600.0) <= 72.0
    (True, True)
    """
    rng = rng or random
    if retry_after is not None:
        return min(retry_after, retry_after_cap) * rng.uniform(1.0, 1.2)
    return min(cap, base * 2**attempt) * rng.uniform(0.5, 1.0)


def response_format(json_schema: dict[str, Any] | None, mode: str) -> dict[str, Any] | None:
    """The `response_format` request field for a schema under `structured_output` = `mode`.

    >>> response_format({"type": "object", "title": "QA pairs"}, "json_schema")["json_schema"]["name"]
    'QA_pairs'
    >>> response_format({"type": "object"}, "json_object"), response_format({"type": "object"}, "none")
    ({'type': 'json_object'}, None)
    """
    if json_schema is None or mode == "none":
        return None
    if mode == "json_object":
        return {"type": "json_object"}
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(json_schema.get("title") or "reply"))[:64]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": json_schema, "strict": True}}


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _server_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            body = inner.get("message") or inner.get("detail") or inner.get("msg") or inner
        else:
            body = inner
    if not body:
        try:
            body = exc.response.text
        except (httpx2.ResponseNotRead, UnicodeDecodeError):
            body = exc.message
    return _one_line(body if isinstance(body, str) else json.dumps(body))


class _Malformed(Exception):
    """A 200 reply that is not a usable chat completion (retried)."""

    def __init__(self, reason: str, raw: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


def _as_completion(reply: Any) -> Completion:
    if isinstance(reply, str):
        raise _Malformed("reply is not JSON", raw=reply[:2000])
    choices = getattr(reply, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise _Malformed(
            "reply has no choices" if choices == [] else "reply is not a chat completion", _raw(reply)
        )
    choice = choices[0]
    message = getattr(choice, "message", None)
    content = getattr(message, "content", None)
    if not isinstance(content, str):
        refusal = getattr(message, "refusal", None)
        if isinstance(refusal, str) and refusal:
            raise RequestFailed(f"the model refused: {_one_line(refusal)}", status=200, raw=refusal)
        raise _Malformed("reply has no message content", _raw(reply))
    usage = getattr(reply, "usage", None)
    prompt_tokens = getattr(usage, "prompt_tokens", 0)
    completion_tokens = getattr(usage, "completion_tokens", 0)
    finish_reason = getattr(choice, "finish_reason", None)
    return Completion(
        text=content,
        prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else 0,
        completion_tokens=completion_tokens if isinstance(completion_tokens, int) else 0,
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
    )


def _whole_reply(body: bytes) -> Completion:
    """A plain JSON chat completion sent in answer to a streaming request."""
    from openai.types.chat import ChatCompletion
    from pydantic import ValidationError

    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
        return _as_completion(ChatCompletion.model_validate(data))
    except json.JSONDecodeError:
        raise _Malformed("reply is not JSON", raw=text[:2000]) from None
    except ValidationError:
        raise _Malformed("reply is not a chat completion", raw=text[:2000]) from None


async def _read_stream(stream: Any) -> Completion:
    """One Completion out of a chat completion stream (see the module docstring)."""
    async with stream:  # the response is closed however this ends
        if "text/event-stream" not in stream.response.headers.get("content-type", "text/event-stream"):
            return _whole_reply(await stream.response.aread())
        parts: list[str] = []
        refusal: list[str] = []
        finish_reason: str | None = None
        usage: Any = None
        raw: list[str] = []
        async for chunk in stream:
            if len(raw) < 4:
                raw.append(_raw(chunk))
            usage = getattr(chunk, "usage", None) or usage
            choices = getattr(chunk, "choices", None)
            if not isinstance(choices, list):
                raise _Malformed("stream chunk is not a chat completion chunk", "\n".join(raw))
            for choice in choices:
                if getattr(choice, "index", 0) != 0:
                    continue
                delta = getattr(choice, "delta", None)
                content = getattr(delta, "content", None)
                if isinstance(content, str) and content:
                    parts.append(content)
                said_no = getattr(delta, "refusal", None)
                if isinstance(said_no, str) and said_no:
                    refusal.append(said_no)
                reason = getattr(choice, "finish_reason", None)
                finish_reason = reason if isinstance(reason, str) else finish_reason
    if refusal and not parts:
        text = "".join(refusal)
        raise RequestFailed(f"the model refused: {_one_line(text)}", status=200, raw=text)
    if finish_reason is None:
        reason = (
            "the stream ended before the answer did (no finish_reason)" if parts else "reply has no choices"
        )
        raise _Malformed(reason, "\n".join(raw) or None)
    prompt_tokens = getattr(usage, "prompt_tokens", None)
    completion_tokens = getattr(usage, "completion_tokens", None)
    return Completion(
        text="".join(parts),
        prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else 0,
        completion_tokens=completion_tokens if isinstance(completion_tokens, int) else len(parts),
        finish_reason=finish_reason,
    )


def _rejects_streaming(exc: openai.APIStatusError) -> bool:
    """A 400 that says the server does not stream (rather than that the request itself is wrong)."""
    return exc.status_code == 400 and "stream" in _server_message(exc).lower()


def _raw(reply: Any) -> str:
    try:
        return reply.to_json(indent=None)[:2000]
    except (AttributeError, TypeError, ValueError):
        return repr(reply)[:2000]


_RETRYABLE = (openai.APIError, json.JSONDecodeError, _Malformed)


@dataclass
class _Failure:
    """One failed attempt that a retry may fix."""

    reason: str
    status: int | None = None
    retry_after: float | None = None
    raw: str | None = None


@dataclass
class _LoopState:
    loop: asyncio.AbstractEventLoop
    clients: list[openai.AsyncOpenAI]
    limits: Limits
    turn: itertools.count


class OpenAIBackend:
    """An OpenAI-compatible server (or several, round-robin) as a doctune LLM. `label` (e.g. "models.teacher")
    names the config entry in error messages."""

    preflight_timeout = 5.0

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        label: str = "models.<name>",
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        retry_after_cap: float = 60.0,
    ):
        urls = [cfg.base_url] if isinstance(cfg.base_url, str) else list(cfg.base_url or [])
        if not urls:
            raise ConfigError(
                [f"{label}.base_url: required for backend openai (e.g. http://localhost:8001/v1)"]
            )
        self.cfg = cfg
        self.label = label
        self.name = cfg.model
        self.base_urls = [u.rstrip("/") for u in urls]
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self._key_is_set = bool(key)
        self._api_key = key or NO_KEY
        self._state: _LoopState | None = None
        self._whole_requests: set[str] = set()  # base_urls that rejected streaming: they get whole requests

    # ------------------------------------------------------------------ setup

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._state
        if state is None or state.loop is not loop:
            state = self._state = _LoopState(
                loop=loop,
                clients=[self._client(url) for url in self.base_urls],
                limits=Limits(
                    self.cfg.max_concurrency, self.cfg.requests_per_minute, self.cfg.tokens_per_minute
                ),
                turn=itertools.count(),
            )
        return state

    def _client(self, base_url: str) -> openai.AsyncOpenAI:
        n = self.cfg.max_concurrency
        # httpx's read timeout bounds each wait for the next bytes, not the whole request: with streaming,
        # an idle timeout (a request lives while tokens keep coming)
        timeout = httpx2.Timeout(self.cfg.timeout, connect=min(10.0, self.cfg.timeout))
        http_client = openai.DefaultAsyncHttpx2Client(
            limits=httpx2.Limits(max_connections=n, max_keepalive_connections=n), timeout=timeout
        )
        return openai.AsyncOpenAI(
            base_url=base_url, api_key=self._api_key, max_retries=0, timeout=timeout, http_client=http_client
        )

    def _redact(self, text: str) -> str:
        if self._key_is_set and len(self._api_key) >= 4:
            return text.replace(self._api_key, "***")
        return text

    def _key_hint(self) -> str:
        env = self.cfg.api_key_env
        if not env:
            return f"{self.label}.api_key_env is null, so a placeholder key is sent"
        return f"the key comes from ${env}" + ("" if self._key_is_set else ", which is not set")

    # ------------------------------------------------------------------ the protocol

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        stop: list[str] | None = None,
    ) -> Completion:
        state = self._loop_state()
        request: dict[str, Any] = {
            "model": self.name,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if stop:
            request["stop"] = stop
        fmt = response_format(json_schema, self.cfg.structured_output)
        if fmt is not None:
            request["response_format"] = fmt
        tokens = estimate_tokens(messages, max_tokens)
        attempts = self.cfg.max_retries + 1
        for attempt in range(attempts):
            index = next(state.turn) % len(state.clients)
            url = self.base_urls[index]
            try:
                async with state.limits.slot(tokens):
                    return await self._attempt(state.clients[index], url, request)
            except _RETRYABLE as exc:
                failure = self._retryable_failure(exc, url)
            if attempt + 1 == attempts:
                raise RequestFailed(
                    f"{failure.reason} (gave up after {attempts} attempts; last to {url})",
                    status=failure.status,
                    raw=failure.raw,
                )
            delay = backoff_delay(
                attempt,
                failure.retry_after,
                base=self.backoff_base,
                cap=self.backoff_cap,
                retry_after_cap=self.retry_after_cap,
            )
            log.debug("%s: %s; retry %d/%d in %.2f s", url, failure.reason, attempt + 1, attempts - 1, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _attempt(self, client: openai.AsyncOpenAI, url: str, request: dict[str, Any]) -> Completion:
        """One try: streamed unless the config says `stream: false` or `url` rejected streaming before."""
        if self.cfg.stream and url not in self._whole_requests:
            try:
                stream = await client.chat.completions.create(
                    **request, stream=True, stream_options={"include_usage": True}
                )
            except openai.APIStatusError as exc:
                if not _rejects_streaming(exc):
                    raise
                message = self._redact(_server_message(exc))
                log.info("%s rejects streaming requests (%s): sending it whole requests", url, message)
                self._whole_requests.add(url)
            else:
                return await _read_stream(stream)
        return _as_completion(await client.chat.completions.create(**request))

    def _retryable_failure(self, exc: Exception, url: str) -> _Failure:
        """What went wrong with one attempt, when another attempt may help. Raises LLMError (401/403/404: the
        run is wrong) or RequestFailed (other 4xx: this request is wrong) when it cannot."""
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            message = self._redact(_server_message(exc))
            if status in FATAL_STATUSES:
                raise self._fatal(url, status, message) from None
            if status not in RETRY_STATUSES and status < 500:
                raise RequestFailed(f"HTTP {status} from {url}: {message}", status=status) from None
            return _Failure(f"HTTP {status}: {message}", status, retry_after_seconds(exc.response.headers))
        if isinstance(exc, openai.APITimeoutError):
            return _Failure(f"nothing received for {self.cfg.timeout:g} s ({self.label}.timeout)")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            return _Failure(f"connection failed ({type(cause).__name__}: {_one_line(str(cause), 120)})")
        if isinstance(exc, openai.APIError):  # an error event inside a stream
            body = exc.body if isinstance(exc.body, str) else json.dumps(exc.body)
            return _Failure(f"error in the stream: {self._redact(_one_line(exc.message))}", raw=body)
        if isinstance(exc, json.JSONDecodeError):
            return _Failure(f"reply body is not valid JSON ({exc.msg})", raw=exc.doc[:2000])
        if isinstance(exc, _Malformed):
            return _Failure(exc.reason, raw=exc.raw)
        raise TypeError(f"not a retryable failure: {exc!r}")

    def _fatal(self, url: str, status: int, message: str) -> LLMError:
        if status == 401:
            hint = f"check the API key: {self._key_hint()}"
        elif status == 403:
            hint = f"the key is not allowed to use this model or endpoint ({self._key_hint()})"
        else:
            hint = f"check {self.label}.model and that {self.label}.base_url ends in /v1"
        return LLMError(f"{url}: HTTP {status} for model {self.name!r}: {message} ({hint})")

    async def preflight(self) -> None:
        """GET /models on every base_url (5 s each, in parallel): the server answers, the key works, the model
        is served. Raises LLMError naming the base_url and what to do."""
        state = self._loop_state()
        pairs = zip(state.clients, self.base_urls, strict=True)
        await asyncio.gather(*(self._check(client, url) for client, url in pairs))

    async def _check(self, client: openai.AsyncOpenAI, url: str) -> None:
        t = self.preflight_timeout
        try:
            page = await client.models.list(timeout=t)
        except openai.APITimeoutError:
            raise LLMError(
                f"{url}: no answer to GET /models within {t:g} s (is the server still loading the model, "
                f"or hung? check {self.label}.base_url)"
            ) from None
        except openai.APIConnectionError:
            port = urlsplit(url).port or 8000
            raise LLMError(
                f"{url}: cannot connect (is the server running? start vLLM with "
                f"`vllm serve {self.name} --port {port}`, or fix {self.label}.base_url)"
            ) from None
        except openai.APIStatusError as exc:
            message = self._redact(_server_message(exc))
            if exc.status_code == 404:
                log.warning("%s: GET /models is not served (%s); cannot check the model name", url, message)
                return
            if exc.status_code in FATAL_STATUSES:
                raise self._fatal(url, exc.status_code, message) from None
            raise LLMError(f"{url}: GET /models answered HTTP {exc.status_code}: {message}") from None
        except (json.JSONDecodeError, ValueError) as exc:
            raise LLMError(
                f"{url}: GET /models did not answer JSON ({exc}); is this an OpenAI API?"
            ) from None
        served = [
            m.id for m in (getattr(page, "data", None) or []) if isinstance(getattr(m, "id", None), str)
        ]
        if not served:
            log.warning("%s: GET /models lists no models; cannot check the model name", url)
        elif self.name not in served and f"{self.name}:latest" not in served:  # Ollama lists "name:latest"
            raise LLMError(
                f"{url}: model {self.name!r} is not served there (served: {', '.join(served)}); "
                f"set {self.label}.model to one of them"
            )

    async def aclose(self) -> None:
        state, self._state = self._state, None
        if state is not None and state.loop is asyncio.get_running_loop():
            await asyncio.gather(*(client.close() for client in state.clients))
