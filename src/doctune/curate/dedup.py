"""Duplicate questions: exact (normalised text), near (MinHash LSH on word sets) and semantic (MiniLM cosine).

Every check works in two steps: find the *neighbours* of each question (pairs of questions at or above the
threshold), then `keep_best` walks the questions best first (highest judge score, then file order) and keeps a
question only when no question already kept is its neighbour. So of a duplicate group the best-scored pair
stays, and a chain A~B~C never removes C because of A when A and C are not alike themselves.

Near duplicates: a question's shingles are its set of normalised words (`rules.normalize`), so reordering
and punctuation do not matter and one inserted or dropped word in a ten-word question keeps Jaccard at
about 0.9. LSH only proposes candidates; each candidate's Jaccard is then computed on the word sets
themselves, so no pair below the threshold is ever called a duplicate. The bands are chosen so that a pair
exactly at the threshold is found with probability LSH_RECALL (more above it).
"""

from __future__ import annotations

import itertools
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from datasketch import MinHash

from doctune.curate.rules import normalize_question

log = logging.getLogger(__name__)

NUM_PERM = 128
# LSH bands are chosen so that a pair exactly at the threshold becomes a candidate with this probability
# (higher above it); every candidate is then checked on the word sets, so extra candidates cost only time.
LSH_RECALL = 0.999
EMBED_BATCH = 128

Neighbours = dict[int, list[tuple[int, float]]]
_STOPWORDS_TEXT = (
    "a an the of in on at to for from by with about into over under as and or but if then than so is are was "
    "were be been being am do does did done has have had can could should would will shall may might must i "
    "me my we our you your it its this that these those there here what which who whom whose when where why "
    "how please tell explain describe"
)
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())


def shingles(text: str) -> frozenset[str]:
    """The set of normalised words of `text`: what near-duplicate checks compare.

    >>> sorted(shingles("What is the Context length, of Llama 3?"))
    ['3', 'context', 'is', 'length', 'llama', 'of', 'the', 'what']
    """
    return frozenset(normalize_question(text).split())


def content_words(text: str) -> frozenset[str]:
    """Words without English function words (all words when nothing else is left): what the contamination
    check compares, so "What is the X of Y?" and "What is the Z of Y?" do not match on "what is the of".

    >>> sorted(content_words("What is the context length of Llama 3?"))
    ['3', 'context', 'length', 'llama']
    """
    words = shingles(text)
    return (words - STOPWORDS) or words


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard similarity of two sets (0 when either is empty).

    >>> jaccard(frozenset("abc"), frozenset("abd"))
    0.5
    """
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def lsh_params(threshold: float, num_perm: int, recall: float = LSH_RECALL) -> tuple[int, int]:
    """(bands, rows) with the most rows per band (fewest false candidates) that still finds a pair of
    Jaccard `threshold` with probability `recall`.

    >>> lsh_params(0.85, 128), lsh_params(0.6, 128)
    ((18, 7), (42, 3))
    """
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm // 2, 2


def minhash_signatures(sets: Sequence[frozenset[str]], num_perm: int = NUM_PERM) -> np.ndarray:
    """(len(sets), num_perm) MinHash signatures (datasketch's MinHash over the CRC32 of each word)."""
    minhash = MinHash(num_perm=num_perm, hashfunc=zlib.crc32)
    out = np.empty((len(sets), num_perm), dtype=minhash.hashvalues.dtype)
    for i, words in enumerate(sets):
        minhash.clear()
        minhash.update_batch([w.encode("utf-8") for w in words])
        out[i] = minhash.hashvalues
    return out


class Sketches:
    """Word sets and MinHash signatures of a list of texts."""

    def __init__(
        self,
        texts: Sequence[str],
        num_perm: int = NUM_PERM,
        shingler: Callable[[str], frozenset[str]] = shingles,
    ):
        self.num_perm = num_perm
        self.sets = [shingler(t) for t in texts]
        self.signatures = minhash_signatures(self.sets, num_perm)
        self.nonempty = np.flatnonzero([bool(s) for s in self.sets])

    def __len__(self) -> int:
        return len(self.sets)

    def band_keys(self, bands: int, rows: int) -> np.ndarray:
        """(len(nonempty), bands) uint64: one key per LSH band of each non-empty item's signature. Equal
        bands give equal keys; unequal bands collide with probability ~2**-64 (and are checked anyway)."""
        sig = self.signatures[self.nonempty, : bands * rows].astype(np.uint64)
        mix = np.random.default_rng(rows).integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
        return (sig.reshape(len(sig), bands, rows) * mix).sum(axis=2, dtype=np.uint64)


def _self_candidates(keys: np.ndarray) -> set[tuple[int, int]]:
    """Row pairs (i < j) that share a key in some band."""
    found: set[tuple[int, int]] = set()
    for band in keys.T:
        order = np.argsort(band, kind="stable")
        ordered = band[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        sizes = np.diff(np.r_[starts, len(ordered)])
        for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist(), strict=True):
            found.update(itertools.combinations(sorted(order[start : start + size].tolist()), 2))
    return found


def _cross_candidates(keys: np.ndarray, other: np.ndarray) -> set[tuple[int, int]]:
    """(row of keys, row of other) pairs that share a key in some band."""
    found: set[tuple[int, int]] = set()
    for band, other_band in zip(keys.T, other.T, strict=True):
        rows_of: dict[int, list[int]] = {}
        for j, key in enumerate(other_band.tolist()):
            rows_of.setdefault(key, []).append(j)
        for i in np.flatnonzero(np.isin(band, other_band)).tolist():
            found.update((i, j) for j in rows_of[int(band[i])])
    return found


def near_neighbours(items: Sketches, threshold: float, *, against: Sketches | None = None) -> Neighbours:
    """For each item, the items of `against` (default: the other items) whose word-set Jaccard is at least
    `threshold`, as (index, jaccard), most similar first.

    MinHash LSH proposes candidates: datasketch computes the signatures; the bands are hashed and matched
    with numpy over the whole signature matrix at once (datasketch's MinHashLSH costs ~60 us of Python per
    insert and per query, which made it most of the stage's time at 50,000 pairs). Every candidate's
    Jaccard is then computed on the word sets themselves."""
    other = against if against is not None else items
    bands, rows = lsh_params(threshold, items.num_perm)
    keys = items.band_keys(bands, rows)
    if against is None:
        local = _self_candidates(keys)
        candidates = {(int(items.nonempty[a]), int(items.nonempty[b])) for a, b in local}
        candidates |= {(j, i) for i, j in candidates}
    else:
        local = _cross_candidates(keys, against.band_keys(bands, rows))
        candidates = {(int(items.nonempty[a]), int(against.nonempty[b])) for a, b in local}
    found: Neighbours = {}
    for i, j in candidates:
        sim = jaccard(items.sets[i], other.sets[j])
        if sim >= threshold:
            found.setdefault(i, []).append((j, sim))
    for hits in found.values():
        hits.sort(key=lambda h: (-h[1], h[0]))
    return found


def exact_duplicates(
    texts: Sequence[str] | Mapping[int, str],
    order: Sequence[int],
    *,
    key: Callable[[str], str] = normalize_question,
) -> dict[int, tuple[int, float]]:
    """Walk `order` (best first): an item whose normalised text was seen before is dropped as a duplicate of
    the first one (similarity 1.0). The same result as `keep_best` on exact neighbours, in linear time.

    >>> exact_duplicates(["What is X?", "what is  x", "Why?"], order=[1, 0, 2])
    {0: (1, 1.0)}
    """
    first: dict[str, int] = {}
    dropped: dict[int, tuple[int, float]] = {}
    for i in order:
        kept = first.setdefault(key(texts[i]), i)
        if kept != i:
            dropped[i] = (kept, 1.0)
    return dropped


def semantic_neighbours(
    vectors: np.ndarray,
    threshold: float,
    *,
    keys: Sequence[int] | None = None,
    against: np.ndarray | None = None,
    block: int = 1024,
) -> Neighbours:
    """Cosine neighbours of unit `vectors[keys]` among `against` (default: the other keys), block by block."""
    keys = np.arange(len(vectors)) if keys is None else np.asarray(list(keys), dtype=np.int64)
    other = against if against is not None else vectors[keys]
    other_ids = np.arange(len(other)) if against is not None else keys
    found: Neighbours = {}
    for start in range(0, len(keys), block):
        rows = keys[start : start + block]
        sims = vectors[rows] @ other.T
        for r, c in zip(*np.nonzero(sims >= threshold), strict=True):
            i, j = int(rows[r]), int(other_ids[c])
            if against is None and i == j:
                continue
            found.setdefault(i, []).append((j, round(float(sims[r, c]), 4)))
    for hits in found.values():
        hits.sort(key=lambda h: (-h[1], h[0]))
    return found


def best_first(keys: Sequence[int], scores: Sequence[float | None]) -> list[int]:
    """`keys` ordered best first: higher score first (no score counts as lowest), then earlier in the file.

    >>> best_first([0, 1, 2, 3], [4, None, 5, 4])
    [2, 0, 3, 1]
    """
    return sorted(keys, key=lambda i: (-(scores[i] if scores[i] is not None else float("-inf")), i))


def keep_best(order: Sequence[int], neighbours: Neighbours) -> dict[int, tuple[int, float]]:
    """Walk `order` (best first) and keep an item unless a kept item is its neighbour. Returns the dropped
    items, each with the kept item it duplicates (the most similar one) and their similarity. Each item's
    neighbours are listed most similar first.

    >>> keep_best([2, 0, 1], {0: [(1, 0.9)], 1: [(2, 0.95), (0, 0.9)], 2: [(1, 0.95)]})
    {1: (2, 0.95)}
    """
    kept: set[int] = set()
    dropped: dict[int, tuple[int, float]] = {}
    for i in order:
        match = next(((j, sim) for j, sim in neighbours.get(i, ()) if j in kept), None)
        if match is None:
            kept.add(i)
        else:
            dropped[i] = match
    return dropped


def embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-length MiniLM embeddings (float32, one row per text) of the packaged all-MiniLM-L6-v2."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    from doctune.models import minilm_vectors

    return minilm_vectors(list(texts), "cpu", EMBED_BATCH)
