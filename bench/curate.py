"""How fast and how well does `doctune curate` (judge off) dedup, guard against eval overlap and split?

50,000 synthetic generated pairs (by default) with planted problems:

  near duplicates   copies of other pairs' questions with one edit (case/punctuation, a word added, dropped
                    or two words swapped); a plant is caught when one of the two is rejected as a duplicate
                    of the other
  eval overlaps     eval questions reworded slightly (case, a polite prefix, a word dropped or swapped);
                    caught when rejected as `eval_overlap` matching the eval question it came from
  hard negatives    eval questions with two content words replaced: other questions, must not be flagged
  rule failures     empty answers, two-word questions, statements

In one run it times:

  baseline          the stage with near dedup and the eval set off (rules, exact dedup, split, writing)
  doctune           the stage as configured: + near dedup (MinHash LSH) + contamination guard
  brute force       exact all-pairs Jaccard on a sample, extrapolated (quadratic) to all pairs: what near
                    dedup would cost without LSH

Targets: the stage under 60 s, >= 95% of planted near duplicates and 100% of planted eval overlaps caught.
Precision is measured against the plants (base questions are drawn so that no two are alike by chance).

    .venv/bin/python bench/curate.py [--n 50000] [--near 0.85] [--semantic-sample 0]

`--semantic-sample N` also times semantic dedup (MiniLM embeddings) on N pairs. Prints a table and writes
bench/results/curate.json. Numbers from a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from doctune.config import build_config  # noqa: E402
from doctune.curate import dedup  # noqa: E402
from doctune.curate.stage import run  # noqa: E402
from doctune.runs import atomic_write_json, atomic_write_jsonl, read_jsonl  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "curate.json"
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
STARTS = [
    ("How", "do I"),
    ("How", "can the"),
    ("Why", "does the"),
    ("When", "should the"),
    ("Where", "is the"),
    ("Which", "option sets the"),
    ("What", "happens to the"),
    ("What", "is the"),
]
FILLERS = ["exactly", "actually", "currently", "normally", "usually"]
PREFIXES = ["Can you tell me", "Please explain", "Tell me"]


def vocabulary(rng: random.Random, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))))
    return sorted(words)


def question(rng: random.Random, vocab: list[str]) -> str:
    qword, aux = rng.choice(STARTS)
    content = rng.sample(vocab, rng.randint(5, 7))
    middle = " ".join(content[:3])
    tail = " ".join(content[3:])
    return f"{qword} {aux} {middle} {rng.choice(['of', 'for', 'in', 'with'])} {tail}?"


def near_copy(rng: random.Random, text: str) -> str:
    words = text.rstrip("?").split()
    edit = rng.choice(["case", "insert", "drop", "swap"])
    if edit == "case":
        return text.lower().rstrip("?") + " ?"
    if edit == "insert":
        words.insert(rng.randint(2, len(words)), rng.choice(FILLERS))
    elif edit == "drop":
        del words[rng.randint(3, len(words) - 1)]
    else:
        k = rng.randint(2, len(words) - 2)
        words[k], words[k + 1] = words[k + 1], words[k]
    return " ".join(words) + "?"


def reworded(rng: random.Random, text: str) -> str:
    body = text.rstrip("?")
    edit = rng.choice(["case", "prefix", "drop", "swap", "prefix+drop"])
    words = body.split()
    if "drop" in edit:
        del words[rng.randint(3, len(words) - 1)]
    if edit == "swap":
        k = rng.randint(2, len(words) - 2)
        words[k], words[k + 1] = words[k + 1], words[k]
    body = " ".join(words)
    if "prefix" in edit:
        body = f"{rng.choice(PREFIXES)} {body[0].lower()}{body[1:]}"
    return body.lower() if edit == "case" else body + "?"


def hard_negative(rng: random.Random, text: str, vocab: set[str]) -> str:
    """Another question on the same subject: 40% of the eval question's own words replaced."""
    words = text.rstrip("?").split()
    content_positions = [i for i, w in enumerate(words) if w in vocab]
    for i in rng.sample(content_positions, max(2, round(0.4 * len(content_positions)))):
        words[i] = rng.choice(sorted(vocab - set(words)))
    return " ".join(words) + "?"


def make_pairs(n: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, Any]]:
    rng = random.Random(seed)
    vocab = vocabulary(rng, 6000)
    vocab_set = set(vocab)
    n_eval, n_overlap, n_negative, n_rules = 300, 500, 500, 500
    n_near = n // 20
    n_base = n - n_near - n_overlap - n_negative - n_rules
    eval_set = [{"question": question(rng, vocab), "answer": "An eval answer."} for _ in range(n_eval)]
    rows: list[dict[str, Any]] = []

    def add(q: str, kind: str, **extra: Any) -> None:
        rows.append(
            {"question": q, "answer": f"The {' '.join(rng.sample(vocab, 4))} setting.", "kind": kind, **extra}
        )

    for _ in range(n_base):
        add(question(rng, vocab), "base")
    for _ in range(n_near):
        src = rng.randrange(n_base)
        add(near_copy(rng, rows[src]["question"]), "near", source=src)
    for _ in range(n_overlap):
        k = rng.randrange(n_eval)
        add(reworded(rng, eval_set[k]["question"]), "overlap", eval_index=k)
    for _ in range(n_negative):
        add(hard_negative(rng, eval_set[rng.randrange(n_eval)]["question"], vocab_set), "negative")
    for k in range(n_rules):
        bad = [
            ("What is it?", ""),
            ("Install steps?", "Run it."),
            ("The installer needs root.", "Yes it does."),
        ]
        q, a = bad[k % 3]
        rows.append({"question": q, "answer": a, "kind": "rules"})
    # shuffle, then give ids, chunks (4 pairs per chunk), context
    order = list(range(len(rows)))
    rng.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    pairs = []
    for new, old in enumerate(order):
        row = dict(rows[old])
        if "source" in row:
            row["source"] = f"p{position[row['source']]}"
        row.update(id=f"p{new}", chunk_id=f"doc{new // 400}.md#{new // 4}", doc=f"doc{new // 400}.md")
        row["context"] = f"Context of chunk {row['chunk_id']}."
        pairs.append(row)
    counts = {
        "pairs": len(pairs),
        "base": n_base,
        "near": n_near,
        "overlap": n_overlap,
        "negative": n_negative,
    }
    return pairs, eval_set, {**counts, "rules": n_rules, "eval_questions": n_eval}


def config(tmp: Path, name: str, *, near: float | None, eval_set: bool, semantic: float | None = None):
    raw = {
        "run_dir": name,
        "curate": {
            "mode": "off",
            "dedup": {"near": near, "semantic": semantic},
            "eval_set": "eval_set.json" if eval_set else None,
            "val_fraction": 0.1,
        },
    }
    return build_config(raw, tmp)


def timed_stage(cfg, pairs: list[dict[str, Any]]) -> float:
    atomic_write_jsonl(cfg.run_path / "qa_raw.jsonl", pairs)
    t0 = time.perf_counter()
    run(cfg)
    return time.perf_counter() - t0


def quality(cfg, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    rejected = {r["id"]: r for r in read_jsonl(cfg.run_path / "qa_rejected.jsonl")}
    by_id = {p["id"]: p for p in pairs}
    near = [p for p in pairs if p["kind"] == "near"]
    family = {p["id"]: p.get("source", p["id"]) for p in pairs}  # a near copy belongs to its source

    def caught_dup(p: dict[str, Any]) -> bool:
        """The copy and its source are not both kept: one went as a duplicate of a pair of the family."""
        for member in (p["id"], p["source"]):
            r = rejected.get(member)
            if r and r["rule"].startswith("duplicate") and family[r["matched"]["id"]] == p["source"]:
                return True
        return False

    dup_rejects = [r for r in rejected.values() if r["rule"].startswith("duplicate")]
    true_dup_rejects = [r for r in dup_rejects if family[r["id"]] == family[r["matched"]["id"]]]
    overlaps = [p for p in pairs if p["kind"] == "overlap"]
    overlap_caught = [
        p
        for p in overlaps
        if rejected.get(p["id"], {}).get("rule") == "eval_overlap"
        and rejected[p["id"]]["matched"]["eval_index"] == p["eval_index"]
    ]
    overlap_rejects = [r for r in rejected.values() if r["rule"] == "eval_overlap"]
    training = read_jsonl(cfg.run_path / "train.jsonl") + read_jsonl(cfg.run_path / "val.jsonl")
    leaked = [r for r in training if by_id[r["id"]]["kind"] == "overlap"]
    sides: dict[str, set[str]] = defaultdict(set)
    for name in ("train", "val"):
        for r in read_jsonl(cfg.run_path / f"{name}.jsonl"):
            sides[r["chunk_id"]].add(name)
    return {
        "near_planted": len(near),
        "near_caught": sum(caught_dup(p) for p in near),
        "near_recall": sum(caught_dup(p) for p in near) / len(near),
        "dedup_rejects": len(dup_rejects),
        "dedup_precision": len(true_dup_rejects) / len(dup_rejects) if dup_rejects else 1.0,
        "overlap_planted": len(overlaps),
        "overlap_caught": len(overlap_caught),
        "overlap_recall": len(overlap_caught) / len(overlaps),
        "overlap_rejects": len(overlap_rejects),
        "overlap_precision": (
            sum(by_id[r["id"]]["kind"] == "overlap" for r in overlap_rejects) / len(overlap_rejects)
            if overlap_rejects
            else 1.0
        ),
        "hard_negatives_flagged": sum(
            rejected.get(p["id"], {}).get("rule") == "eval_overlap" for p in pairs if p["kind"] == "negative"
        ),
        "overlaps_in_train_or_val": len(leaked),
        "chunks_on_both_sides": sum(len(s) > 1 for s in sides.values()),
        "rejected_per_rule": json.loads((cfg.run_path / "curation_report.json").read_text())["rejected"],
    }


def brute_force_seconds(questions: list[str], sample: int, threshold: float) -> tuple[float, float]:
    """Seconds for exact all-pairs Jaccard on `sample` questions, and that extrapolated to all of them."""
    sets = [dedup.shingles(q) for q in questions[:sample]]
    t0 = time.perf_counter()
    found = sum(dedup.jaccard(a, b) >= threshold for a, b in combinations(sets, 2))
    seconds = time.perf_counter() - t0
    del found
    return seconds, seconds * (len(questions) / sample) ** 2


def component_seconds(questions: list[str], near: float) -> dict[str, float]:
    t0 = time.perf_counter()
    sketches = dedup.Sketches(questions)
    t1 = time.perf_counter()
    dedup.near_neighbours(sketches, near)
    t2 = time.perf_counter()
    return {"minhash_sketches": t1 - t0, "lsh_near_neighbours": t2 - t1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--near", type=float, default=0.85)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--brute-sample", type=int, default=2000)
    parser.add_argument("--semantic-sample", type=int, default=0)
    args = parser.parse_args()

    pairs, eval_set, counts = make_pairs(args.n, args.seed)
    with tempfile.TemporaryDirectory(prefix="doctune-bench-curate-") as tmp_name:
        tmp = Path(tmp_name)
        atomic_write_json(tmp / "eval_set.json", eval_set)
        base_s = timed_stage(config(tmp, "baseline", near=None, eval_set=False), pairs)
        full_cfg = config(tmp, "full", near=args.near, eval_set=True)
        full_s = timed_stage(full_cfg, pairs)
        result = quality(full_cfg, pairs)
        questions = [p["question"] for p in pairs]
        parts = component_seconds(questions, args.near)
        brute_sample_s, brute_all_s = brute_force_seconds(questions, args.brute_sample, args.near)
        semantic = None
        if args.semantic_sample:
            sample = pairs[: args.semantic_sample]
            cfg = config(tmp, "semantic", near=args.near, eval_set=True, semantic=0.9)
            sem_s = timed_stage(cfg, sample)
            plain_s = timed_stage(config(tmp, "semantic-off", near=args.near, eval_set=True), sample)
            semantic = {"pairs": len(sample), "seconds": sem_s, "seconds_without_semantic": plain_s}

    rows = [
        ("baseline: rules + exact dedup + split + write", base_s, 1.0),
        ("doctune: + near dedup + contamination guard", full_s, full_s / base_s),
        (
            "  MinHash sketches of every question",
            parts["minhash_sketches"],
            parts["minhash_sketches"] / base_s,
        ),
        (
            "  LSH near neighbours of every question",
            parts["lsh_near_neighbours"],
            parts["lsh_near_neighbours"] / base_s,
        ),
        (f"brute-force Jaccard, {args.brute_sample:,} questions", brute_sample_s, brute_sample_s / base_s),
        (f"brute-force Jaccard, {len(pairs):,} (extrapolated)", brute_all_s, brute_all_s / base_s),
    ]
    if semantic:
        rows.append(
            (
                f"semantic dedup on {semantic['pairs']:,} pairs (MiniLM)",
                semantic["seconds"],
                semantic["seconds"] / base_s,
            )
        )
    print(f"\ndoctune curate, judge off, {len(pairs):,} pairs ({os.cpu_count()} CPUs, shared machine: noisy)")
    print(f"{'what':58} {'seconds':>10} {'x baseline':>11}")
    for what, seconds, ratio in rows:
        print(f"{what:58} {seconds:10.2f} {ratio:11.2f}")
    print()
    print(
        f"near duplicates caught   {result['near_caught']:,}/{result['near_planted']:,} "
        f"({result['near_recall']:.1%}), precision {result['dedup_precision']:.1%} "
        f"of {result['dedup_rejects']:,} duplicate rejections"
    )
    print(
        f"eval overlaps caught     {result['overlap_caught']:,}/{result['overlap_planted']:,} "
        f"({result['overlap_recall']:.1%}), precision {result['overlap_precision']:.1%}; "
        f"hard negatives flagged {result['hard_negatives_flagged']}/{counts['negative']}; "
        f"in train/val: {result['overlaps_in_train_or_val']}"
    )
    print(f"chunks on both sides     {result['chunks_on_both_sides']}")
    targets = {
        "stage_under_60s": full_s < 60,
        "near_recall_at_least_95pct": result["near_recall"] >= 0.95,
        "all_eval_overlaps_caught": result["overlap_caught"] == result["overlap_planted"],
    }
    print("targets: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in targets.items()))
    atomic_write_json(
        RESULTS,
        {
            "args": vars(args),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "note": "shared, noisy"},
            "data": counts,
            "seconds": {
                "baseline": round(base_s, 3),
                "doctune": round(full_s, 3),
                **{k: round(v, 3) for k, v in parts.items()},
                "brute_force_sample": round(brute_sample_s, 3),
                "brute_force_extrapolated": round(brute_all_s, 1),
            },
            "semantic": semantic,
            "quality": result,
            "targets": targets,
        },
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
