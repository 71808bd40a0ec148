"""JSON-schema constrained decoding for in-process transformers models, with xgrammar.

```python
grammars = SchemaGrammars(tokenizer, vocab_size=model.config.vocab_size, stop_token_ids=[eot, eos])
processor = grammars.processor(schema, batch_size=len(prompts))    # a new one for every generate() call
model.generate(**batch, logits_processor=[processor])
```

`generation_safe_schema` bounds every string and array of a schema, so that even a model that writes noise
(the tiny test model) closes its strings and lists within a few hundred tokens and yields strict JSON.
`TokenGuard` closes two gaps of xgrammar 0.2.8 that a random model finds at once: it lets special tokens
(`<|pad|>`) into strings, and its UTF-8 automaton accepts overlong forms and surrogates (F0 87 90 98, ED A0 80)
that decode to U+FFFD, so decoded strings broke their `pattern` bounds.
"""

from __future__ import annotations

import codecs
import copy
import json
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr
from transformers import LogitsProcessor

from doctune.llm.structured import text_pattern

_STRING_BOUNDED_BY = ("pattern", "enum", "const", "format")


def generation_safe_schema(
    schema: dict[str, Any], *, max_string_chars: int = 128, max_items: int = 8
) -> dict[str, Any]:
    """A copy of `schema` where every string without a pattern/enum/const/format gets
    `pattern: ^[^\\x00-\\x1f"\\\\]{min,max}$` (maxLength, when given, lowers the bound and is dropped: xgrammar
    lets control characters through with it) and every array without maxItems gets `maxItems`.

    >>> generation_safe_schema({"type": "array", "items": {"type": "string"}}, max_string_chars=5, max_items=2)
    {'type': 'array', 'items': {'type': 'string', 'pattern': '^[^\\\\x00-\\\\x1f"\\\\\\\\]{1,5}$'}, 'maxItems': 2}
    """
    out = copy.deepcopy(schema)
    _bound(out, max_string_chars, max_items)
    return out


def _bound(node: Any, max_chars: int, max_items: int) -> None:
    if isinstance(node, list):
        for item in node:
            _bound(item, max_chars, max_items)
        return
    if not isinstance(node, dict):
        return
    types = node.get("type")
    types = types if isinstance(types, list) else [types]
    if "string" in types and not any(key in node for key in _STRING_BOUNDED_BY):
        longest = min(max_chars, node.pop("maxLength", max_chars))
        shortest = min(max(1, node.pop("minLength", 1)), longest)
        node["pattern"] = text_pattern(longest, min(shortest, 100))
    if "array" in types and "maxItems" not in node:
        node["maxItems"] = max(max_items, node.get("minItems", 0))
    for key, value in node.items():
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
            for sub in value.values():
                _bound(sub, max_chars, max_items)
        elif key in ("items", "additionalProperties", "prefixItems", "anyOf", "oneOf", "allOf", "not"):
            _bound(value, max_chars, max_items)


class SchemaGrammars:
    """Compiles JSON schemas for one tokenizer (compiled grammars are cached by xgrammar) and makes the
    logits processors that enforce them."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_token_ids: list[int]):
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        self._compiler = xgr.GrammarCompiler(info)
        special = set(tokenizer.all_special_ids)
        special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.guard = TokenGuard.build(info.decoded_vocab, special_ids=special, stop_ids=set(stop_token_ids))

    def compile(self, schema: dict[str, Any]) -> xgr.CompiledGrammar:
        """Compile `schema` (compact JSON: no free whitespace, so a model cannot wander off in spaces)."""
        return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def processor(self, schema: dict[str, Any], batch_size: int) -> GrammarLogitsProcessor:
        return GrammarLogitsProcessor(self.compile(schema), batch_size, self.guard)


# After these lead bytes the second byte of a UTF-8 sequence has a narrower range than 80-BF (RFC 3629
# table 3-7). xgrammar 0.2.8 allows the whole range, so overlong forms (F0 87 90 98) and surrogates (ED A0 80)
# get through and decode to U+FFFD.
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


@dataclass
class TokenGuard:
    """Tokens a grammar-constrained row must not write, on top of what xgrammar forbids: special tokens
    (xgrammar sees `<|pad|>` as the text "<|pad|>" and allows it inside strings; decoding then drops it) and
    tokens that would make the output invalid UTF-8."""

    token_bytes: list[bytes]
    never: torch.Tensor  # ids never allowed while a row follows its grammar
    after_lead: dict[int, torch.Tensor]  # lead byte -> ids whose first byte cannot follow it

    @classmethod
    def build(cls, decoded_vocab: list[bytes], *, special_ids: set[int], stop_ids: set[int]) -> TokenGuard:
        never = set(special_ids) - set(stop_ids)
        after_lead: dict[int, list[int]] = {lead: [] for lead in _SECOND_BYTE}
        for token_id, raw in enumerate(decoded_vocab):
            if token_id in special_ids or not raw:
                continue
            if _invalid_utf8_inside(raw):
                never.add(token_id)
            if 0x80 <= raw[0] <= 0xBF:
                for lead, (low, high) in _SECOND_BYTE.items():
                    if not low <= raw[0] <= high:
                        after_lead[lead].append(token_id)
        return cls(
            token_bytes=[b"" if i in special_ids else raw for i, raw in enumerate(decoded_vocab)],
            never=_id_tensor(never),
            after_lead={lead: _id_tensor(ids) for lead, ids in after_lead.items()},
        )

    def mask(self, scores: torch.Tensor, row: int, tail: bytes) -> None:
        """Set to -inf, in place, the scores of tokens row `row` must not write after the bytes `tail`."""
        scores[row, self.never.to(scores.device)] = float("-inf")
        if tail and tail[-1] in self.after_lead:
            scores[row, self.after_lead[tail[-1]].to(scores.device)] = float("-inf")


def _id_tensor(ids: set[int] | list[int]) -> torch.Tensor:
    return torch.tensor(sorted(ids), dtype=torch.long)


def _invalid_utf8_inside(raw: bytes) -> bool:
    """True when `raw`, past the continuation bytes it may start with, holds a byte sequence that is not UTF-8
    whatever precedes or follows it (a sequence cut at the token's end is fine)."""
    start = 0
    while start < len(raw) and 0x80 <= raw[start] <= 0xBF:
        start += 1
    try:
        codecs.getincrementaldecoder("utf-8")().decode(raw[start:], final=False)
    except UnicodeDecodeError:
        return True
    return False


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks, for each row of one `generate()` call, every token the grammar (and the TokenGuard) does not
    allow next.

    Unlike xgrammar.contrib.hf.LogitsProcessor, a row stopped by another criterion (a stop string) and then
    fed pad tokens is left alone instead of failing an assertion. Use one instance per `generate()` call.
    """

    def __init__(self, compiled: xgr.CompiledGrammar, batch_size: int, guard: TokenGuard | None = None):
        self.matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch_size)]
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.bitmask = xgr.allocate_token_bitmask(batch_size, self.vocab_size)
        self.following = [True] * batch_size  # False once a row left the grammar (stopped by something else)
        self.guard = guard
        self.tails = [b""] * batch_size  # last bytes each row wrote: an unfinished UTF-8 sequence shows here
        self._started = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != len(self.matchers):
            raise ValueError(f"grammar processor made for {len(self.matchers)} rows got {input_ids.shape[0]}")
        if self._started:
            self._accept(input_ids[:, -1].tolist())
        self._started = True
        rows = [i for i, m in enumerate(self.matchers) if self.following[i] and not m.is_terminated()]
        if not rows:
            return scores
        for i in rows:
            self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
        on_cpu = scores.device.type not in ("cpu", "cuda")
        target = scores.to("cpu") if on_cpu else scores
        xgr.apply_token_bitmask_inplace(
            target, self.bitmask.to(target.device), vocab_size=self.vocab_size, indices=rows
        )
        if self.guard is not None:
            for i in rows:
                self.guard.mask(target, i, self.tails[i])
        return target.to(scores.device) if on_cpu else target

    def _accept(self, tokens: list[int]) -> None:
        for i, token in enumerate(tokens):
            matcher = self.matchers[i]
            if not self.following[i] or matcher.is_terminated():
                continue
            if not matcher.accept_token(token):
                self.following[i] = False
            elif self.guard is not None and token < len(self.guard.token_bytes):
                self.tails[i] = (self.tails[i] + self.guard.token_bytes[token])[-4:]
