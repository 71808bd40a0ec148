"""Means with 95% bootstrap confidence intervals, paired differences, and the aggregates of summary.json.

The bootstrap draws from a fixed seed, so the same per-item values always give the same intervals (two eval
runs over the same cache write identical summaries).

>>> est = bootstrap_mean([0.0, 1.0, 1.0, 1.0])
>>> est.mean, est.n, est.low <= est.mean <= est.high
(0.75, 4, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95
DIGITS = 6


@dataclass(frozen=True)
class Estimate:
    """A mean over `n` values with its bootstrap interval [low, high]; all None when n == 0."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def as_dict(self) -> dict[str, Any]:
        r = lambda v: None if v is None else round(v, DIGITS)  # noqa: E731
        return {"mean": r(self.mean), "ci": [r(self.low), r(self.high)], "n": self.n}


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_mean(
    values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE
) -> Estimate:
    """Mean of `values` and its percentile bootstrap interval (fixed seed: deterministic)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Estimate(None, None, None, 0)
    mean = float(x.mean())
    if n == 1:
        return Estimate(mean, mean, mean, 1)
    means = x[_resample_indices(n, resamples, seed)].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(mean, float(low), float(high), n)


def paired_difference(
    a: dict[int, float], b: dict[int, float], *, resamples: int = RESAMPLES, seed: int = SEED
) -> Estimate:
    """Mean of a[i] - b[i] over the items both have, with its bootstrap interval (items resampled as pairs).

    >>> paired_difference({0: 0.5, 1: 1.0, 2: 0.0}, {0: 0.25, 1: 0.5}).mean
    0.375
    """
    common = sorted(set(a) & set(b))
    return bootstrap_mean([a[i] - b[i] for i in common], resamples=resamples, seed=seed)


def metric_values(rows: Sequence[dict[str, Any]], candidate: str, metric: str) -> dict[int, float]:
    """{item index: value} of one metric of one candidate; items without the value are left out."""
    out = {}
    for row in rows:
        if row["candidate"] != candidate:
            continue
        value = (row.get("metrics") or {}).get(metric)
        if value is not None:
            out[row["index"]] = float(value)
    return out


def aggregate(
    rows: Sequence[dict[str, Any]], candidates: Sequence[str], metrics: Sequence[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """{candidate: {metric: {"mean", "ci": [low, high], "n"}}}."""
    return {
        cand: {m: bootstrap_mean(list(metric_values(rows, cand, m).values())).as_dict() for m in metrics}
        for cand in candidates
    }


def compare(
    rows: Sequence[dict[str, Any]], a: str, b: str, metrics: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """{metric: paired a - b difference with CI} over the items both candidates have a value for."""
    return {
        m: paired_difference(metric_values(rows, a, m), metric_values(rows, b, m)).as_dict() for m in metrics
    }


PAIR_POINTS = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def pairwise_summary(outcomes: Sequence[str | None]) -> dict[str, Any]:
    """Win / tie / loss counts of A against B (None: no verdict), and A's win rate (a tie counts half) with CI.

    >>> s = pairwise_summary(["win", "tie", "loss", "win", None])
    >>> s["win"], s["tie"], s["loss"], s["missing"], s["win_rate"]["mean"]
    (2, 1, 1, 1, 0.625)
    """
    known = [o for o in outcomes if o is not None]
    return {
        "win": known.count("win"),
        "tie": known.count("tie"),
        "loss": known.count("loss"),
        "missing": len(outcomes) - len(known),
        "win_rate": bootstrap_mean([PAIR_POINTS[o] for o in known]).as_dict(),
    }
