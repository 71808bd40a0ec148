import random

import pytest

from doctune.evaluate.stats import aggregate, bootstrap_mean, compare, paired_difference, pairwise_summary


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    rng = random.Random(1)
    values = [rng.random() for _ in range(200)]
    a, b = bootstrap_mean(values), bootstrap_mean(values)
    assert a == b
    assert a.low < a.mean < a.high
    assert a.mean == pytest.approx(sum(values) / len(values))


def test_interval_narrows_with_more_items():
    rng = random.Random(2)
    small = bootstrap_mean([rng.random() for _ in range(20)])
    large = bootstrap_mean([rng.random() for _ in range(2000)])
    assert (large.high - large.low) < (small.high - small.low) / 4


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = random.Random(3)
    covered = 0
    for trial in range(200):
        values = [rng.gauss(0.3, 0.2) for _ in range(60)]
        est = bootstrap_mean(values, resamples=500, seed=trial)
        covered += est.low <= 0.3 <= est.high
    assert 0.88 <= covered / 200 <= 0.99


def test_edge_cases():
    assert bootstrap_mean([]).mean is None and bootstrap_mean([]).n == 0
    one = bootstrap_mean([0.4])
    assert (one.mean, one.low, one.high) == (0.4, 0.4, 0.4)
    same = bootstrap_mean([2.0] * 10)
    assert same.low == same.high == 2.0


def test_paired_difference_uses_only_common_items_and_pairs_them():
    a = {i: 0.5 + 0.01 * i for i in range(50)}
    b = {i: 0.4 + 0.01 * i for i in range(50)}
    b[99] = 1.0  # no partner in a: ignored
    diff = paired_difference(a, b)
    assert diff.n == 50
    assert diff.mean == pytest.approx(0.1)
    # a constant per-item gain is certain when items are paired, though the two means' own CIs overlap
    assert diff.low == pytest.approx(0.1) and diff.high == pytest.approx(0.1)


def test_aggregate_and_compare_skip_missing_values():
    rows = [
        {"index": 0, "candidate": "ft", "metrics": {"rougeL": 0.5, "judge_score": 8.0}},
        {"index": 0, "candidate": "base", "metrics": {"rougeL": 0.25, "judge_score": 4.0}},
        {"index": 1, "candidate": "ft", "metrics": {"rougeL": 0.7}},  # judgement missing
        {"index": 1, "candidate": "base", "metrics": {"rougeL": 0.2, "judge_score": 2.0}},
        {"index": 2, "candidate": "ft", "metrics": {}},  # answer failed
        {"index": 2, "candidate": "base", "metrics": {"rougeL": 0.1, "judge_score": 1.0}},
    ]
    agg = aggregate(rows, ["ft", "base"], ["rougeL", "judge_score"])
    assert agg["ft"]["judge_score"]["n"] == 1 and agg["ft"]["judge_score"]["mean"] == 8.0
    assert agg["ft"]["rougeL"]["n"] == 2 and agg["ft"]["rougeL"]["mean"] == pytest.approx(0.6)
    assert agg["base"]["judge_score"]["mean"] == pytest.approx(7 / 3, abs=1e-6)
    diff = compare(rows, "ft", "base", ["rougeL", "judge_score"])
    assert diff["judge_score"]["n"] == 1 and diff["judge_score"]["mean"] == 4.0
    assert diff["rougeL"]["n"] == 2 and diff["rougeL"]["mean"] == pytest.approx(0.375)


def test_pairwise_summary_counts():
    s = pairwise_summary(["win"] * 6 + ["loss"] * 2 + ["tie"] * 2 + [None])
    assert (s["win"], s["tie"], s["loss"], s["missing"]) == (6, 2, 2, 1)
    assert s["win_rate"]["mean"] == pytest.approx(0.7)
    assert s["win_rate"]["n"] == 10
