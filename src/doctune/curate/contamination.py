"""Contamination guard: no generated question may be (nearly) an eval question, or eval scores mean nothing.

A pair is an eval overlap when its question
- equals an eval question once normalised (`exact`),
- has a Jaccard of at least EVAL_NEAR_JACCARD with one on content words (`near`: function words such as
  "what", "is", "the" and request words such as "tell me", "explain" left out, so that "What is the X of Y?"
  does not match "What is the Z of Y?" and "Tell me the X of Y." matches "What is the X of Y?"; MinHash LSH
  proposes, the word sets decide). A question of several sentences ("We deploy on Friday. What is the X of
  Y?") is also compared sentence by sentence, so added context does not hide an eval question, or
- when `dedup.semantic` is set, has a MiniLM cosine of at least that threshold to one (`semantic`). Embedding
  every question costs ~10 ms each on a CPU, which is why it only runs when semantic dedup pays for it too.

A near or semantic match also needs the same numbers on both sides ("Llama 2" is not "Llama 3"). The threshold
is tuned on the dev half of bench/data/contamination.json (paraphrases of four kinds and different questions on
the same topics) and reported on its test half by bench/curate.py.

The check runs before the judge, so no judge token is spent on a pair that must be dropped anyway.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from doctune.curate.dedup import Sketches, content_words, near_neighbours, semantic_neighbours, shingles
from doctune.curate.rules import normalize_question
from doctune.evalset import EvalItem

# Deliberately low (a leaked eval question costs more than a lost training pair): on the labelled set of
# bench/curate.py it catches more paraphrases than any stricter value, at the price of flagging some different
# questions on the same topic ("How do I change the default port of X?" for "What is the default port of X?");
# precision >= 0.99 there needs 0.9, which catches only the same stemmed content words in any order.
EVAL_NEAR_JACCARD = 0.6
# words that turn a question into a request without changing what is asked ("Tell me ...", "Show me how ..."),
# and pronouns that dedup's stop words leave in ("How do tenants download their invoices?")
REQUEST_WORDS = frozenset(
    "tell give show state name list explain describe me he she they him her them his their us yours".split()  # noqa: SIM905
)
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


@functools.lru_cache(maxsize=100_000)
def _stem(word: str) -> str:
    return _STEMMER().stem(word)


@functools.lru_cache(maxsize=1)
def _STEMMER() -> Any:
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


def guard_words(text: str) -> frozenset[str]:
    """Stemmed content words without request words: what the near check compares.

    >>> sorted(guard_words("Tell me when the releases of Llama 3 were made."))
    ['3', 'llama', 'made', 'releas']
    """
    words = content_words(text)
    return frozenset(_stem(w) for w in (words - REQUEST_WORDS) or words)


def numbers(text: str) -> frozenset[str]:
    """The words of `text` that hold a digit: two questions that differ in them ask different things.

    >>> sorted(numbers("Is Llama 3 newer than Llama 2?"))
    ['2', '3']
    """
    return frozenset(w for w in shingles(text) if any(c.isdigit() for c in w))


def sentences(text: str) -> list[str]:
    """The text itself and, when it has several sentences, each of them.

    >>> sentences("We deploy on Friday. What is the port?")
    ['We deploy on Friday. What is the port?', 'We deploy on Friday.', 'What is the port?']
    """
    parts = [p for p in _SENTENCE_END.split(text.strip()) if p]
    return [text, *parts] if len(parts) > 1 else [text]


@dataclass(frozen=True)
class EvalMatch:
    eval_index: int
    eval_question: str
    similarity: float
    method: str  # exact | near | semantic

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_overlaps(
    texts: Sequence[str],
    eval_items: Sequence[EvalItem],
    *,
    keys: Sequence[int] | None = None,
    near: float = EVAL_NEAR_JACCARD,
    semantic: float | None = None,
    vectors: np.ndarray | None = None,
    eval_vectors: np.ndarray | None = None,
) -> dict[int, EvalMatch]:
    """The eval question that each question `texts[i]` (i in `keys`, default all) overlaps with: the first
    found of exact, near (strongest match), semantic. `vectors` (one unit row per text) and `eval_vectors`
    are needed only when `semantic` is set."""
    keys = list(range(len(texts))) if keys is None else list(keys)
    if not eval_items or not keys:
        return {}
    matches: dict[int, EvalMatch] = {}
    exact = {normalize_question(item.question): item for item in eval_items}
    for i in keys:
        item = exact.get(normalize_question(texts[i]))
        if item is not None:
            matches[i] = EvalMatch(item.index, item.question, 1.0, "exact")
    rest = [i for i in keys if i not in matches]
    owners = [(i, part) for i in rest for part in sentences(texts[i])]
    questions = Sketches([part for _, part in owners], shingler=guard_words)
    eval_sketches = Sketches([item.question for item in eval_items], shingler=guard_words)
    eval_numbers = [numbers(item.question) for item in eval_items]
    for local, hits in sorted(near_neighbours(questions, near, against=eval_sketches).items()):
        i, part = owners[local]
        j, sim = next(((j, sim) for j, sim in hits if eval_numbers[j] == numbers(part)), (None, 0.0))
        if j is not None and (i not in matches or sim > matches[i].similarity):
            matches[i] = EvalMatch(eval_items[j].index, eval_items[j].question, round(sim, 4), "near")
    if semantic is not None:
        if vectors is None or eval_vectors is None:
            raise ValueError("the semantic contamination check needs question and eval embeddings")
        rest = [i for i in keys if i not in matches]
        for i, hits in semantic_neighbours(vectors, semantic, keys=rest, against=eval_vectors).items():
            found = next(((j, sim) for j, sim in hits if eval_numbers[j] == numbers(texts[i])), None)
            if found is not None:
                j, sim = found
                matches[i] = EvalMatch(eval_items[j].index, eval_items[j].question, sim, "semantic")
    return matches
