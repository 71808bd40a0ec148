"""String bounds for in-process teachers come from the tokenizer's measured characters per token (issue 13.2)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from doctune.config import ModelConfig
from doctune.generate import (
    ENVELOPE,
    MAX_TEXT_CHARS,
    MIN_TEXT_CHARS,
    PAIR_SKELETON,
    SAMPLE_CHARS,
    ReplyCosts,
    measure_reply_costs,
    text_bound,
)
from doctune.llm.cache import CachedLLM, ResponseCache
from doctune.llm.hf_backend import HFBackend

DOCS = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "data"


def quickstart_texts() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md")) + sorted(DOCS.glob("*.txt"))]


def expected_bound(max_tokens: int, n: int, cpt: float, envelope: int, pair: int) -> int:
    """The arithmetic, spelt out: what is left per pair after the JSON, halved between question and answer."""
    per_pair_tokens = (max_tokens - envelope) // n
    per_string_tokens = (per_pair_tokens - pair) // 2
    return max(MIN_TEXT_CHARS, min(MAX_TEXT_CHARS, int(per_string_tokens * cpt)))


class TokenizerOnly:
    """A teacher whose tokenizer is all this test needs (count_tokens, as HFBackend has it)."""

    name = "tokenizer-only"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    async def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


def test_a_server_teacher_keeps_the_worst_case_of_one_token_per_character():
    class Server:
        name = "server"

    assert asyncio.run(measure_reply_costs(Server(), ["some text"])) == ReplyCosts()
    assert text_bound(512, 11) == MIN_TEXT_CHARS  # the 16 characters: why measuring matters


def test_tiny_model_bounds_follow_its_measured_characters_per_token(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    texts = quickstart_texts()
    backend = HFBackend(ModelConfig(backend="hf", model=str(tiny_model_dir)))
    llm = CachedLLM(backend, ResponseCache(tmp_path / "cache.sqlite"))  # as generate gets it
    costs = asyncio.run(measure_reply_costs(llm, texts))

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    sample = "\n\n".join(texts)[:SAMPLE_CHARS]
    docs_rate = len(sample) / len(tok.encode(sample, add_special_tokens=False))
    assert costs.chars_per_token == pytest.approx(docs_rate)
    assert 1.0 <= costs.chars_per_token <= 3.0  # a byte-level BPE with a small vocabulary
    assert costs.envelope_tokens == len(tok.encode(ENVELOPE, add_special_tokens=False))
    assert costs.pair_tokens == len(tok.encode(PAIR_SKELETON, add_special_tokens=False))
    for n in (1, 3, 11):
        bound = text_bound(512, n, costs)
        assert bound == expected_bound(
            512, n, costs.chars_per_token, costs.envelope_tokens, costs.pair_tokens
        )
        # a reply of n pairs with strings at the bound fits in 512 tokens at the measured rate
        assert costs.envelope_tokens + n * (costs.pair_tokens + 2 * bound / costs.chars_per_token) <= 512 + 1
    assert text_bound(512, 11, costs) > text_bound(512, 11)


@pytest.mark.slow
def test_smollm2_bounds_follow_its_measured_characters_per_token(smollm2_gguf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    texts = quickstart_texts()
    costs = asyncio.run(measure_reply_costs(TokenizerOnly(tok), texts))
    assert 3.0 <= costs.chars_per_token <= 5.5, costs  # English prose, a 49k vocabulary: about 4
    assert costs.envelope_tokens < 16 and costs.pair_tokens < 32  # fewer than its characters
    # the run: 120 questions over 11 chunks, max_tokens 512 -> 11 a chunk; and smaller asks
    for n in (11, 3, 1):
        bound = text_bound(512, n, costs)
        assert bound == expected_bound(
            512, n, costs.chars_per_token, costs.envelope_tokens, costs.pair_tokens
        )
    assert text_bound(512, 11, costs) >= 60  # a whole question, not 16 characters cut mid-phrase
    assert text_bound(512, 1, costs) == MAX_TEXT_CHARS
