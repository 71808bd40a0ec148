"""The per-row logits processing of the serve engine: it is the one engine of llm/engine.py, so these are its
processors, kept importable from here.

- `GrammarMasks`: each row with a `response_format` gets its own xgrammar mask, plus llm/grammar.py's TokenGuard.
- `RowSampler`: per-row temperature, top_p and seed; greedy rows are left alone.
"""

from doctune.llm.engine import GrammarMasks, RowSampler, top_p_filter

__all__ = ["GrammarMasks", "RowSampler", "top_p_filter"]
