"""JSON out of model replies, and the light schema check."""

from __future__ import annotations

import doctest

import pytest

from doctune.llm import limits, structured
from doctune.llm.structured import ReplyParseError, parse_json_reply, validate


@pytest.mark.parametrize("module", [structured, limits])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"pairs": [{"question": "Q?", "answer": "A."}]}', {"pairs": [{"question": "Q?", "answer": "A."}]}),
        ("  \ufeff[1, 2, 3]\n", [1, 2, 3]),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('```\n[{"q": "x"}]\n```\nHope this helps!', [{"q": "x"}]),
        ('Here are the pairs:\n{"a": "b"}', {"a": "b"}),
        ('{"a": [1, 2,], "b": 3,}', {"a": [1, 2], "b": 3}),
        ("{'question': 'Why?', 'answer': 'Because.'}", {"question": "Why?", "answer": "Because."}),
        ('{"answer": "cut off in the midd', {"answer": "cut off in the midd"}),
        ('{"text": "naïve café – 東京"}', {"text": "naïve café – 東京"}),
    ],
)
def test_parse_json_reply_takes_what_is_usable(reply, expected):
    assert parse_json_reply(reply) == expected


def test_strict_json_scalars_are_kept_as_they_are():
    assert parse_json_reply("42") == 42
    assert parse_json_reply('"yes"') == "yes"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("", "reply is empty"),
        ("   \n", "reply is empty"),
        ("I am sorry, I cannot help with that.", "no JSON object or array"),
        ("The answer is 42.", "no JSON object or array"),
    ],
)
def test_parse_json_reply_says_why_nothing_came_out(reply, reason):
    with pytest.raises(ReplyParseError, match=reason) as err:
        parse_json_reply(reply)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_parse_json_reply_refuses_non_text():
    with pytest.raises(ReplyParseError, match="not text"):
        parse_json_reply(None)  # type: ignore[arg-type]


PAIRS = {
    "type": "object",
    "properties": {
        "pairs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "question": {"type": "string", "minLength": 2, "pattern": "\\?$"},
                    "answer": {"type": "string", "maxLength": 20},
                    "score": {"type": "integer", "minimum": 1, "maximum": 5},
                    "kind": {"enum": ["fact", "how"]},
                    "ok": {"type": "boolean"},
                    "weight": {"type": "number"},
                },
                "required": ["question", "answer"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["pairs"],
}


def test_validate_accepts_a_valid_value():
    value = {"pairs": [{"question": "Why?", "answer": "Because.", "score": 5, "kind": "how", "ok": True}]}
    assert validate(value, PAIRS) == []
    assert (
        validate({"pairs": [{"question": "Q?", "answer": "A", "weight": 2}]}, PAIRS) == []
    )  # int is a number


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ([], "$: expected object, got list"),
        ({}, "$: missing required key 'pairs'"),
        ({"pairs": []}, "$.pairs: 0 items, fewer than minItems 1"),
        ({"pairs": [{"question": "Q?", "answer": "A"}] * 3}, "$.pairs: 3 items, more than maxItems 2"),
        ({"pairs": [{"question": "Q?"}]}, "$.pairs[0]: missing required key 'answer'"),
        (
            {"pairs": [{"question": "Qx", "answer": "A"}]},
            "$.pairs[0].question: does not match the pattern '\\\\?$'",
        ),
        (
            {"pairs": [{"question": "?", "answer": "A"}]},
            "$.pairs[0].question: 1 chars, shorter than minLength 2",
        ),
        (
            {"pairs": [{"question": "Q?", "answer": "A" * 21}]},
            "$.pairs[0].answer: 21 chars, longer than maxLength 20",
        ),
        (
            {"pairs": [{"question": "Q?", "answer": "A", "score": 0}]},
            "$.pairs[0].score: 0 is below the minimum 1",
        ),
        (
            {"pairs": [{"question": "Q?", "answer": "A", "score": 2.5}]},
            "$.pairs[0].score: expected integer, got float",
        ),
        (
            {"pairs": [{"question": "Q?", "answer": "A", "score": True}]},
            "$.pairs[0].score: expected integer, got bool",
        ),
        (
            {"pairs": [{"question": "Q?", "answer": "A", "kind": "why"}]},
            "$.pairs[0].kind: 'why' is not one of",
        ),
        (
            {"pairs": [{"question": "Q?", "answer": "A", "ok": "yes"}]},
            "$.pairs[0].ok: expected boolean, got str",
        ),
        ({"pairs": [{"question": "Q?", "answer": "A", "extra": 1}]}, "$.pairs[0]: unexpected key 'extra'"),
    ],
)
def test_validate_names_the_problem_and_where(value, problem):
    problems = validate(value, PAIRS)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_validate_reports_every_problem():
    value = {"pairs": [{"question": "Q", "answer": "A" * 30, "score": 9}]}
    assert len(validate(value, PAIRS)) == 4  # question too short and no "?", answer too long, score too high


def test_a_repaired_reply_checked_against_its_schema():
    reply = 'Sure!\n```json\n{"pairs": [{"question": "What is X?", "answer": "A thing.",},]}\n```'
    assert validate(parse_json_reply(reply), PAIRS) == []
