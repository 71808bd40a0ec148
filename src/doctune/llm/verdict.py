"""A judge's JSON reply read into a verdict: an integer score, the seed recipe's YES/NO, or one of a few choices,
with the judge's reason. Used by curate's judge (is this pair good?) and eval's (is this answer right?).

The reply is repaired if it is not pure JSON (fences, prose around it, trailing commas: structured.py), keys are
matched case-insensitively (the seed writes `Reason` and `Result`), and the verdict is read leniently: a score
may be `4`, `4.0`, `"4"` or `"4/5"`; a choice may be `"yes"`, `" Yes."`.

```python
score, reason = parse_score('{"reason": "Grounded.", "score": 4}', high=5)   # (4, 'Grounded.')
passed, reason = parse_yesno('{"Reason": "Relevant.", "Result": "yes"}')      # (True, 'Relevant.')
```

Both raise ReplyParseError: a reply that holds no JSON object, or `BadVerdict` (a ReplyParseError) when the
object lacks a usable verdict; each judge words its own error from it.
"""

from __future__ import annotations

import re
from typing import Any

from doctune.llm.structured import ReplyParseError, parse_json_reply, text_pattern

MAX_TOKENS = 512  # a judge's reply: a short reason and the verdict
# In-process judges write the reason under this many characters: it fits MAX_TOKENS even when every character
# takes 4 byte-level tokens (a weak model writes rare 4-byte characters).
MAX_REASON_CHARS = 120
REASON_PATTERN = text_pattern(MAX_REASON_CHARS)
YES, NO = "YES", "NO"
_DIGITS = re.compile(r"[0-9]+")


class BadVerdict(ReplyParseError):
    """The reply is a JSON object, but `key` holds no usable verdict (`got`: what it holds, None if absent)."""

    def __init__(self, key: str, wanted: str, got: Any):
        super().__init__(f"{key} must be {wanted}, got {got!r}")
        self.key = key
        self.got = got


def verdict_schema(
    reason_key: str, key: str, value: dict[str, Any], *, bounded_strings: bool = False
) -> dict[str, Any]:
    """JSON schema of a reply `{reason_key: str, key: value}`. The reason comes first, so the judge explains
    before it decides. `bounded_strings` (in-process decoding) bounds the reason to MAX_REASON_CHARS; servers
    get plain text, so a reason may quote.

    >>> verdict_schema("Reason", "Result", {"enum": [YES, NO]})["required"]
    ['Reason', 'Result']
    """
    reason: dict[str, Any] = {"type": "string"}
    if bounded_strings:
        reason = {"type": "string", "pattern": REASON_PATTERN}
    return {
        "type": "object",
        "properties": {reason_key: reason, key: value},
        "required": [reason_key, key],
        "additionalProperties": False,
    }


def score_schema(high: int, *, bounded_strings: bool = False) -> dict[str, Any]:
    """`{"reason": str, "score": 1..high}`: the score reply of both judges."""
    value = {"type": "integer", "minimum": 1, "maximum": high}
    return verdict_schema("reason", "score", value, bounded_strings=bounded_strings)


def yesno_schema(*, bounded_strings: bool = False) -> dict[str, Any]:
    """The seed recipe's `{"Reason": str, "Result": "YES"|"NO"}`."""
    value = {"type": "string", "enum": [YES, NO]}
    return verdict_schema("Reason", "Result", value, bounded_strings=bounded_strings)


def reply_object(text: str) -> dict[str, Any]:
    """The JSON object of a reply (repaired if need be; a list holding one object is that object), its keys
    stripped and lower-cased. Raises ReplyParseError when there is none.

    >>> reply_object('```json\\n[{"Reason ": "ok", "Score": 4,}]\\n```')
    {'reason': 'ok', 'score': 4}
    """
    value = parse_json_reply(text)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, dict):
        raise ReplyParseError(f"expected a JSON object, got {type(value).__name__}")
    return {k.strip().lower(): v for k, v in value.items() if isinstance(k, str)}


def integer_in(raw: Any, low: int, high: int) -> int | None:
    """`raw` as an integer in low..high: an int, a float without a fraction, or a string of digits (`"4"`,
    `" 4 "`, `"4/5"`); None for anything else (booleans, words, out of range).

    >>> [integer_in(v, 1, 5) for v in (4, 4.0, " 4 ", "4/5", "4.5", True, "²", 9, "four", None)]
    [4, 4, 4, 4, None, None, None, None, None, None]
    """
    if isinstance(raw, bool):
        return None
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, str):
        head = raw.strip().split("/")[0].strip()
        raw = int(head) if _DIGITS.fullmatch(head) else None
    if isinstance(raw, int) and low <= raw <= high:
        return raw
    return None


def choice(raw: Any, options: tuple[str, ...]) -> str | None:
    """The option `raw` names, in any case, spaces and a final full stop aside; None if it names none.

    >>> choice(" Yes.", (YES, NO)), choice("a", ("A", "B", "tie")), choice("maybe", (YES, NO))
    ('YES', 'A', None)
    """
    if not isinstance(raw, str):
        return None
    word = raw.strip().strip(".").lower()
    return next((option for option in options if option.lower() == word), None)


def parse_score(text: str, *, high: int, low: int = 1) -> tuple[int, Any]:
    """(score, reason) of a reply `{"reason", "score"}` whose score is an integer in low..high; the reason as
    the judge wrote it (None if absent).

    >>> parse_score('{"Reason": "Half of it is made up", "Score": "2"}', high=5)
    (2, 'Half of it is made up')
    >>> parse_score('{"reason": "Very good", "score": 7}', high=5)
    Traceback (most recent call last):
    ...
    doctune.llm.verdict.BadVerdict: score must be an integer from 1 to 5, got 7
    """
    reply = reply_object(text)
    score = integer_in(reply.get("score"), low, high)
    if score is None:
        raise BadVerdict("score", f"an integer from {low} to {high}", reply.get("score"))
    return score, reply.get("reason")


def parse_choice(text: str, key: str, options: tuple[str, ...]) -> tuple[str, Any]:
    """(option, reason) of a reply `{"reason", key}` whose `key` names one of `options` (any case)."""
    reply = reply_object(text)
    found = choice(reply.get(key.lower()), options)
    if found is None:
        wanted = " or ".join([", ".join(options[:-1]), options[-1]] if len(options) > 1 else options)
        raise BadVerdict(key, wanted, reply.get(key.lower()))
    return found, reply.get("reason")


def parse_yesno(text: str) -> tuple[bool, Any]:
    """(passed, reason) of the seed recipe's reply `{"Reason", "Result": "YES"|"NO"}`, YES in any case.

    >>> parse_yesno('{"Reason": "Relevant.", "Result": "yes"}')
    (True, 'Relevant.')
    >>> parse_yesno('{"Reason": "Unsure.", "Result": "MAYBE"}')
    Traceback (most recent call last):
    ...
    doctune.llm.verdict.BadVerdict: Result must be YES or NO, got 'MAYBE'
    """
    result, reason = parse_choice(text, "Result", (YES, NO))
    return result == YES, reason
