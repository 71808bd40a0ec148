"""Contamination guard: no generated question may be (nearly) an eval question, or eval scores mean nothing.

A pair is an eval overlap when its question
- equals an eval question once normalised (`exact`),
- has a Jaccard of at least EVAL_NEAR_JACCARD with one on content words (`near`: function words such as
  "what", "is", "the" left out, so that "What is the X of Y?" does not match "What is the Z of Y?"; MinHash
  LSH proposes, the word sets decide; deliberately lower than dedup's `dedup.near`, since a leaked eval
  question costs more than a lost training pair), or
- when `dedup.semantic` is set, has a MiniLM cosine of at least that threshold to one (`semantic`). Embedding
  every question costs ~10 ms each on a CPU, which is why it only runs when semantic dedup pays for it too.

The check runs before the judge, so no judge token is spent on a pair that must be dropped anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from doctune.curate.dedup import Sketches, content_words, near_neighbours, semantic_neighbours
from doctune.curate.rules import normalize_question
from doctune.evalset import EvalItem

EVAL_NEAR_JACCARD = 0.6


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
    questions = Sketches([texts[i] for i in rest], shingler=content_words)
    eval_sketches = Sketches([item.question for item in eval_items], shingler=content_words)
    for local, hits in near_neighbours(questions, near, against=eval_sketches).items():
        j, sim = hits[0]
        matches[rest[local]] = EvalMatch(eval_items[j].index, eval_items[j].question, round(sim, 4), "near")
    if semantic is not None:
        if vectors is None or eval_vectors is None:
            raise ValueError("the semantic contamination check needs question and eval embeddings")
        rest = [i for i in keys if i not in matches]
        for i, hits in semantic_neighbours(vectors, semantic, keys=rest, against=eval_vectors).items():
            j, sim = hits[0]
            matches[i] = EvalMatch(eval_items[j].index, eval_items[j].question, sim, "semantic")
    return matches
