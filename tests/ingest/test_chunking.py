"""Chunking: size never above the limit (checked with the real counter), natural ends, overlap, offsets that
index the document text, and the choice of counter."""

from __future__ import annotations

import doctest
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from doctune.config import ModelConfig, build_config
from doctune.errors import ConfigError
from doctune.ingest import chunking
from doctune.ingest.chunking import CharCounter, Chunker, TokenizerCounter, counter_for

from .pdfs import paragraphs


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def check_chunks(text, chunks, max_tokens, count):
    """What every user of chunks.jsonl relies on."""
    assert chunks or not text.strip()
    covered = 0
    for prev, chunk in zip([None, *chunks], chunks, strict=False):
        assert chunk.text == text[chunk.start : chunk.end]
        assert chunk.text and chunk.text == chunk.text.strip()
        assert chunk.n_tokens == count(chunk.text) <= max_tokens
        if prev is not None:  # each chunk starts and ends later than the one before
            assert chunk.start > prev.start and chunk.end > prev.end
        assert text[covered : chunk.start].strip() == "", "text between chunks was lost"
        covered = max(covered, chunk.end)
    assert text[covered:].strip() == ""


DOC = "\n\n".join(paragraphs(40, seed=1))


@pytest.mark.parametrize(("max_tokens", "overlap"), [(16, 0), (64, 8), (200, 30), (1024, 64)])
def test_chars4_chunks_stay_within_the_limit_and_cover_the_text(max_tokens, overlap):
    chunks = list(Chunker(CharCounter(), max_tokens, overlap).chunks([DOC]))
    check_chunks(DOC, chunks, max_tokens, CharCounter().count)
    if max_tokens >= 64:  # whole sentences fit: most chunks are well filled
        assert sum(c.n_tokens for c in chunks[:-1]) >= 0.6 * max_tokens * (len(chunks) - 1)


@pytest.mark.parametrize(("max_tokens", "overlap"), [(16, 4), (48, 8), (256, 32)])
def test_tokenizer_chunks_stay_within_the_limit(tiny_tokenizer, max_tokens, overlap):
    def real_count(text):
        return len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])

    text = DOC + "\n\n" + "日本語の文章です。" * 40 + "\n\nverylongwordwithoutanyspaces" * 30
    chunks = list(Chunker(TokenizerCounter(tiny_tokenizer, "tiny"), max_tokens, overlap).chunks([text]))
    check_chunks(text, chunks, max_tokens, real_count)


def test_chunks_end_at_paragraphs_then_sentences():
    chunks = list(Chunker(CharCounter(), 120, 0).chunks([DOC]))
    assert len(chunks) > 10
    paragraph_ends = sum(DOC[c.end : c.end + 2] == "\n\n" for c in chunks[:-1])
    assert paragraph_ends >= len(chunks) // 3
    assert all(c.text[-1] in ".?!" for c in chunks)  # every sentence fits: no chunk ends mid-sentence


def test_consecutive_chunks_overlap_by_about_the_requested_tokens():
    count = CharCounter().count
    chunks = list(Chunker(CharCounter(), 128, 32).chunks([DOC]))
    assert len(chunks) > 10
    for prev, nxt in itertools.pairwise(chunks):
        shared = DOC[nxt.start : prev.end]
        assert nxt.start < prev.end, "no overlap"
        assert 8 <= count(shared) <= 32
        assert nxt.start == 0 or not DOC[nxt.start - 1].isalnum(), "overlap starts mid-word"


def test_no_overlap_when_asked_for_none():
    chunks = list(Chunker(CharCounter(), 64, 0).chunks([DOC]))
    assert all(nxt.start >= prev.end for prev, nxt in itertools.pairwise(chunks))


def test_text_without_spaces_is_cut_at_characters():
    text = "字" * 1000 + " " + "x" * 3000
    chunks = list(Chunker(CharCounter(), 32, 4).chunks([text]))
    check_chunks(text, chunks, 32, CharCounter().count)


def test_markdown_headings_start_new_chunks():
    sections = [f"# Section {i}\n\n" + "\n\n".join(paragraphs(3, seed=i, sentences=2)) for i in range(8)]
    text = "\n\n".join(sections)
    chunks = list(Chunker(CharCounter(), 150, 0).chunks([text]))
    starts = [c.text.split("\n", 1)[0] for c in chunks]
    assert sum(s.startswith("# Section") for s in starts) >= 6


def test_streamed_blocks_give_the_same_invariants_as_one_block():
    chunker = Chunker(CharCounter(), 100, 20)
    chunker.region_chars = 500  # many regions
    blocks = [DOC[i : i + 37] for i in range(0, len(DOC), 37)]
    streamed = list(chunker.chunks(blocks))
    check_chunks(DOC, streamed, 100, CharCounter().count)
    whole = list(Chunker(CharCounter(), 100, 20).chunks([DOC]))
    assert abs(len(streamed) - len(whole)) <= len(whole) // 10 + 1


_PIECES = st.sampled_from(
    ["word ", "Café ", "naïve ", "a ", ". ", "? ", "\n", "\n\n", "\n \n", "# Head\n\n", "。", "日本語", "“q” ",
     "  ", "x" * 70, "\t", "e.g. "]
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(_PIECES, max_size=400),
    max_tokens=st.integers(16, 80),
    overlap_share=st.floats(0, 0.95),
    block=st.integers(1, 300),
    region=st.sampled_from([64, 300, 1 << 20]),
)
def test_any_text_any_blocks_chars4(parts, max_tokens, overlap_share, block, region):
    text = "".join(parts)
    chunker = Chunker(CharCounter(), max_tokens, int(overlap_share * max_tokens))
    chunker.region_chars = region
    chunks = list(chunker.chunks(text[i : i + block] for i in range(0, len(text), block)))
    check_chunks(text, chunks, max_tokens, CharCounter().count)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(parts=st.lists(_PIECES, max_size=200), max_tokens=st.integers(16, 60), overlap_share=st.floats(0, 0.9))
def test_any_text_tokenizer(tiny_tokenizer, parts, max_tokens, overlap_share):
    text = "".join(parts)
    counter = TokenizerCounter(tiny_tokenizer, "tiny")
    chunks = list(Chunker(counter, max_tokens, int(overlap_share * max_tokens)).chunks([text]))
    check_chunks(
        text, chunks, max_tokens, lambda t: len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"])
    )


# ---------------------------------------------------------------------------------------------- counter


def _cfg(tmp_path, **data):
    raw = {"data": data} if data else {}
    return build_config(raw, tmp_path)


def test_the_default_counter_is_chars4_when_the_teacher_is_a_server(tmp_path):
    assert counter_for(_cfg(tmp_path)).name == "chars/4"


def test_data_tokenizer_is_used_when_set(tmp_path, tiny_model_dir):
    counter = counter_for(_cfg(tmp_path, tokenizer=str(tiny_model_dir)))
    assert counter.name == f"tokenizer:{tiny_model_dir}"
    assert counter.count("hello world") >= 1


def test_an_hf_teacher_lends_its_tokenizer(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path)
    cfg.models["teacher"] = ModelConfig(backend="hf", model=str(tiny_model_dir))
    assert counter_for(cfg).name == f"tokenizer:{tiny_model_dir}"


def test_a_tokenizer_that_cannot_load_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.tokenizer: cannot load a tokenizer from"):
        counter_for(_cfg(tmp_path, tokenizer=str(tmp_path / "no-such-tokenizer")))


def test_the_docstring_examples_hold():
    result = doctest.testmod(chunking)
    assert result.attempted >= 3 and result.failed == 0
