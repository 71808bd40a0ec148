"""Duplicate questions: of each group, the best-scored pair stays; the others name the pair they repeat."""

from __future__ import annotations

import random

import pytest

from doctune.curate.dedup import Sketches, jaccard, keep_best, near_neighbours, shingles
from doctune.curate.stage import run
from doctune.runs import read_jsonl

from .helpers import TOPICS, FakeJudge, make_config, pair, scored, write_raw


def _rejected(cfg):
    return {r["id"]: r for r in read_jsonl(cfg.run_path / "qa_rejected.jsonl")}


def _kept_ids(cfg):
    return [r["id"] for r in read_jsonl(cfg.run_path / "qa_curated.jsonl")]


def test_exact_duplicate_questions_keep_the_best_scored_answer(tmp_path):
    cfg = make_config(tmp_path, mode="score", threshold=3)
    q = TOPICS[0]
    pairs = [
        pair(0, q, "Rotate them in the console."),
        pair(1, q.upper().replace("?", " ?"), "Use `billing keys rotate`, then restart the service."),
        pair(2, "  " + q.lower(), "Keys are rotated by the admin team."),
        *[pair(i, t) for i, t in enumerate(TOPICS[1:], 3)],
    ]
    write_raw(cfg, pairs)
    judge = FakeJudge(scored({pairs[0]["answer"]: 3, pairs[1]["answer"]: 5, pairs[2]["answer"]: 4}))
    run(cfg, llm=judge)
    rejected = _rejected(cfg)
    assert {i: r["rule"] for i, r in rejected.items()} == {"p0": "duplicate_exact", "p2": "duplicate_exact"}
    assert rejected["p0"]["matched"]["id"] == "p1" and rejected["p0"]["score"] == 3
    assert "p1" in _kept_ids(cfg)


def test_copies_of_a_whole_pair_cost_no_judge_tokens(tmp_path):
    cfg = make_config(tmp_path, mode="score")
    pairs = [pair(0, TOPICS[0], "Same answer."), pair(1, TOPICS[0] + " ", "same answer"), pair(2, TOPICS[1])]
    write_raw(cfg, pairs)
    judge = FakeJudge(scored({}))
    run(cfg, llm=judge)
    assert len(judge.calls) == 2
    assert _rejected(cfg)["p1"]["rule"] == "duplicate_exact"
    assert _rejected(cfg)["p1"]["matched"]["id"] == "p0"


def test_near_duplicates_keep_the_best_scored(tmp_path):
    cfg = make_config(tmp_path, mode="score", threshold=1, dedup={"near": 0.8})
    near_a = "How do I rotate the signing keys of the billing service quickly?"  # one word added
    near_b = "How do I rotate signing keys of the billing service?"  # one word dropped
    pairs = [
        pair(0, TOPICS[0]),
        pair(1, near_a),
        pair(2, near_b),
        *[pair(i, t) for i, t in enumerate(TOPICS[1:], 3)],
    ]
    write_raw(cfg, pairs)
    run(cfg, llm=FakeJudge(scored({pairs[0]["answer"]: 2, pairs[1]["answer"]: 5, pairs[2]["answer"]: 3})))
    rejected = _rejected(cfg)
    assert {i: r["rule"] for i, r in rejected.items()} == {"p0": "duplicate_near", "p2": "duplicate_near"}
    assert rejected["p0"]["matched"]["id"] == "p1"
    assert rejected["p0"]["matched"]["similarity"] >= 0.8
    assert len(_kept_ids(cfg)) == len(pairs) - 2


def test_without_a_judge_the_first_of_a_group_stays(tmp_path):
    cfg = make_config(tmp_path, mode="off")
    pairs = [pair(0, TOPICS[0]), pair(1, TOPICS[0].rstrip("?") + " exactly?"), pair(2, TOPICS[1])]
    write_raw(cfg, pairs)
    run(cfg)
    assert {i: r["rule"] for i, r in _rejected(cfg).items()} == {"p1": "duplicate_near"}


def test_near_dedup_can_be_switched_off(tmp_path):
    cfg = make_config(tmp_path, mode="off", dedup={"near": None})
    write_raw(cfg, [pair(0, TOPICS[0]), pair(1, TOPICS[0].rstrip("?") + " exactly?")])
    run(cfg)
    assert _rejected(cfg) == {}


def test_a_chain_of_neighbours_does_not_remove_the_far_end():
    # A~B and B~C, but not A~C: A stays (best), B repeats A, C stays because B is gone
    neighbours = {0: [(1, 0.9)], 1: [(0, 0.9), (2, 0.9)], 2: [(1, 0.9)]}
    assert keep_best([0, 1, 2], neighbours) == {1: (0, 0.9)}


def test_near_neighbours_never_report_a_pair_below_the_threshold():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.sample(vocab, rng.randint(3, 9))) + "?" for _ in range(400)]
    sketches = Sketches(texts)
    found = near_neighbours(sketches, 0.6)
    truth = {
        (i, j)
        for i in range(len(texts))
        for j in range(len(texts))
        if i != j and jaccard(shingles(texts[i]), shingles(texts[j])) >= 0.6
    }
    reported = {(i, j) for i, hits in found.items() for j, _ in hits}
    assert reported <= truth
    assert len(reported) >= 0.99 * len(truth) > 0


@pytest.mark.slow
def test_semantic_duplicates_keep_the_best_scored(tmp_path):
    cfg = make_config(tmp_path, mode="score", threshold=1, dedup={"near": 0.85, "semantic": 0.85})
    paraphrase = "For how long do we keep audit logs until they get removed?"
    pairs = [pair(i, t) for i, t in enumerate(TOPICS)] + [pair(50, paraphrase, "Audit logs stay 90 days.")]
    write_raw(cfg, pairs)
    run(cfg, llm=FakeJudge(scored({"Audit logs stay 90 days.": 5}, default=4)))
    rejected = _rejected(cfg)
    audit = "p" + str(TOPICS.index("How long are audit logs retained before they are deleted?"))
    assert {i: r["rule"] for i, r in rejected.items()} == {audit: "duplicate_semantic"}
    assert rejected[audit]["matched"]["id"] == "p50"
    assert rejected[audit]["matched"]["similarity"] >= 0.85
