"""eval/embeddings.sqlite: MiniLM vectors of texts eval has embedded before (doctune.evaluate.embedding_store).

The encoder is replaced by a counting stand-in (one distinct unit vector per text), so these tests check what
the store keeps and returns; tests/evaluate/test_stage.py checks a real re-run of eval embeds nothing."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest

from doctune.evaluate.embedding_store import EmbeddingStore
from doctune.evaluate.metrics import Embedder


def vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    v = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def encoded(monkeypatch) -> list[str]:
    """Every text the Embedder had to encode itself."""
    seen: list[str] = []

    def encode(self, texts):
        seen.extend(texts)
        return np.stack([vector(t) for t in texts])

    monkeypatch.setattr(Embedder, "_encode", encode)
    return seen


def test_texts_embedded_before_come_from_the_store_in_a_later_process(tmp_path, encoded):
    path = tmp_path / "eval" / "embeddings.sqlite"
    first = Embedder(store=EmbeddingStore(path)).embed(
        ["Lumen syncs every 5 minutes.", "Port 8080.", "Port 8080."]
    )
    assert encoded == ["Lumen syncs every 5 minutes.", "Port 8080."]  # each distinct text once
    store = EmbeddingStore(path)  # as a re-run of eval opens it
    again = Embedder(store=store).embed(["Port 8080.", "Lumen syncs every 5 minutes.", "Sync is hourly."])
    assert encoded[2:] == ["Sync is hourly."]
    np.testing.assert_array_equal(again[0], first[1])
    np.testing.assert_array_equal(again[1], first[0])
    np.testing.assert_array_equal(again[2], vector("Sync is hourly."))
    assert (store.hits, store.misses) == (2, 1)


def test_vectors_of_another_embedding_model_are_never_reused(tmp_path, encoded):
    path = tmp_path / "embeddings.sqlite"
    Embedder(store=EmbeddingStore(path, model="MiniLM 0.1.0")).embed(["Port 8080."])
    Embedder(store=EmbeddingStore(path, model="MiniLM 0.2.0")).embed(["Port 8080."])
    assert encoded == ["Port 8080.", "Port 8080."]


def test_a_damaged_store_is_left_as_it_is_and_every_text_is_embedded(tmp_path, encoded, caplog):
    path = tmp_path / "embeddings.sqlite"
    path.write_bytes(b"not a database, but somebody's file" * 100)
    with caplog.at_level(logging.WARNING):
        vectors = Embedder(store=EmbeddingStore(path)).embed(["Port 8080.", "Sync is hourly."])
    np.testing.assert_array_equal(vectors, np.stack([vector("Port 8080."), vector("Sync is hourly.")]))
    assert encoded == ["Port 8080.", "Sync is hourly."]
    assert path.read_bytes() == b"not a database, but somebody's file" * 100
    assert [r.getMessage() for r in caplog.records if "embedding store not usable" in r.getMessage()]


def test_no_file_is_written_until_a_vector_is_stored(tmp_path, encoded):
    path = tmp_path / "eval" / "embeddings.sqlite"
    store = EmbeddingStore(path)
    assert store.get(["Port 8080."]) == {}
    assert not path.exists()
