"""One generation request as the engine sees it: its parameters, what it reports, and its running state.

A `Sequence` turns the token ids the model writes into text events for its consumer: it decodes incrementally
(text that ends in a partial UTF-8 character is held back), cuts at the first stop string (text that may be the
start of a stop string is held back until it is not), and finishes on an end-of-turn token, on `max_tokens`, or
when its consumer cancels it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from doctune.llm.rows import take_token


class RequestRejected(Exception):
    """A request the server refuses: `status` is the HTTP code, `param` the request field at fault (if any)."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class UnknownModel(RequestRejected):
    status = 404

    def __init__(self, name: str, known: list[str]):
        super().__init__(
            f"The model `{name}` does not exist; this server has: {', '.join(known)} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )


class ServerBusy(RequestRejected):
    status = 503
    type = "server_error"


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 is greedy; `grammar` is a compiled xgrammar grammar or None."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    grammar: Any = None


@dataclass(frozen=True)
class Delta:
    """New text of the answer."""

    text: str


@dataclass(frozen=True)
class Done:
    """The answer is complete. finish_reason: "stop" (end of turn or a stop string) or "length" (max_tokens)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The engine could not finish this request (the message says why; the server logs the details)."""

    message: str


Event = Delta | Done | Failed


@dataclass(eq=False)
class Sequence:
    """The running state of one request. The engine's worker thread owns everything but `cancelled`."""

    adapter: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    decode: Callable[[list[int]], str]
    eos_ids: frozenset[int]
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    matcher: Any = None
    token_bytes: list[bytes] | None = None  # with a matcher: each token's bytes, to follow grammar_tail
    grammar_tail: bytes = b""  # the last bytes written under the grammar (an unfinished UTF-8 character)
    generator: Any = None
    _text: str = ""
    _sent: int = 0
    _prefix: int = 0
    _read: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def input_ids(self) -> list[int]:
        """What the model reads to write the next token: the prompt and everything written so far."""
        return self.prompt_ids + self.generated

    def push(self, token: int) -> None:
        """Take the model's next token: emit the text it completes, and finish when the request is over."""
        if not take_token(self, token, self.eos_ids, lambda: self.token_bytes, "response_format"):
            return
        self._text += self._new_text()
        if self._emit():
            return
        if len(self.generated) >= self.params.max_tokens:
            self._finish("length")

    def fail(self, message: str) -> None:
        if self.finished:
            return
        self.finish_reason = "error"
        if not self.cancelled:
            self.sink(Failed(message))

    def _new_text(self) -> str:
        """Text added by the last token, decoding a short window (as TGI and vLLM do), not the whole answer."""
        ids = self.generated
        before = self.decode(ids[self._prefix : self._read])
        after = self.decode(ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(ids)
            return after[len(before) :]
        return ""

    def _emit(self) -> bool:
        """Send the text that is safe to send. True when a stop string ended the answer."""
        stops = self.params.stop
        if stops:
            longest = max(len(s) for s in stops)
            start = max(0, self._sent - longest)
            hits = [i for s in stops if (i := self._text.find(s, start)) >= 0]
            if hits:
                self._text = self._text[: min(hits)]
                self._finish("stop", cut=True)
                return True
        safe = len(self._text) - _held_back(self._text, stops)
        if safe > self._sent:
            self.sink(Delta(self._text[self._sent : safe]))
            self._sent = safe
        return False

    def _finish(self, reason: str, *, cut: bool = False) -> None:
        if self.cancelled:
            self.finish_reason = "cancelled"
            return
        if not cut:  # also send what the decoder still held back (a partial character at the very end)
            self._text += self.decode(self.generated[self._prefix :])[
                len(self.decode(self.generated[self._prefix : self._read])) :
            ]
            self._prefix = self._read = len(self.generated)
        if len(self._text) > self._sent:
            self.sink(Delta(self._text[self._sent :]))
            self._sent = len(self._text)
        self.finish_reason = reason
        self.sink(Done(reason, len(self.prompt_ids), len(self.generated)))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string.

    >>> _held_back("the answer is ##", ("###",))
    2
    >>> _held_back("no stop here", ("###",))
    0
    """
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
