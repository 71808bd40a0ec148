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

Precision there is measured against the plants (base questions are drawn so that no two are alike by chance),
and the plants are one-word edits: easy. So the contamination guard is also measured on a LABELLED set of real
English (bench/data/contamination.json, hand-written templates): 90 eval questions about 18 facts of a product,
paraphrases of four kinds (word order, synonyms, added context, question turned into a request) and hard
negatives (other questions on the same topic, the same question about another subject, another fact about the
same subject). Facts of even index are the dev split, odd ones the test split: thresholds are tuned on dev
(the lowest reaching precision 0.99) and reported on test; the defaults are reported on both.

`--semantic-sample N` (default 1000) times the stage with semantic checks (MiniLM embeddings of every
question) on N pairs and extrapolates to --n: whether semantic checks could be on by default.

Targets: the stage under 60 s, >= 95% of planted near duplicates and 100% of planted eval overlaps caught; on
the labelled test split with the defaults, precision >= 0.99 and paraphrase recall >= 0.9.

    .venv/bin/python bench/curate.py [--n 50000] [--near 0.85] [--semantic-sample 1000]

Prints tables and writes bench/results/curate.json. Numbers from a shared machine are noisy.
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
from doctune.curate import contamination, dedup  # noqa: E402
from doctune.curate.stage import run  # noqa: E402
from doctune.evalset import EvalItem  # noqa: E402
from doctune.runs import atomic_write_json, atomic_write_jsonl, read_jsonl  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "curate.json"
LABELLED = ROOT / "bench" / "data" / "contamination.json"
EVAL_SUBJECTS = 5  # of the 10 subjects, each fact is asked about 5 in the eval set
PARAPHRASE_KINDS = ("order", "synonym", "context", "imperative")
TARGET_PRECISION, TARGET_RECALL = 0.99, 0.9
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


# ---------------------------------------------------------------- the labelled contamination set


def labelled_set(seed: int = 0) -> tuple[list[EvalItem], list[dict[str, Any]]]:
    """The eval set and the labelled questions of bench/data/contamination.json.

    Fact f's eval questions ask about subjects S(f) (5 of 10, shifted per fact). Per eval item: 2 paraphrases
    of each kind (label: that item's index) and hard negatives (label None): the fact's 'different' questions
    about the same subject, the same question about 2 subjects outside S(f), and 2 other facts' eval questions
    about the same subject where those are not in the eval set. Facts of even index form the dev split (tune
    here), odd ones the test split (report here)."""
    data = json.loads(LABELLED.read_text(encoding="utf-8"))
    rng = random.Random(seed)
    subjects, facts = data["subjects"], data["facts"]

    def asked(f: int) -> list[int]:
        return [(3 * f + k) % len(subjects) for k in range(EVAL_SUBJECTS)]

    def text(template: str, s: int) -> str:
        name = subjects[s]
        out = template.format(s=name)
        return out[0].upper() + out[1:]

    items: list[EvalItem] = []
    rows: list[dict[str, Any]] = []
    for f, fact in enumerate(facts):
        split = "dev" if f % 2 == 0 else "test"
        for s in asked(f):
            index = len(items)
            items.append(EvalItem(index, text(fact["eval"], s), "An answer."))
            question = text(fact["eval"], s)
            for kind in ("order", "synonym", "imperative"):
                rows += [{"q": text(t, s), "kind": kind, "label": index, "split": split} for t in fact[kind]]
            for prefix in rng.sample(data["context_prefixes"], 2):
                rows.append({"q": f"{prefix} {question}", "kind": "context", "label": index, "split": split})
            rows += [
                {"q": text(t, s), "kind": "different", "label": None, "split": split}
                for t in fact["different"]
            ]
            others = [o for o in range(len(subjects)) if o not in asked(f)]
            for o in rng.sample(others, 2):
                rows.append(
                    {"q": text(fact["eval"], o), "kind": "other subject", "label": None, "split": split}
                )
            other_facts = [g for g in range(len(facts)) if g != f and s not in asked(g)]
            for g in rng.sample(other_facts, 2):
                rows.append(
                    {"q": text(facts[g]["eval"], s), "kind": "other fact", "label": None, "split": split}
                )
    eval_texts = {i.question for i in items}
    rows = [r for r in rows if r["label"] is not None or r["q"] not in eval_texts]
    return items, list({r["q"]: r for r in rows}.values())


def guard_scores(rows: list[dict[str, Any]], matches: dict[int, Any]) -> dict[str, Any]:
    """Precision (flagged questions that are paraphrases of the eval item they matched), recall on the
    paraphrases (caught with their own eval item), recall per kind and the share of negatives flagged."""
    flagged = list(matches)
    right = [i for i in flagged if rows[i]["label"] == matches[i].eval_index]
    positives = [i for i, r in enumerate(rows) if r["label"] is not None]
    negatives = [i for i, r in enumerate(rows) if r["label"] is None]
    per_kind = {}
    for kind in (*PARAPHRASE_KINDS, "different", "other subject", "other fact"):
        members = [i for i, r in enumerate(rows) if r["kind"] == kind]
        hit = [i for i in members if i in matches]
        per_kind[kind] = {"n": len(members), "flagged": len(hit)}
    return {
        "paraphrases": len(positives),
        "negatives": len(negatives),
        "flagged": len(flagged),
        "precision": len(right) / len(flagged) if flagged else 1.0,
        "recall": sum(i in right for i in positives) / len(positives),
        "negatives_flagged": sum(i in matches for i in negatives) / len(negatives),
        "per_kind": per_kind,
    }


def lowest_precise(curve: dict[float, dict[str, Any]]) -> float:
    """The lowest threshold whose precision reaches TARGET_PRECISION (the most recall at that precision); the
    most precise one when none does."""
    good = [t for t, r in curve.items() if r["precision"] >= TARGET_PRECISION]
    return min(good) if good else max(curve, key=lambda t: (curve[t]["precision"], -t))


def labelled_guard(default_semantic: float | None) -> dict[str, Any]:
    """The contamination guard on the labelled set: as configured by default; then with its near threshold
    tuned on dev (the lowest reaching precision >= TARGET_PRECISION), and with a semantic threshold tuned on
    dev on top of that near threshold; both reported on test. Dev curves included."""
    items, rows = labelled_set()
    split = {name: [r for r in rows if r["split"] == name] for name in ("dev", "test")}
    t0 = time.perf_counter()
    vectors = {name: dedup.embed([r["q"] for r in part]) for name, part in split.items()}
    eval_vectors = dedup.embed([i.question for i in items])
    embed_s = time.perf_counter() - t0

    def score(name: str, near: float, semantic: float | None) -> dict[str, Any]:
        texts = [r["q"] for r in split[name]]
        matches = contamination.find_overlaps(
            texts, items, near=near, semantic=semantic, vectors=vectors[name], eval_vectors=eval_vectors
        )
        return guard_scores(split[name], matches)

    default_near = contamination.EVAL_NEAR_JACCARD
    near_curve = {t / 100: score("dev", t / 100, None) for t in range(40, 101, 5)}
    near = lowest_precise(near_curve)
    semantic_curve = {t / 100: score("dev", near, t / 100) for t in range(80, 100)}  # on top of that near
    semantic = lowest_precise(semantic_curve)

    def brief(curve: dict[float, dict[str, Any]]) -> dict[str, Any]:
        return {
            str(t): {k: round(r[k], 4) for k in ("precision", "recall", "negatives_flagged")}
            for t, r in curve.items()
        }

    return {
        "eval_questions": len(items),
        "questions": {name: len(part) for name, part in split.items()},
        "embedding_s": round(embed_s, 2),
        "defaults": {"near": default_near, "semantic": default_semantic},
        "default": {name: score(name, default_near, default_semantic) for name in split},
        "tuned_near": {"near": near, "test": score("test", near, None)},
        "tuned_semantic": {"near": near, "semantic": semantic, "test": score("test", near, semantic)},
        "dev_curve_near": brief(near_curve),
        "dev_curve_semantic": brief(semantic_curve),
    }


def print_labelled(labelled: dict[str, Any]) -> None:
    q = labelled["questions"]
    print(
        f"\ncontamination guard on the labelled set: {labelled['eval_questions']} eval questions, "
        f"{q['dev']} dev / {q['test']} test questions (bench/data/contamination.json)"
    )
    kinds = (*PARAPHRASE_KINDS, "different", "other subject", "other fact")
    print(f"{'setting':44} {'split':5} {'prec':>6} {'recall':>6} " + " ".join(f"{k[:9]:>9}" for k in kinds))
    d = labelled["defaults"]
    settings = [
        (f"defaults (near {d['near']}, semantic {d['semantic']})", "dev", labelled["default"]["dev"]),
        (f"defaults (near {d['near']}, semantic {d['semantic']})", "test", labelled["default"]["test"]),
        (f"near tuned on dev: {labelled['tuned_near']['near']}", "test", labelled["tuned_near"]["test"]),
        (
            f"near {labelled['tuned_semantic']['near']} + semantic tuned: {labelled['tuned_semantic']['semantic']}",
            "test",
            labelled["tuned_semantic"]["test"],
        ),
    ]
    for name, split, r in settings:
        per_kind = " ".join(f"{r['per_kind'][k]['flagged']:>4}/{r['per_kind'][k]['n']:<4}" for k in kinds)
        print(f"{name:44} {split:5} {r['precision']:6.3f} {r['recall']:6.3f} {per_kind}")
    print(
        "(paraphrase kinds: flagged = caught; different/other subject/other fact: flagged = false positives)"
    )


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
    parser.add_argument(
        "--semantic-sample",
        type=int,
        default=1000,
        help="time the stage with semantic checks on this many pairs, extrapolated to --n (0: skip)",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from doctune.config import DedupConfig

    default_semantic = DedupConfig().semantic

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
            dedup.embed(["load the model first"])  # loading is a one-off, not per pair
            cfg = config(tmp, "semantic", near=args.near, eval_set=True, semantic=0.9)
            sem_s = timed_stage(cfg, sample)
            plain_s = timed_stage(config(tmp, "semantic-off", near=args.near, eval_set=True), sample)
            extra_all = (sem_s - plain_s) * len(pairs) / len(sample)
            semantic = {
                "pairs": len(sample),
                "seconds": sem_s,
                "seconds_without_semantic": plain_s,
                "stage_with_semantic_extrapolated_s": full_s + extra_all,
            }
        labelled = labelled_guard(default_semantic)

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
                f"  + semantic checks, {semantic['pairs']:,} pairs (MiniLM)",
                semantic["seconds"],
                semantic["seconds"] / base_s,
            )
        )
        rows.append(
            (
                f"doctune + semantic checks, {len(pairs):,} (extrapolated)",
                semantic["stage_with_semantic_extrapolated_s"],
                semantic["stage_with_semantic_extrapolated_s"] / base_s,
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
    print_labelled(labelled)
    default_test = labelled["default"]["test"]
    targets = [
        ("stage (defaults) on 50,000 pairs under 60 s", f"{full_s:.1f} s", full_s < 60),
        (
            "planted near duplicates caught >= 95%",
            f"{result['near_recall']:.1%}",
            result["near_recall"] >= 0.95,
        ),
        (
            "planted eval overlaps caught: all",
            f"{result['overlap_caught']}/{result['overlap_planted']}",
            result["overlap_caught"] == result["overlap_planted"],
        ),
        (
            f"labelled guard precision >= {TARGET_PRECISION} (defaults, test)",
            f"{default_test['precision']:.3f}",
            default_test["precision"] >= TARGET_PRECISION,
        ),
        (
            f"labelled guard paraphrase recall >= {TARGET_RECALL} (defaults, test)",
            f"{default_test['recall']:.3f}",
            default_test["recall"] >= TARGET_RECALL,
        ),
    ]
    if semantic:
        extrapolated = semantic["stage_with_semantic_extrapolated_s"]
        targets.append(
            ("stage with semantic checks on 50,000 under 60 s", f"{extrapolated:.0f} s", extrapolated < 60)
        )
    print(f"\n{'target':62} {'measured':>10}  verdict")
    for what, measured, met in targets:
        print(f"{what:62} {measured:>10}  {'met' if met else 'NOT met'}")
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
            "labelled_guard": labelled,
            "targets": [{"target": w, "measured": m, "met": ok} for w, m, ok in targets],
            "load_average_after": os.getloadavg(),
        },
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
