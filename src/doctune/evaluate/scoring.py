"""Reference metrics of every answer, computed in one worker thread while the models keep answering.

Answers arrive one by one, in whatever order the models finish. ROUGE / token F1 / exact match run per
answer; embeddings run per group of `group_size` consecutive items of one candidate, once every answer of the
group is in (failed answers are left out). Groups are fixed by item index, not by arrival order, so the same
answers are always embedded in the same batches and give bit-identical similarities.

```python
scoring = Scoring(references=[item.answer for item in items], candidates=["finetuned", "base"])
scoring.start()                       # loads MiniLM and embeds the references in the background
scoring.add("base", 3, "an answer")   # every (candidate, index) exactly once; None for a failed answer
metrics = await scoring.results()     # {("base", 3): {"rouge1": ..., "similarity": ...}, ...}
```
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from doctune.evaluate.metrics import SIMILARITY, Embedder, LexicalScorer

log = logging.getLogger(__name__)

Key = tuple[str, int]


class Scoring:
    def __init__(
        self,
        references: Sequence[str],
        candidates: Sequence[str],
        *,
        embedder: Embedder | None = None,
        group_size: int = 32,
        similarity: bool = True,
    ):
        self.references = list(references)
        self.candidates = list(candidates)
        self.group_size = group_size
        self.embedder = (embedder or Embedder()) if similarity else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="doctune-metrics")
        self._lexical: LexicalScorer | None = None
        self._ref_vectors: Any = None
        self._ref_row: dict[str, int] = {}
        self._futures: list[asyncio.Future] = []
        self._groups: dict[Key, dict[int, str | None]] = defaultdict(dict)
        self._metrics: dict[Key, dict[str, float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _submit(self, fn: Any, *args: Any) -> None:
        if self._loop is None:
            raise RuntimeError("Scoring.start() must be called first")
        self._futures.append(self._loop.run_in_executor(self._pool, fn, *args))

    def start(self) -> None:
        """Begin the slow set-up (rouge-score, MiniLM, reference embeddings) in the background."""
        self._loop = asyncio.get_running_loop()
        self._submit(self._load_lexical)
        if self.embedder is not None:
            self._submit(self._embed_references)

    # -------------------------------------------------------------- run in the worker thread (FIFO)

    def _load_lexical(self) -> None:
        self._lexical = LexicalScorer()

    def _embed_references(self) -> None:
        unique = list(dict.fromkeys(self.references))
        self._ref_row = {text: i for i, text in enumerate(unique)}
        self._ref_vectors = self.embedder.embed(unique)

    def _score_lexical(self, key: Key, answer: str) -> None:
        self._metrics.setdefault(key, {}).update(self._lexical.score(answer, self.references[key[1]]))

    def _embed_group(self, candidate: str, answers: dict[int, str]) -> None:
        indices = sorted(answers)
        vectors = self.embedder.embed([answers[i] for i in indices])
        refs = self._ref_vectors[[self._ref_row[self.references[i]] for i in indices]]
        for i, sim in zip(indices, (vectors * refs).sum(axis=1), strict=True):
            self._metrics.setdefault((candidate, i), {})[SIMILARITY] = float(max(-1.0, min(1.0, sim)))

    # -------------------------------------------------------------- called from the event loop

    def _group_len(self, group: int) -> int:
        return min(self.group_size, len(self.references) - group * self.group_size)

    def add(self, candidate: str, index: int, answer: str | None) -> None:
        """One finished answer (None: the answer failed and gets no metrics)."""
        if answer is not None:
            self._submit(self._score_lexical, (candidate, index), answer)
        if self.embedder is None:
            return
        group_key = (candidate, index // self.group_size)
        group = self._groups[group_key]
        group[index] = answer
        if len(group) == self._group_len(group_key[1]):
            answered = {i: a for i, a in group.items() if a is not None}
            if answered:
                self._submit(self._embed_group, candidate, answered)
            del self._groups[group_key]

    async def results(self) -> dict[Key, dict[str, float]]:
        """Wait for every metric; {(candidate, index): {metric: value}}. Raises what a worker job raised."""
        for (candidate, _), group in sorted(self._groups.items()):  # groups with answers never added
            answered = {i: a for i, a in group.items() if a is not None}
            if answered:
                self._submit(self._embed_group, candidate, answered)
        self._groups.clear()
        try:
            await asyncio.gather(*self._futures)
        finally:
            self._pool.shutdown(wait=True)
            store = self.embedder.store if self.embedder is not None else None
            if store is not None:
                store.close()
                log.info(
                    "similarity: %d texts embedded, %d read from %s", store.misses, store.hits, store.path
                )
        return self._metrics

    def close(self) -> None:
        """Drop queued work (after an error or Ctrl-C); a job already running finishes in the background."""
        self._pool.shutdown(wait=False, cancel_futures=True)
