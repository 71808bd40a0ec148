"""Batched generation over one base model and its LoRA adapters, for the server and the terminal chat.

```python
engine = Engine.load("models/tiny", {"docs": "runs/x/adapter"})
request = engine.prepare("docs", [{"role": "user", "content": "Hi"}], max_tokens=64)   # RequestRejected: 4xx
async with engine.start(request) as events:            # or `with engine.start_sync(request) as events:`
    async for event in events: ...                     # Delta(text)..., then Done(...) or Failed(...)
engine.close()
```

How requests share the model:
- One worker thread owns the model. Requests wait in one FIFO queue; the worker takes up to `max_batch` of them
  into one `model.generate` call, so one forward pass serves all of them. Base and adapter rows mix in a batch
  (PEFT's `adapter_names`), and so do rows with and without a JSON schema.
- Sampling parameters are per row, not per batch: `generate` runs greedy and `RowSampler` draws each sampled
  row's token from its own temperature, top_p and seeded generator. `max_tokens` and `stop` are per row too
  (`BatchStopper`). So no request waits for a batch of "compatible" ones.
- Fairness: when requests are waiting and the batch has room, the running call ends after `join_after`
  tokens; its unfinished rows go on in the next call (prompt + text so far read again) together with the
  newcomers. A new request therefore waits at most `join_after` decoding steps for a free slot, never for an
  unrelated long batch; beyond `max_batch`, requests are served first come, first served.
- A cancelled request (client gone) leaves the queue at once, or stops its row at the next step; a batch whose
  rows are all done ends.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from doctune.serve.models import Grammars, LoadedModels, ServedModel, load_models, render_prompt
from doctune.serve.processors import BatchStopper, GrammarMasks, RowSampler
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
        join_after: int = 16,
        max_waiting: int = 1024,
        gather_s: float = 0.005,
    ):
        self.loaded = loaded
        self.max_batch = max_batch
        self.max_tokens_cap = max_tokens_cap
        self.join_after = join_after
        self.max_waiting = max_waiting
        self.gather_s = gather_s
        vocab_size = int(loaded.model.config.vocab_size)
        self.grammars = Grammars(loaded.tokenizer, vocab_size, loaded.eos_ids)
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "failed_batches": 0, "cancelled": 0}
        self._vocab_size = vocab_size
        self._generation_options = {
            "do_sample": False,
            "eos_token_id": sorted(loaded.eos_ids),
            "pad_token_id": loaded.tokenizer.pad_token_id,
            "bos_token_id": loaded.tokenizer.bos_token_id,
        }
        self._tokenizer_lock = threading.Lock()
        self._running: list[Sequence] = []
        self._waiting: deque[Sequence] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="doctune-engine", daemon=True)
        self._thread.start()

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
        with self._cv:
            if self._closing:
                raise ServerBusy("the server is shutting down; send the request again later")
            if len(self._waiting) >= self.max_waiting:
                raise ServerBusy(f"{len(self._waiting)} requests are already waiting; try again shortly")
            self._waiting.append(seq)
            self._cv.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a request: it leaves the queue, or its row stops at the next step. Nothing more is sent."""
        seq.cancelled = True
        with self._cv:
            if seq in self._waiting:
                self._waiting.remove(seq)

    def start(self, request: PreparedRequest) -> AsyncEvents:
        """Queue a request and get its events in asyncio (call from the event loop)."""
        return AsyncEvents(self, request)

    def start_sync(self, request: PreparedRequest) -> SyncEvents:
        """Queue a request and get its events in plain blocking code."""
        return SyncEvents(self, request)

    def pending(self) -> int:
        """Requests not finished yet: waiting, or in the batch being generated."""
        return len(self._waiting) + sum(not seq.finished for seq in list(self._running))

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker: requests still waiting get Failed, the running batch stops at its next step."""
        with self._cv:
            self._closing = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cv.notify_all()
        for seq in left:
            seq.fail("the server is shutting down")
        for seq in list(self._running):
            seq.cancelled = True
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        active: list[Sequence] = []
        while True:
            batch = self._next_batch(active)
            if batch is None:
                for seq in active:
                    seq.fail("the server is shutting down")
                return
            if batch:
                self._generate(batch)
            active = [seq for seq in batch if not seq.finished]
            self.stats["cancelled"] += sum(seq.finish_reason == "cancelled" for seq in batch)
            self._running = active

    def _next_batch(self, active: list[Sequence]) -> list[Sequence] | None:
        """The rows of the next call: unfinished rows first, then waiting requests in arrival order."""
        with self._cv:
            if not active:
                while not self._waiting and not self._closing:
                    self._cv.wait()
                deadline = time.monotonic() + self.gather_s
                while len(self._waiting) < self.max_batch and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            if self._closing:
                return None
            for seq in active:
                if seq.cancelled:
                    seq.finish_reason = "cancelled"
            batch = [seq for seq in active if not seq.finished]
            while self._waiting and len(batch) < self.max_batch:
                seq = self._waiting.popleft()
                if not seq.cancelled:
                    batch.append(seq)
            return batch

    def _should_yield(self, unfinished: int) -> bool:
        return unfinished < self.max_batch and len(self._waiting) > 0

    def _generate(self, rows: list[Sequence]) -> None:
        tokenizer = self.loaded.tokenizer
        device = self.loaded.device
        inputs = [row.input_ids() for row in rows]
        width = max(len(ids) for ids in inputs)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in inputs], device=device)
        attention_mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in inputs], device=device
        )
        self._running = rows
        before = [len(row.generated) for row in rows]
        stopper = BatchStopper(rows, self._should_yield, self.join_after)
        processors = LogitsProcessorList()
        if any(row.matcher is not None for row in rows):
            processors.append(GrammarMasks(rows, self._vocab_size, self.grammars.guard))
        if any(row.params.temperature > 0 for row in rows):
            processors.append(RowSampler(rows))
        extra: dict[str, Any] = {}
        if self.loaded.uses_peft:
            # PEFT issue #3475: a wrong-length adapter_names (or any error) inside generate leaves hooks behind.
            extra["adapter_names"] = [row.adapter for row in rows]
            assert len(extra["adapter_names"]) == input_ids.shape[0]
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        try:
            with torch.inference_mode():
                self.loaded.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=GenerationConfig(
                        **self._generation_options,
                        max_new_tokens=max(row.params.max_tokens - len(row.generated) for row in rows),
                    ),
                    logits_processor=processors,
                    stopping_criteria=StoppingCriteriaList([stopper]),
                    **extra,
                )
        except Exception as exc:  # every row is told, the model is made usable again, the server goes on
            log.exception("generation failed for a batch of %d request(s)", len(rows))
            self.stats["failed_batches"] += 1
            if self.loaded.uses_peft:
                remove_adapter_hooks(self.loaded.model)
            for row in rows:
                row.fail(f"generation failed ({type(exc).__name__}); the server log has the details")
            return
        if not stopper.yielded:
            for row, n in zip(rows, before, strict=True):
                if not row.finished and len(row.generated) == n:
                    row.fail("generation made no progress")


def remove_adapter_hooks(model: Any) -> int:
    """Remove the `adapter_names` hooks that PEFT leaves on the model when generate raises (PEFT #3475)."""
    from peft.tuners.lora.model import _adapter_names_pre_forward_hook

    removed = 0
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, functools.partial) and hook.func is _adapter_names_pre_forward_hook:
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                removed += 1
    if removed:
        log.warning("removed %d stale PEFT adapter hooks after a failed batch", removed)
    return removed


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
