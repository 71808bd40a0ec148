"""A huge one-line text with a real tokenizer: progress moves within the document, and the tokenizer is never
handed the whole text (memory stays bounded), while every chunk still fits."""

from __future__ import annotations

import random

from doctune.config import build_config
from doctune.ingest import stage
from doctune.ingest.chunking import TokenizerCounter
from doctune.runs import read_jsonl

from .pdfs import WORDS


class _RecordingBackend:
    """The Rust tokenizer, with the length of the longest text it was asked to encode."""

    def __init__(self, backend):
        self._backend = backend
        self.longest = 0

    def encode(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self._backend.encode(text, **kw)

    def encode_batch(self, texts, **kw):
        self.longest = max([self.longest, *map(len, texts)])
        return self._backend.encode_batch(texts, **kw)


class _Progress:
    def __init__(self):
        self.events = []

    def start(self, description, total):
        pass

    def advance(self, n=1, **fields):
        self.events.append((n, fields))

    def finish(self):
        pass


def _recording_config(tmp_path, tiny_model_dir, monkeypatch):
    """A config that counts with the tiny model's tokenizer, and the list that will hold the counter used."""
    counters = []
    real_counter_for = stage.counter_for

    def recording_counter_for(cfg):
        counter = real_counter_for(cfg)
        assert isinstance(counter, TokenizerCounter)
        counter._backend = _RecordingBackend(counter._backend)
        counters.append(counter)
        return counter

    monkeypatch.setattr(stage, "counter_for", recording_counter_for)
    data = {"dir": "data", "tokenizer": str(tiny_model_dir), "chunk_tokens": 256, "chunk_overlap": 16}
    return build_config({"run_dir": "run", "data": data}, tmp_path), counters


def test_a_5_mb_one_line_text_shows_progress_and_is_tokenized_in_windows(
    tmp_path, tiny_model_dir, monkeypatch
):
    rng = random.Random(0)
    words = WORDS.split()  # no sentence ends and no line breaks: the hardest case for the chunker
    line = " ".join(rng.choice(words) for _ in range(900_000))[:5_000_000]
    data = tmp_path / "data"
    data.mkdir()
    (data / "dump.txt").write_text(line, encoding="utf-8")
    (data / "small.md").write_text("A small note about the pump.\n", encoding="utf-8")

    counters = []
    real_counter_for = stage.counter_for

    def recording_counter_for(cfg):
        counter = real_counter_for(cfg)
        assert isinstance(counter, TokenizerCounter)
        counter._backend = _RecordingBackend(counter._backend)
        counters.append(counter)
        return counter

    monkeypatch.setattr(stage, "counter_for", recording_counter_for)
    cfg = build_config(
        {
            "run_dir": "run",
            "data": {
                "dir": "data",
                "tokenizer": str(tiny_model_dir),
                "chunk_tokens": 256,
                "chunk_overlap": 16,
            },
        },
        tmp_path,
    )
    progress = _Progress()
    stage.run(cfg, progress=progress)

    within = [f for n, f in progress.events if n == 0]
    assert len(within) >= 4  # about one per MB read
    assert all(f["reading"].startswith("dump.txt ") for f in within)
    shares = [int(f["reading"].split()[-1].rstrip("%")) for f in within]
    assert shares == sorted(shares) and shares[0] < 50 < shares[-1] <= 100
    chunk_counts = [f["chunks"] for f in within]
    assert chunk_counts == sorted(chunk_counts) and chunk_counts[-1] > chunk_counts[0]
    assert len([n for n, _ in progress.events if n == 1]) == 2  # one step per file, as before

    (counter,) = counters
    assert counter._backend.longest <= 100_000  # never the whole 5 MB, nor a whole 1 MB region
    chunks = [c for c in read_jsonl(tmp_path / "run" / "chunks.jsonl") if c["doc"] == "dump.txt"]
    assert all(c["n_tokens"] <= 256 for c in chunks)
    assert sum(c["n_tokens"] for c in chunks) > 0.9 * 256 * len(chunks) * (1 - 16 / 256)  # chunks are full
    assert chunks[-1]["char_end"] == len(line.rstrip())


def test_a_text_without_whitespace_is_cut_without_tokenizing_it_whole(tmp_path, tiny_model_dir, monkeypatch):
    blob = "".join(
        random.Random(1).choices(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", k=200_000
        )
    )
    data = tmp_path / "data"
    data.mkdir()
    (data / "blob.txt").write_text(blob, encoding="utf-8")
    cfg, counters = _recording_config(tmp_path, tiny_model_dir, monkeypatch)
    stage.run(cfg)

    assert counters[0]._backend.longest < 50_000
    chunks = read_jsonl(tmp_path / "run" / "chunks.jsonl")
    assert all(c["n_tokens"] <= 256 for c in chunks)
    assert chunks[0]["char_start"] == 0 and chunks[-1]["char_end"] == len(blob)
