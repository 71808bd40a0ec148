"""Sequence: the tokens a model writes → the text events a client gets (with the tiny model's real tokenizer)."""

from __future__ import annotations

import functools

import pytest

from doctune.serve.requests import Delta, Done, SamplingParams, Sequence, _held_back


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_sequence(tokenizer, *, max_tokens=100, stop=()):
    events = []
    seq = Sequence(
        adapter="__base__",
        prompt_ids=[1, 2, 3],
        params=SamplingParams(max_tokens=max_tokens, stop=tuple(stop)),
        sink=events.append,
        decode=functools.partial(tokenizer.decode, skip_special_tokens=True),
        eos_ids=frozenset({tokenizer.convert_tokens_to_ids("<|eot_id|>")}),
    )
    return seq, events


def text_of(events):
    return "".join(e.text for e in events if isinstance(e, Delta))


def feed(seq, ids):
    for token in ids:
        seq.push(token)


def test_streamed_text_equals_the_decoded_answer_and_ends_at_end_of_turn(tokenizer):
    answer = "Chunks are read, then split: naïve café ✓ 日本語."
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    seq, events = make_sequence(tokenizer)
    feed(seq, [*ids, tokenizer.convert_tokens_to_ids("<|eot_id|>")])

    assert text_of(events) == answer
    assert all("\ufffd" not in e.text for e in events if isinstance(e, Delta))
    assert len([e for e in events if isinstance(e, Delta)]) > 1  # streamed, not sent in one piece
    assert events[-1] == Done("stop", prompt_tokens=3, completion_tokens=len(ids) + 1)


def test_max_tokens_ends_with_length(tokenizer):
    ids = tokenizer("one two three four five six seven", add_special_tokens=False)["input_ids"]
    seq, events = make_sequence(tokenizer, max_tokens=3)
    feed(seq, ids)

    assert events[-1] == Done("length", prompt_tokens=3, completion_tokens=3)
    assert text_of(events) == tokenizer.decode(ids[:3])


def test_stop_string_cuts_the_answer_even_across_tokens(tokenizer):
    ids = tokenizer("The answer is 42.\nQuestion: what next?", add_special_tokens=False)["input_ids"]
    seq, events = make_sequence(tokenizer, stop=["\nQuestion:"])
    feed(seq, ids)

    assert text_of(events) == "The answer is 42."
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "stop"
    assert events[-1].completion_tokens < len(ids)  # it stopped before the rest was pushed


def test_text_that_may_start_a_stop_string_is_held_until_it_does_not(tokenizer):
    seq, events = make_sequence(tokenizer, stop=["###"])
    feed(seq, tokenizer("value ##", add_special_tokens=False)["input_ids"])
    assert text_of(events) == "value "
    feed(seq, tokenizer(" done", add_special_tokens=False)["input_ids"])
    assert text_of(events) == "value ## done"


def test_a_cancelled_sequence_reports_nothing_more(tokenizer):
    ids = tokenizer("several words of text here", add_special_tokens=False)["input_ids"]
    seq, events = make_sequence(tokenizer)
    feed(seq, ids[:2])
    before = list(events)
    seq.cancelled = True
    feed(seq, ids[2:])

    assert events == before
    assert seq.finish_reason == "cancelled"


def test_held_back():
    assert _held_back("abc </s", ("</stop>",)) == 3
    assert _held_back("abc", ()) == 0
    assert _held_back("a <|e", ("<|end|>", "<x>")) == 3
