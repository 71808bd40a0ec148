"""Cheap rules that reject a QA pair before any judge token is spent on it. Each rejection names its rule.

Rules, checked in this order (the first that fails names the rejection):

- `empty`: no question or no answer text.
- `too_short`: a question of fewer than MIN_QUESTION_WORDS words, or an answer with fewer than
  MIN_ANSWER_CHARS letters/digits.
- `not_a_question`: the question neither ends with a question mark (any script's) nor starts with an English
  question or request word ("what", "how", "explain", ...).
- `answer_too_long`: the answer has more than `curate.max_answer_chars` characters.
- `question_in_answer`: the answer repeats the question word for word.
"""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from typing import Any

MIN_QUESTION_WORDS = 3
MIN_ANSWER_CHARS = 2
QUESTION_MARKS = ("?", "\uff1f", "\u061f", "\u037e", "\u055e", "\u1367", "\u2e2e")
_QUESTION_WORDS_TEXT = (
    "what whats what's how hows how's why when where which who whom whose is are was were am can could "
    "does do did should would will shall may might must has have had "
    "explain describe list name give define compare summarize summarise outline state identify tell show "
    "provide"
)
QUESTION_WORDS = frozenset(_QUESTION_WORDS_TEXT.split())
RULES = ("empty", "too_short", "not_a_question", "answer_too_long", "question_in_answer")

_WORD = re.compile(r"\w+(?:['’]\w+)*")
_LETTER_OR_DIGIT = re.compile(r"[^\W_]")


def normalize(text: str) -> str:
    """Casefolded words separated by single spaces: the text that duplicate checks compare.

    >>> normalize("  What's   the Context-Length of LLAMA 3?? ")
    "what's the context length of llama 3"
    """
    text = unicodedata.normalize("NFKC", text).replace("’", "'").casefold()
    return " ".join(_WORD.findall(text))


# Questions are normalised by several checks in one run; answers once, so they skip the cache.
normalize_question = functools.lru_cache(maxsize=1 << 16)(normalize)


def text_of(pair: dict[str, Any], key: str) -> str:
    """The pair's text under `key`, or "" when it is missing or not text."""
    value = pair.get(key)
    return value.strip() if isinstance(value, str) else ""


def is_question(question: str) -> bool:
    """True when `question` ends with a question mark or starts with a question or request word.

    >>> is_question("How do I install it"), is_question("Installation steps."), is_question("¿Qué es?")
    (True, False, True)
    """
    if question.rstrip().endswith(QUESTION_MARKS):
        return True
    words = normalize_question(question).split()
    return bool(words) and words[0] in QUESTION_WORDS


def check(pair: dict[str, Any], *, max_answer_chars: int) -> str | None:
    """The name of the first rule the pair breaks, or None when it passes them all.

    >>> check({"question": "What is X?", "answer": "X is a thing."}, max_answer_chars=100) is None
    True
    >>> check({"question": "What is X?", "answer": "What is X? A thing."}, max_answer_chars=100)
    'question_in_answer'
    """
    question, answer = text_of(pair, "question"), text_of(pair, "answer")
    if not question or not answer:
        return "empty"
    letters = itertools.islice(_LETTER_OR_DIGIT.finditer(answer), MIN_ANSWER_CHARS)
    if (
        len(normalize_question(question).split()) < MIN_QUESTION_WORDS
        or len(list(letters)) < MIN_ANSWER_CHARS
    ):
        return "too_short"
    if not is_question(question):
        return "not_a_question"
    if len(answer) > max_answer_chars:
        return "answer_too_long"
    if f" {normalize_question(question)} " in f" {normalize(answer)} ":
        return "question_in_answer"
    return None
