"""A judge's reply read into a verdict (llm/verdict.py), as both judges (curate and eval) read it."""

from __future__ import annotations

import asyncio
import doctest

import pytest
from tests.support.fake_llm import ScriptedLLM

from doctune.curate import judge as curate_judge
from doctune.evaluate import judge as eval_judge
from doctune.llm import verdict
from doctune.llm.structured import ReplyParseError, validate
from doctune.llm.verdict import BadVerdict, parse_choice, parse_score, parse_yesno, reply_object
from doctune.prompts import load_prompts


def test_doctests():
    result = doctest.testmod(verdict)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("reply", "score", "reason"),
    [
        ('{"reason": "Grounded.", "score": 4}', 4, "Grounded."),
        ('{"Reason": "Grounded.", "Score": 4.0}', 4, "Grounded."),
        ('{"REASON": "ok", " score ": " 4 "}', 4, "ok"),
        ('{"reason": "ok", "score": "4/5"}', 4, "ok"),
        ('Sure! ```json\n{"reason": "ok", "score": 5,}\n```', 5, "ok"),
        ('[{"reason": "ok", "score": 1}]', 1, "ok"),
        ("{'reason': 'single quotes', 'score': 2}", 2, "single quotes"),
        ('{"score": 3}', 3, None),
    ],
)
def test_a_score_is_read_from_every_way_a_judge_writes_it(reply, score, reason):
    assert parse_score(reply, high=5) == (score, reason)


@pytest.mark.parametrize(
    ("reply", "got"),
    [
        ('{"reason": "x", "score": 6}', 6),
        ('{"reason": "x", "score": 0}', 0),
        ('{"reason": "x", "score": 4.5}', 4.5),
        ('{"reason": "x", "score": true}', True),
        ('{"reason": "x", "score": "high"}', "high"),
        ('{"reason": "x", "score": "²"}', "²"),  # a digit to str.isdigit, not to int()
        ('{"reason": "x", "score": "-3"}', "-3"),
        ('{"reason": "no score"}', None),
    ],
)
def test_a_reply_without_a_usable_score_is_a_bad_verdict_naming_what_it_holds(reply, got):
    with pytest.raises(BadVerdict) as caught:
        parse_score(reply, high=5)
    assert caught.value.key == "score" and caught.value.got == got
    assert str(caught.value) == f"score must be an integer from 1 to 5, got {got!r}"


@pytest.mark.parametrize("reply", ["I think it is good.", "", "[1, 2]", '"just a string"', "42"])
def test_a_reply_without_a_json_object_is_a_parse_error(reply):
    with pytest.raises(ReplyParseError) as caught:
        parse_score(reply, high=10)
    assert not isinstance(caught.value, BadVerdict)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("reply", "passed"),
    [
        ('{"Reason": "Relevant.", "Result": "YES"}', True),
        ('{"Reason": "Relevant.", "Result": " yes. "}', True),
        ('{"reason": "Off topic.", "result": "No"}', False),
    ],
)
def test_the_seed_recipes_yes_no_in_any_case(reply, passed):
    assert parse_yesno(reply)[0] is passed


@pytest.mark.parametrize("result", ['"MAYBE"', "true", "1", '"Y"'])
def test_anything_but_yes_or_no_is_a_bad_verdict(result):
    with pytest.raises(BadVerdict, match=r"^Result must be YES or NO, got "):
        parse_yesno(f'{{"Reason": "r", "Result": {result}}}')


def test_a_choice_is_returned_as_the_option_is_spelt():
    assert parse_choice('{"reason": "r", "winner": "TIE"}', "winner", ("A", "B", "tie")) == ("tie", "r")
    with pytest.raises(BadVerdict, match=r"^winner must be A, B or tie, got 'C'$"):
        parse_choice('{"reason": "r", "winner": "C"}', "winner", ("A", "B", "tie"))


def test_keys_are_matched_without_case_or_spaces():
    assert reply_object('{" Reason ": "r", "RESULT": "YES", "7": 1}') == {
        "reason": "r",
        "result": "YES",
        "7": 1,
    }


def test_both_judges_bound_the_reason_of_in_process_replies_to_the_same_cap():
    ok, long = "x" * verdict.MAX_REASON_CHARS, "x" * (verdict.MAX_REASON_CHARS + 1)
    schemas = [
        (curate_judge.reply_schema("score", bounded_strings=True), "reason", {"score": 3}),
        (curate_judge.reply_schema("yesno", bounded_strings=True), "Reason", {"Result": "YES"}),
        (eval_judge.reply_schema("score", bounded_strings=True), "reason", {"score": 7}),
        (eval_judge.reply_schema("yesno", bounded_strings=True), "Reason", {"Result": "NO"}),
        (eval_judge.reply_schema("pairwise", bounded_strings=True), "reason", {"winner": "tie"}),
    ]
    for schema, key, decision in schemas:
        assert next(iter(schema["properties"])) == key  # the reason comes first
        assert validate({key: ok, **decision}, schema) == []
        assert validate({key: long, **decision}, schema)
        assert (
            validate({key: long, **decision}, {**schema, "properties": {**schema["properties"], key: {}}})
            == []
        )


def test_both_judges_cap_a_reply_at_the_same_tokens_and_read_a_fraction_score():
    llm = ScriptedLLM(lambda m: '{"reason": "Right.", "score": "4/5"}')
    curated = asyncio.run(
        curate_judge.Judge(llm, mode="score", threshold=4, prompts=load_prompts("curate")).judge(
            {"question": "Q?", "answer": "A.", "context": "C."}
        )
    )
    graded = asyncio.run(eval_judge.Judge(llm, load_prompts("eval")).grade("Q?", "ref", "answer"))
    assert (curated.passed, curated.score, graded.score) == (True, 4, 4.0)
    assert [call["max_tokens"] for call in llm.calls] == [verdict.MAX_TOKENS, verdict.MAX_TOKENS]


def test_each_judge_keeps_its_own_error_wording():
    reply = '{"reason": "x", "score": "²"}'
    llm = ScriptedLLM(lambda m: reply)
    curated = asyncio.run(
        curate_judge.Judge(llm, mode="score", threshold=4, prompts=load_prompts("curate")).judge(
            {"question": "Q?", "answer": "A.", "context": "C."}
        )
    )
    graded = asyncio.run(eval_judge.Judge(llm, load_prompts("eval")).grade("Q?", "ref", "answer"))
    assert curated.error == "unusable reply: score must be an integer from 1 to 5, got '²'"
    assert graded.error == "judge reply has no score 1-10 (got '²')"
    assert curated.raw == graded.raw == reply
