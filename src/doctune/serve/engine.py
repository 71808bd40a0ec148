"""Generation for the server and the terminal chat: one base model and its LoRA adapters on llm/engine.py's
continuous-batching engine (the same engine as the in-process `hf` backend).

```python
engine = Engine.load("models/tiny", {"docs": "runs/x/adapter"})
request = engine.prepare("docs", [{"role": "user", "content": "Hi"}], max_tokens=64)   # RequestRejected: 4xx
async with engine.start(request) as events:            # or `with engine.start_sync(request) as events:`
    async for event in events: ...                     # Delta(text)..., then Done(...) or Failed(...)
engine.close()
```

How requests share the model (llm/engine.py has the details):
- One worker thread owns the model and decodes every running request one token per step in one forward pass.
  Base and adapter rows mix in a batch (PEFT's `adapter_names`), and so do rows with and without a JSON schema.
- Sampling parameters, `max_tokens` and `stop` are per row, so no request waits for "compatible" ones.
- Continuous batching: a finished row leaves the batch at once and a waiting request takes its slot at the next
  step (its prompt is prefilled and its cache joins the running one). Beyond `max_batch`, requests are served
  first come, first served.
- A cancelled request (client gone) leaves the queue at once, or stops its row at the next step.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import random
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from doctune.llm.engine import BatchEngine, EngineBusy, remove_adapter_hooks
from doctune.serve.models import Grammars, LoadedModels, ServedModel, load_models, render_prompt
from doctune.serve.requests import (
    Delta,
    Event,
    Failed,
    RequestRejected,
    SamplingParams,
    Sequence,
    ServerBusy,
    UnknownModel,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRequest:
    """A request checked against the model (name, context length, schema), ready to queue."""

    model: ServedModel
    prompt_ids: list[int]
    params: SamplingParams


class Engine:
    def __init__(
        self,
        loaded: LoadedModels,
        *,
        max_batch: int = 32,
        max_tokens_cap: int = 2048,
        max_waiting: int = 1024,
        gather_s: float = 0.005,
    ):
        self.loaded = loaded
        self.max_batch = max_batch
        self.max_tokens_cap = max_tokens_cap
        vocab_size = int(loaded.model.config.vocab_size)
        self.grammars = Grammars(loaded.tokenizer, vocab_size, loaded.eos_ids)
        self._tokenizer_lock = threading.Lock()
        self._core = BatchEngine(
            loaded.model,
            pad_id=loaded.tokenizer.pad_token_id,
            vocab_size=vocab_size,
            guard=_LazyGuard(self.grammars),
            uses_peft=loaded.uses_peft,
            max_batch=max_batch,
            max_waiting=max_waiting,
            gather_s=gather_s,
            failure_message=lambda exc: (
                f"generation failed ({type(exc).__name__}); the server log has the details"
            ),
            closing_message="the server is shutting down",
        )
        self.stats = self._core.stats

    @classmethod
    def load(
        cls,
        base: str,
        adapters: dict[str, str] | None = None,
        *,
        served_name: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        **options: Any,
    ) -> Engine:
        """Load the base model and adapters (served name → folder) and start the worker."""
        return cls(
            load_models(base, adapters, served_name=served_name, dtype=dtype, device=device), **options
        )

    # ------------------------------------------------------------------ requests in

    @property
    def models(self) -> list[ServedModel]:
        return list(self.loaded.served.values())

    def model(self, name: str) -> ServedModel:
        served = self.loaded.served.get(name)
        if served is None:
            raise UnknownModel(name, list(self.loaded.served))
        return served

    def prepare(
        self,
        model: str,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | tuple[str, ...] = (),
        seed: int | None = None,
        json_schema: dict[str, Any] | None = None,
        json_object: bool = False,
    ) -> PreparedRequest:
        """Tokenize `messages` in the model's chat template and check the request; RequestRejected if it is bad.

        `max_tokens=None` gives what the context and the server's cap leave.
        """
        served = self.model(model)
        with self._tokenizer_lock:  # prepare runs in several threads at once (asyncio.to_thread)
            prompt_ids = render_prompt(self.loaded.tokenizer, served, messages)
        limit = self.loaded.max_context
        if max_tokens is not None and max_tokens > self.max_tokens_cap:
            raise RequestRejected(
                f"max_tokens: {max_tokens} is more than this server allows ({self.max_tokens_cap})",
                param="max_tokens",
            )
        wanted = max_tokens if max_tokens is not None else min(self.max_tokens_cap, limit - len(prompt_ids))
        if len(prompt_ids) + max(wanted, 1) > limit:
            raise RequestRejected(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + max(wanted, 1)} tokens ({len(prompt_ids)} in the messages, "
                f"{max(wanted, 1)} in the completion). Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        grammar = None
        if json_schema is not None:
            grammar = self.grammars.json_schema(json_schema)
        elif json_object:
            grammar = self.grammars.json_object()
        params = SamplingParams(wanted, temperature, top_p, tuple(s for s in stop if s), seed, grammar)
        return PreparedRequest(served, prompt_ids, params)

    def submit(self, request: PreparedRequest, sink: Any) -> Sequence:
        """Queue a request; `sink(event)` is called from the worker thread. ServerBusy when the queue is full."""
        params = request.params
        seq = Sequence(
            adapter=request.model.adapter,
            prompt_ids=request.prompt_ids,
            params=params,
            sink=sink,
            decode=functools.partial(self.loaded.tokenizer.decode, skip_special_tokens=True),
            eos_ids=self.loaded.eos_ids,
        )
        if params.grammar is not None:
            seq.matcher = self.grammars.matcher(params.grammar)
            seq.token_bytes = self.grammars.guard.token_bytes
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            seq.generator = torch.Generator(device=self.loaded.device).manual_seed(seed)
        try:
            self._core.submit([seq])
        except EngineBusy as exc:
            raise ServerBusy(str(exc)) from None
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a request: it leaves the queue, or its row stops at the next step. Nothing more is sent."""
        self._core.cancel(seq)

    def start(self, request: PreparedRequest) -> AsyncEvents:
        """Queue a request and get its events in asyncio (call from the event loop)."""
        return AsyncEvents(self, request)

    def start_sync(self, request: PreparedRequest) -> SyncEvents:
        """Queue a request and get its events in plain blocking code."""
        return SyncEvents(self, request)

    def pending(self) -> int:
        """Requests not finished yet: waiting, or in the batch being generated."""
        return self._core.pending()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker: requests still waiting or running get Failed."""
        self._core.close(timeout)


class _LazyGuard:
    """The TokenGuard, built only when a row first needs it (building it costs a pass over the vocabulary)."""

    def __init__(self, grammars: Grammars):
        self._grammars = grammars

    def mask(self, scores: torch.Tensor, row: int, tail: bytes) -> None:
        self._grammars.guard.mask(scores, row, tail)


class AsyncEvents:
    """A queued request's events for asyncio code: `async with engine.start(req) as events: async for ...`.

    Leaving the block early (client gone, task cancelled) cancels the request and frees its slot.
    """

    def __init__(self, engine: Engine, request: PreparedRequest):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._held: Event | None = None
        self._ended = False
        self.seq = engine.submit(request, self._put)

    def _put(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.seq.cancelled = True

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        """The next event. Text that piled up while the consumer was busy comes as one Delta, so a slow client
        gets fewer, longer chunks instead of falling further behind."""
        if self._ended:
            raise StopAsyncIteration
        event = self._held if self._held is not None else await self._queue.get()
        self._held = None
        if not isinstance(event, Delta):
            self._ended = True
            return event
        texts = [event.text]
        while not self._queue.empty():
            following = self._queue.get_nowait()
            if not isinstance(following, Delta):
                self._held = following
                break
            texts.append(following.text)
        return Delta("".join(texts)) if len(texts) > 1 else event

    def cancel(self) -> None:
        self._engine.cancel(self.seq)

    async def __aenter__(self) -> AsyncEvents:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.seq.finished or not self._ended:
            self.cancel()


class SyncEvents:
    """A queued request's events for blocking code: `with engine.start_sync(req) as events: for ...`."""

    def __init__(self, engine: Engine, request: PreparedRequest):
        self._engine = engine
        self._queue: queue.Queue[Event] = queue.Queue()
        self._ended = False
        self.seq = engine.submit(request, self._queue.put)

    def __iter__(self) -> Iterator[Event]:
        while not self._ended:
            event = self._queue.get()
            if not isinstance(event, Delta):
                self._ended = True
            yield event

    def cancel(self) -> None:
        self._engine.cancel(self.seq)

    def __enter__(self) -> SyncEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._ended:
            self.cancel()


__all__ = ["AsyncEvents", "Engine", "Failed", "PreparedRequest", "SyncEvents", "remove_adapter_hooks"]
