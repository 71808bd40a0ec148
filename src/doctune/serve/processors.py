"""The hooks that let one `model.generate` call serve rows that each want something different.

- `GrammarMasks`: each row with a `response_format` gets its own xgrammar mask, plus llm/grammar.py's
  TokenGuard (no special tokens, no invalid UTF-8 inside the JSON); other rows are left alone.
- `RowSampler`: per-row temperature, top_p and seed. `generate` itself runs greedy; for every sampled row this
  draws the token from the row's own distribution and `torch.Generator`, and leaves only that token possible,
  so greedy picks it. Greedy rows (temperature 0) are left alone. It runs after the grammar masks.
- `BatchStopper`: hands each new token to its row's `Sequence` (text, stop strings, max_tokens, end of turn,
  cancellation), tells `generate` which rows are done, and ends the whole call early when requests are waiting
  to join the batch (the engine then carries on the unfinished rows together with the newcomers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from doctune.serve.requests import Sequence


class GrammarMasks(LogitsProcessor):
    """Masks out, for each row with a grammar matcher, every token its grammar does not allow next.

    The matchers advance in `Sequence.push` (which sees every token once), so this only reads their state.
    """

    def __init__(self, rows: list[Sequence], vocab_size: int, guard: Any = None):
        import xgrammar as xgr

        self.rows = rows
        self.guard = guard
        self.with_grammar = [i for i, row in enumerate(rows) if row.matcher is not None]
        self.bitmask = xgr.allocate_token_bitmask(len(rows), vocab_size)
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
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
    """Samples each row with temperature > 0 from its own temperature, top_p and generator."""

    def __init__(self, rows: list[Sequence]):
        self.rows = rows
        self.sampled = [i for i, row in enumerate(rows) if row.params.temperature > 0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
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


class BatchStopper(StoppingCriteria):
    """Per-row stopping for one `generate` call, and the point where waiting requests may join.

    `should_yield(n_unfinished)` is asked after `yield_after` steps: when it says yes, the call ends with the
    unfinished rows still open (`yielded` is then True), and the engine re-forms the batch.
    """

    def __init__(self, rows: list[Sequence], should_yield: Callable[[int], bool], yield_after: int):
        self.rows = rows
        self.should_yield = should_yield
        self.yield_after = yield_after
        self.steps = 0
        self.yielded = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
            row.push(token)
        done = [row.finished for row in self.rows]
        unfinished = done.count(False)
        if unfinished and self.steps >= self.yield_after and self.should_yield(unfinished):
            self.yielded = True
            done = [True] * len(done)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
