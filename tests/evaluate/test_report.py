from doctune.evaluate.report import fmt_difference, fmt_estimate, worst_items


def row(index, candidate, score, outcome=None):
    return {
        "index": index,
        "candidate": candidate,
        "metrics": {} if score is None else {"judge_score": score},
        "pairwise": {"outcome": outcome} if outcome else None,
    }


def test_worst_items_puts_pairwise_losses_first_then_the_largest_gaps():
    rows = [
        row(0, "ft", 9, "win"),
        row(0, "base", 3, "loss"),
        row(1, "ft", 2, "tie"),  # behind by 6, no pairwise loss
        row(1, "base", 8, "tie"),
        row(2, "ft", 5, "loss"),  # lost pairwise, behind by 1
        row(2, "base", 6, "win"),
        row(3, "ft", None, "loss"),  # no judge score, lost pairwise
        row(3, "base", 7, "win"),
        row(4, "ft", 4),  # behind by 3
        row(4, "base", 7),
    ]
    worst = worst_items(rows, "ft", "base", "judge_score")
    assert [(w["index"], w["gap"], w["lost_pairwise"]) for w in worst] == [
        (2, 1, True),
        (3, None, True),
        (1, 6, False),
        (4, 3, False),
    ]
    assert [w["index"] for w in worst_items(rows, "ft", "base", "judge_score", limit=2)] == [2, 3]
    assert worst_items(rows, "base", "ft", "judge_score")[0]["index"] == 0


def test_formatting_of_estimates():
    assert fmt_estimate({"mean": 7.25, "ci": [6.5, 8.0], "n": 3}, digits=2) == "7.25 [6.50, 8.00]"
    assert fmt_estimate({"mean": None, "ci": [None, None], "n": 0}) == "n/a"
    assert fmt_difference({"mean": -0.1, "ci": [-0.2, 0.05], "n": 9}) == "-0.100 [-0.200, +0.050]"
