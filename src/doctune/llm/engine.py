"""Continuous batching over one transformers model (and its LoRA adapters): the one generation engine under the
in-process `hf` backend (generate, curate, eval) and the server (serve, chat).

```python
engine = BatchEngine(model, pad_id=tokenizer.pad_token_id, vocab_size=model.config.vocab_size, max_batch=8)
engine.submit([row, ...])     # rows: objects with the `Row` attributes; row.push(token) gets each new token
...
engine.close()
```

How it works. One worker thread owns the model and runs a decode loop over a KV cache (transformers'
`DynamicCache`). Each step:
1. picks every active row's next token from its logits: the row's xgrammar mask (`GrammarMasks`), its own
   temperature, top_p and seeded generator (`RowSampler`), else greedy; and hands it to the row (`row.push`),
   which decides whether it is done (end of turn, stop string, max_tokens, cancelled);
2. drops the rows that finished: their cache rows leave (`index_select` on the batch dimension) and the columns
   that only padded them go too;
3. runs one forward pass over the survivors' new tokens;
4. prefills waiting requests (up to the free slots) in one left-padded forward pass and concatenates their cache
   with the running one, each left-padded to the longer.
So a slot freed by a short answer is refilled at the next step; no row waits for the longest row of its batch.
Newcomers are admitted together once they would fill the free slots or the oldest has waited `gather_s`.

Each row's positions come from its own attention mask (left padding only), so its logits are those of its prompt
alone: greedy answers equal one-at-a-time generation (tests/llm/test_hf_backend.py checks it against
`model.generate`). With several PEFT adapters loaded, each row names its own (`adapter_names` per forward);
PEFT issue #3475 leaves hooks behind when a forward raises, so the engine removes them and fails the rows of that
step only; the model stays usable.

Why not transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`, 5.24): its logits
processors are a fixed set of per-token tensors (temperature, top-k/p), with no per-request stateful processor
for an xgrammar matcher, and it has no per-request PEFT adapter.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import DynamicCache, LogitsProcessor
from transformers.cache_utils import DynamicLayer

from doctune.errors import LLMError

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"


class Row(Protocol):
    """What the engine needs of a request. `params` has `temperature`, `top_p` and `max_tokens`; `matcher` is
    an xgrammar GrammarMatcher or None (the row advances it in `push`); `generator` seeds sampled rows."""

    prompt_ids: list[int]
    adapter: str
    params: Any
    matcher: Any
    grammar_tail: bytes
    generator: Any
    cancelled: bool

    @property
    def finished(self) -> bool: ...

    def push(self, token: int) -> None: ...

    def fail(self, message: str) -> None: ...


class EngineBusy(LLMError):
    """The engine takes no more requests now (queue full, or closing)."""


def _failure_message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"generation failed: {type(exc).__name__}: {(text[0] if text else '')[:300]}"


class BatchEngine:
    def __init__(
        self,
        model: Any,
        *,
        pad_id: int,
        vocab_size: int,
        guard: Any = None,
        uses_peft: bool = False,
        max_batch: int = 32,
        max_waiting: int = 1_000_000,
        gather_s: float = 0.005,
        stats: dict[str, int] | None = None,
        failure_message: Callable[[BaseException], str] = _failure_message,
        closing_message: str = "the engine was closed before this request finished",
    ):
        self.model = model
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.guard = guard
        self.uses_peft = uses_peft
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.gather_s = gather_s
        self.failure_message = failure_message
        self.closing_message = closing_message
        self.stats = stats if stats is not None else {}
        for key in ("batches", "steps", "rows", "largest_batch", "failed_batches", "cancelled"):
            self.stats.setdefault(key, 0)
        self.device = next(model.parameters()).device
        self._waiting: deque[tuple[float, Row]] = deque()
        self._running: list[Row] = []
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="doctune-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests in

    def submit(self, rows: list[Row]) -> None:
        """Queue rows (all at once, so they can share their prefill). EngineBusy if closing or the queue is full."""
        with self._cv:
            if self._closing:
                raise EngineBusy("shutting down; send the request again later")
            if len(self._waiting) + len(rows) > self.max_waiting:
                raise EngineBusy(f"{len(self._waiting)} requests are already waiting; try again shortly")
            now = time.monotonic()
            self._waiting.extend((now, row) for row in rows)
            self._cv.notify()

    def cancel(self, row: Row) -> None:
        """Stop a request: it leaves the queue at once, or its row stops at the next step."""
        row.cancelled = True
        with self._cv:
            for item in self._waiting:
                if item[1] is row:
                    self._waiting.remove(item)
                    self.stats["cancelled"] += 1
                    break

    def pending(self) -> int:
        """Requests not finished yet: waiting, or in the running batch."""
        return len(self._waiting) + sum(not row.finished for row in list(self._running))

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker: waiting and running requests fail with `closing_message`."""
        with self._cv:
            self._closing = True
            left = [row for _, row in self._waiting]
            self._waiting.clear()
            self._cv.notify_all()
        for row in left:
            row.fail(self.closing_message)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        batch: _Batch | None = None
        while True:
            newcomers = self._admit(len(batch.rows) if batch else 0)
            if newcomers is None:
                for row in batch.rows if batch else []:
                    row.fail(self.closing_message)
                self._running = []
                return
            self._running = (batch.rows if batch else []) + newcomers
            if batch is not None:
                batch = self._guarded(self._advance, batch, batch.rows)
            joined = (
                self._guarded(self._prefill, newcomers, newcomers) if newcomers else None
            )  # spares the others
            if joined is not None and batch is not None:
                batch = self._guarded(batch.concat, joined, batch.rows + joined.rows)
            elif joined is not None:
                batch = joined
            self._running = batch.rows if batch else []

    def _guarded(self, step: Callable[[Any], _Batch | None], arg: Any, rows: list[Row]) -> _Batch | None:
        """`step(arg)`; if it raises, every row of it is told and None returned (the model stays usable)."""
        try:
            return step(arg)
        except Exception as exc:  # the loop goes on for the other rows and later requests
            log.exception("generation failed for a batch of %d request(s)", len(rows))
            self.stats["failed_batches"] += 1
            for row in rows:
                row.fail(self.failure_message(exc))
            return None

    def _admit(self, active: int) -> list[Row] | None:
        """Waiting rows to prefill now (maybe none); None when closing. Blocks while there is nothing to do."""
        with self._cv:
            if not active:
                while not self._waiting and not self._closing:
                    self._cv.wait()
            free = self.max_batch - active
            if self._waiting and free > 0 and len(self._waiting) < free:
                deadline = self._waiting[0][0] + self.gather_s
                while not active and len(self._waiting) < free and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if active and time.monotonic() < deadline and len(self._waiting) < free:
                    return []  # let more newcomers gather; the running rows go on meanwhile
            if self._closing:
                return None
            taken: list[Row] = []
            while self._waiting and len(taken) < free:
                _, row = self._waiting.popleft()
                if not row.cancelled:
                    taken.append(row)
            return taken

    def _advance(self, batch: _Batch) -> _Batch | None:
        """Give every row its next token, drop finished rows, run one decode step for the rest."""
        tokens = self._choose(batch.rows, batch.logits)
        cancelled = [row.cancelled for row in batch.rows]
        for row, token in zip(batch.rows, tokens, strict=True):
            row.push(token)
        keep = [i for i, row in enumerate(batch.rows) if not row.finished]
        self.stats["cancelled"] += sum(
            c and row.finished for c, row in zip(cancelled, batch.rows, strict=True)
        )
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            batch.select(keep)
            tokens = [tokens[i] for i in keep]
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        positions = batch.mask.sum(dim=-1, keepdim=True)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(keep), 1))], dim=-1)
        batch.logits = self._forward(
            batch.rows,
            input_ids=input_ids,
            attention_mask=batch.mask,
            position_ids=positions,
            cache=batch.cache,
        )
        self.stats["steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch.rows))
        return batch

    def _prefill(self, rows: list[Row]) -> _Batch:
        """One left-padded forward pass over the newcomers' prompts: their cache and first logits."""
        width = max(len(row.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            mask[i, width - len(row.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(
            rows, input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache
        )
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            raise LLMError(f"the engine handles full-attention KV caches only; this model uses {kinds}")
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        return _Batch(list(rows), cache, mask, logits)

    def _forward(self, rows: list[Row], **inputs: Any) -> torch.Tensor:
        """The model's last-position logits (float32) for `inputs`; each row with its adapter when PEFT mixes them."""
        extra: dict[str, Any] = {}
        if self.uses_peft:
            extra["adapter_names"] = [row.adapter for row in rows]
            if (
                len(extra["adapter_names"]) != inputs["input_ids"].shape[0]
            ):  # PEFT #3475: check before calling
                raise ValueError("adapter_names and the batch differ in length")
        try:
            out = self.model(**inputs, **extra, use_cache=True, logits_to_keep=1)
        except BaseException:
            if self.uses_peft:
                remove_adapter_hooks(self.model)
            raise
        return out.logits[:, -1, :].float()

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token: grammar mask, then its own sampling, else greedy."""
        if any(row.matcher is not None for row in rows):
            logits = GrammarMasks(rows, self.vocab_size, self.guard)(None, logits)
        if any(row.params.temperature > 0 for row in rows):
            logits = RowSampler(rows)(None, logits)
        return logits.argmax(dim=-1).tolist()


@dataclass
class _Batch:
    """The running rows, their KV cache, attention mask (B, L; left padded) and next-token logits (B, V)."""

    rows: list[Row]
    cache: Any
    mask: torch.Tensor
    logits: torch.Tensor

    def select(self, keep: list[int]) -> None:
        """Keep only rows `keep`, and drop the leading columns that pad every remaining row."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask.index_select(0, index)
        self.logits = self.logits.index_select(0, index)
        first = int(self.mask.any(dim=0).nonzero()[0])
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self.mask = self.mask[:, first:]

    def concat(self, other: _Batch) -> _Batch:
        """This batch's rows followed by `other`'s, the shorter cache left-padded to the longer."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, -2), _left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([_left_pad(mine.values, width, -2), _left_pad(theirs.values, width, -2)])
        self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(other.mask, width, -1)])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows = self.rows + other.rows
        return self


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


# -- per-row logits processing ---------------------------------------------------------------------------------


class GrammarMasks(LogitsProcessor):
    """Masks out, for each row with a grammar matcher, every token its grammar does not allow next, plus
    llm/grammar.py's TokenGuard (no special tokens, no invalid UTF-8 inside the JSON); other rows are left alone.

    The matchers advance in the rows' `push` (which sees every token once), so this only reads their state.
    """

    def __init__(self, rows: list[Any], vocab_size: int, guard: Any = None):
        import xgrammar as xgr

        self.rows = rows
        self.guard = guard
        self.with_grammar = [i for i, row in enumerate(rows) if row.matcher is not None]
        self.bitmask = xgr.allocate_token_bitmask(len(rows), vocab_size)
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.LongTensor | None, scores: torch.FloatTensor) -> torch.FloatTensor:
        import xgrammar as xgr

        active = [
            i
            for i in self.with_grammar
            if not self.rows[i].finished and not self.rows[i].matcher.is_terminated()
        ]
        for i in active:
            self.rows[i].matcher.fill_next_token_bitmask(self.bitmask, i)
        if active:
            bitmask = self.bitmask.to(scores.device) if scores.device.type == "cuda" else self.bitmask
            xgr.apply_token_bitmask_inplace(scores, bitmask, vocab_size=self.vocab_size, indices=active)
            if self.guard is not None:
                for i in active:
                    self.guard.mask(scores, i, self.rows[i].grammar_tail)
        return scores


class RowSampler(LogitsProcessor):
    """Samples each row with temperature > 0 from its own temperature, top_p and generator, and leaves only that
    token possible (greedy then picks it). Greedy rows (temperature 0) are left alone."""

    def __init__(self, rows: list[Any]):
        self.rows = rows
        self.sampled = [i for i, row in enumerate(rows) if row.params.temperature > 0]

    def __call__(self, input_ids: torch.LongTensor | None, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i in self.sampled:
            row = self.rows[i]
            if row.finished:
                continue
            probs = torch.softmax(scores[i].float() / row.params.temperature, dim=-1)
            if row.params.top_p < 1.0:
                probs = top_p_filter(probs, row.params.top_p)
            token = torch.multinomial(probs, 1, generator=row.generator)
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities add up to `top_p` (at least one), renormalised.

    >>> top_p_filter(torch.tensor([0.1, 0.6, 0.3]), 0.8).tolist()
    [0.0, 0.6666666865348816, 0.3333333432674408]
    """
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = before < top_p
    keep_sorted[0] = True
    keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum()


def remove_adapter_hooks(model: Any) -> int:
    """Remove the `adapter_names` hooks that PEFT leaves on the model when a forward raises (PEFT #3475)."""
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
