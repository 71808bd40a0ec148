"""Cheap rules that reject a QA pair before any judge token is spent on it. Each rejection names its rule.

Rules, checked in this order (the first that fails names the rejection):

- `empty`: no question or no answer text.
- `placeholder`: the question or the answer is template text, not content: "its answer", "answer here",
  "<answer>", "[question]", "Question 1", "...", "N/A", "TBD", lorem ipsum.
- `question_equals_answer`: question and answer are the same text once normalised (a weak teacher that
  copies one string into both fields).
- `too_short`: a question of fewer than MIN_QUESTION_WORDS words, or an answer with fewer than
  MIN_ANSWER_CHARS letters/digits.
- `not_a_question`: the question neither ends with a question mark (any script's) nor starts with an English
  question or request word ("what", "how", "explain", ...).
- `answer_too_long`: the answer has more than `curate.max_answer_chars` characters.
- `question_in_answer`: the answer repeats the question word for word.
- `repetitive`: the question or answer loops, as a small model that degenerates does: one phrase of up to
  LOOP_MAX_WORDS words said LOOP_TIMES times back to back (at least LOOP_MIN_WORDS words in all: "It is fast.
  It is fast. It is fast. It is fast."), or a short unit of characters repeated back to back (REPEAT_MIN_TIMES
  times and REPEAT_MIN_CHARS characters at least, the unit holding a letter or digit: "1:1:1:1:1:1:1:1:1:1:").
  A phrase that recurs apart ("per user per month" on each line of a price list) is not a loop.
- `copied_from_context`: the answer (or the question) is mostly pasted from the source passage: at least
  COPY_SHARE of its words lie inside word COPY_NGRAM-grams of the passage, and it is long: ANSWER_COPY_WORDS
  words for an answer, QUESTION_COPY_WORDS for a question. The length floor keeps short extractive answers
  ("The default port is 7300." answered from a passage holding that sentence) and one- or two-sentence quotes,
  which are what a good answer to a factual question looks like; a paragraph or a whole passage pasted as the
  answer teaches recitation, not answering. Pairs without a context (users' own pairs) skip this rule.
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
RULES = (
    "empty",
    "placeholder",
    "question_equals_answer",
    "too_short",
    "not_a_question",
    "answer_too_long",
    "question_in_answer",
    "repetitive",
    "copied_from_context",
)

# copied_from_context
COPY_NGRAM = 5
COPY_SHARE = 0.8
ANSWER_COPY_WORDS = 40
QUESTION_COPY_WORDS = 25
# repetitive
REPEAT_MIN_TIMES = 5
REPEAT_MIN_CHARS = 20
LOOP_TIMES = 4
LOOP_MAX_WORDS = 30
LOOP_MIN_WORDS = 8

_WORD = re.compile(r"\w+(?:['’]\w+)*")
_LETTER_OR_DIGIT = re.compile(r"[^\W_]")
_LOOP = re.compile(rf"(.{{1,12}}?)\1{{{REPEAT_MIN_TIMES - 1},}}", re.S)
# Template text, matched against the normalised question or answer (whole text).
_PLACEHOLDER = re.compile(
    r"(?:(?:insert|write|add|type|enter)(?: (?:the|your|an?))? |(?:the|your|its|an?|some|example|sample) )?"
    r"(?:question|answer|response|reply|text|content)(?: \d+| here| goes here| text)?"
    r"|n a|na|tbd|tba|todo|placeholder|\.\.\.|…",
)
_ELLIPSIS_ONLY = re.compile(r"[\s.…]*")
_SLOT = re.compile(r"[<\[{(]+\s*[\w\s]{0,30}\s*[>\]})]+")  # <answer>, [Your answer], {{question}}


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


def is_placeholder(text: str) -> bool:
    """True when `text` is template text instead of content.

    >>> [is_placeholder(t) for t in ["its answer", "<answer>", "Question 1:", "...", "N/A", "Lorem ipsum dolor"]]
    [True, True, True, True, True, True]
    >>> [is_placeholder(t) for t in ["None.", "A4", "The answer is 42.", "Which answer file?"]]
    [False, False, False, False]
    """
    stripped = text.strip()
    if _ELLIPSIS_ONLY.fullmatch(stripped) or _SLOT.fullmatch(stripped):
        return True
    words = normalize(stripped)
    return words.startswith("lorem ipsum") or bool(_PLACEHOLDER.fullmatch(words))


def is_repetitive(text: str) -> bool:
    """True when `text` loops: a unit of 1 to LOOP_MAX_WORDS words said LOOP_TIMES times or more back to back
    (LOOP_MIN_WORDS words in all), or a short unit of characters back to back.

    >>> is_repetitive("The ratio is 1:1:1:1:1:1:1:1:1:1:1:1:1:1"), is_repetitive("Use ---------- as a rule.")
    (True, False)
    >>> is_repetitive("It is fast. It is fast. It is fast. It is fast."), is_repetitive("Click Next 3 times.")
    (True, False)
    """
    for m in _LOOP.finditer(text):
        if len(m.group()) >= REPEAT_MIN_CHARS and _LETTER_OR_DIGIT.search(m.group(1)):
            return True
    words = normalize(text).split()
    for unit in range(1, min(LOOP_MAX_WORDS, len(words) // LOOP_TIMES) + 1):
        run = 0  # words so far that equal the word `unit` places before them
        needed = max((LOOP_TIMES - 1) * unit, LOOP_MIN_WORDS - unit)
        for i in range(unit, len(words)):
            run = run + 1 if words[i] == words[i - unit] else 0
            if run >= needed:
                return True
    return False


def copied_words(text: str, context: str, n: int = COPY_NGRAM) -> tuple[int, int]:
    """(words of `text` inside an n-gram of words that `context` also has, words of `text`), normalised.

    >>> copied_words("The default port is 7300.", "Setup. The default port is 7300. Change it in relay.toml.")
    (5, 5)
    >>> copied_words("It listens on 7300 by default.", "The default port is 7300.")
    (0, 6)
    """
    words = normalize(text).split()
    source = normalize(context).split()
    grams = {tuple(source[i : i + n]) for i in range(len(source) - n + 1)}
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        if tuple(words[i : i + n]) in grams:
            covered[i : i + n] = [True] * n
    return sum(covered), len(words)


def is_copied(text: str, context: str, min_words: int) -> bool:
    """True when `text` has at least `min_words` words and COPY_SHARE of them are pasted from `context`."""
    if not context:
        return False
    copied, total = copied_words(text, context)
    return total >= min_words and copied >= COPY_SHARE * total


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
    if is_placeholder(question) or is_placeholder(answer):
        return "placeholder"
    if normalize_question(question) == normalize(answer):
        return "question_equals_answer"
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
    if is_repetitive(question) or is_repetitive(answer):
        return "repetitive"
    context = text_of(pair, "context")
    if is_copied(answer, context, ANSWER_COPY_WORDS) or is_copied(question, context, QUESTION_COPY_WORDS):
        return "copied_from_context"
    return None
