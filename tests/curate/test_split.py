"""Train/val split by source chunk: no chunk on both sides, the same split for the same seed."""

from __future__ import annotations

from collections import defaultdict

from doctune.curate.split import val_chunks
from doctune.curate.stage import run
from doctune.runs import read_jsonl

from .helpers import make_config, pair, write_raw

SUBJECTS = [
    "backup",
    "login",
    "export",
    "upgrade",
    "printing",
    "billing",
    "search",
    "alerts",
    "sync",
    "audit",
]


def _pairs(n_chunks=10, per_chunk=3):
    return [
        pair(f"{c}-{k}", f"{q} {SUBJECTS[c]} {k} step?", chunk=f"manual.pdf#{c}")
        for c in range(n_chunks)
        for k, q in enumerate(
            ["How do I configure the", "Why does the", "When should I schedule the"][:per_chunk]
        )
    ]


def _split(cfg):
    sides = {}
    for name in ("train", "val"):
        for row in read_jsonl(cfg.run_path / f"{name}.jsonl"):
            sides[row["id"]] = (name, row["chunk_id"])
    return sides


def test_no_chunk_has_pairs_in_both_train_and_val(tmp_path):
    cfg = make_config(tmp_path, val_fraction=0.3, seed=7, dedup={"near": None})
    write_raw(cfg, _pairs())
    summary = run(cfg)
    sides_of_chunk = defaultdict(set)
    for side, chunk in _split(cfg).values():
        sides_of_chunk[chunk].add(side)
    assert all(len(s) == 1 for s in sides_of_chunk.values())
    val = [c for c, s in sides_of_chunk.items() if s == {"val"}]
    assert len(val) == 3  # 30% of 10 chunks
    assert ("val pairs (chunks)", "9 (3)") in summary.rows
    curated = read_jsonl(cfg.run_path / "qa_curated.jsonl")
    assert {r["id"]: r["split"] for r in curated} == {i: side for i, (side, _) in _split(cfg).items()}


def test_the_split_is_the_same_for_the_same_seed_and_changes_with_it(tmp_path):
    splits = []
    for name, seed in (("a", 1), ("b", 1), ("c", 4)):
        cfg = make_config(tmp_path / name, val_fraction=0.3, seed=seed, dedup={"near": None})
        write_raw(cfg, _pairs())
        run(cfg)
        splits.append({i: side for i, (side, _) in _split(cfg).items()})
    assert splits[0] == splits[1]
    assert splits[0] != splits[2]
    # the ranking is per chunk: the same chunks go to val whatever order they come in
    chunks = [f"manual.pdf#{c}" for c in range(10)]
    assert val_chunks(chunks, 0.3, 1) == val_chunks(list(reversed(chunks)), 0.3, 1)
    assert len({frozenset(val_chunks(chunks, 0.3, seed)) for seed in range(10)}) > 5


def test_val_gets_a_chunk_when_there_are_two_and_none_at_fraction_zero(tmp_path):
    cfg = make_config(tmp_path, val_fraction=0.01, dedup={"near": None})
    write_raw(cfg, _pairs(n_chunks=2))
    run(cfg)
    assert len(read_jsonl(cfg.run_path / "val.jsonl")) == 3
    assert len(read_jsonl(cfg.run_path / "train.jsonl")) == 3

    cfg = make_config(tmp_path / "zero", val_fraction=0.0, dedup={"near": None})
    write_raw(cfg, _pairs(n_chunks=2))
    run(cfg)
    assert read_jsonl(cfg.run_path / "val.jsonl") == []
    assert len(read_jsonl(cfg.run_path / "train.jsonl")) == 6


def test_a_single_chunk_goes_to_train():
    assert val_chunks(["only"], 0.5, seed=0) == set()
    assert len(val_chunks([f"c{i}" for i in range(5)], 0.99, seed=0)) == 4
