"""`doctune curate`: qa_raw.jsonl → qa_curated.jsonl, qa_rejected.jsonl, data.json, train.jsonl, val.jsonl and
curation_report.json.

The checks run cheapest first, so that no judge token is spent on a pair that would be rejected anyway:

0. users' own pairs (`curate.extra_pairs`, extra_pairs.py) join the generated ones, first, so that a user's
   pair wins over a generated copy of it; they pass every step below except the judge (they have no passage
   to be judged against, and are the user's own word) and go to train only;
1. rules (rules.py): empty, placeholder, question_equals_answer, too_short, not_a_question, answer_too_long,
   question_in_answer, repetitive, copied_from_context;
2. `duplicate_exact` of a whole pair (same normalised question *and* answer): the first in the file stays,
   since the copies teach the same thing;
3. `eval_overlap` (contamination.py): the pair's question is an eval question, nearly or (with
   `dedup.semantic`) semantically;
4. the judge (judge.py, `curate.mode`): `judge_error`, `low_score` (score mode), `judge_no` (yesno mode);
5. duplicate questions among the pairs the judge passed, best-scored first (dedup.py): `duplicate_exact`
   (same normalised question, other answer), `duplicate_near` (`dedup.near`), `duplicate_semantic`
   (`dedup.semantic`). These run after the judge because "the best-scored pair stays" needs the scores; the
   price is judge tokens on questions that turn out to be duplicates.
6. the train/val split by source chunk (split.py).

Every rejected pair lands in qa_rejected.jsonl with its rule (and `matched` for duplicates and eval overlaps,
`raw` for judge errors); nothing is dropped silently. Judge answers are cached in cache.sqlite, so a run that
was stopped sends only the requests that never got an answer when it is started again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from doctune.config import Config, CurateConfig, ModelConfig
from doctune.curate import contamination, dedup, extra_pairs, rules
from doctune.curate.judge import Judge, JudgeTally, Verdict, judge_all
from doctune.curate.split import chat_row, chunk_key, val_chunks
from doctune.errors import FailureRateError, InputError
from doctune.evalset import EvalItem, load_eval_set
from doctune.llm.base import LLM
from doctune.prompts import load_prompts
from doctune.reporting import NullProgress, Progress, Summary
from doctune.runs import RunDir, StageRecord, atomic_write_json, atomic_write_jsonl, read_jsonl

log = logging.getLogger(__name__)

STAGE = "curate"
MAX_PROBLEMS_SHOWN = 10
RULE_ORDER = (
    *rules.RULES,
    "duplicate_exact",
    "eval_overlap",
    "judge_error",
    "low_score",
    "judge_no",
    "duplicate_near",
    "duplicate_semantic",
)


class Ledger:
    """Which pairs are still in, and why each of the others was rejected."""

    def __init__(self, pairs: list[dict[str, Any]]):
        self.pairs = pairs
        self.rejected: dict[int, dict[str, Any]] = {}

    def alive(self) -> list[int]:
        return [i for i in range(len(self.pairs)) if i not in self.rejected]

    def reject(self, i: int, rule: str, **extra: Any) -> None:
        self.rejected[i] = {"rule": rule, **extra}

    def reject_duplicates(self, dropped: dict[int, tuple[int, float]], rule: str) -> None:
        for i, (j, sim) in dropped.items():
            kept = self.pairs[j]
            self.reject(i, rule, matched={"id": kept["id"], "question": kept["question"], "similarity": sim})

    def counts(self) -> dict[str, int]:
        tally = Counter(r["rule"] for r in self.rejected.values())
        return {rule: tally[rule] for rule in RULE_ORDER if tally[rule]}


def load_pairs(path: Path) -> list[dict[str, Any]]:
    """qa_raw.jsonl rows; a row without an id gets one from its line, so rejects can name what they match."""
    rows = read_jsonl(path)
    if not rows:
        raise InputError(f"{path}: no pairs to curate (run `doctune generate` first, or check its failures)")
    for n, row in enumerate(rows, 1):
        if row.get("id") in (None, ""):
            row["id"] = f"{path.name}:{n}"
    return rows


def _is_user(pair: dict[str, Any]) -> bool:
    return pair.get("source") == extra_pairs.SOURCE


def _best_first(keys: Sequence[int], scores: Sequence[int | None], pairs: list[dict[str, Any]]) -> list[int]:
    """Which of several duplicates stays: a user's pair, then the best-scored, then the earliest."""
    return sorted(dedup.best_first(keys, scores), key=lambda i: not _is_user(pairs[i]))


def _read_extra_pairs(cfg: Config, record: StageRecord) -> list[extra_pairs.UserPairs]:
    """Every file of `curate.extra_pairs`, read before any work (a missing or unreadable file stops here)."""
    files = [(name, cfg.path(name)) for name in extra_pairs.configured(cfg.curate.extra_pairs)]
    extra_pairs.check_files(files)
    found = [extra_pairs.read(name, path) for name, path in files]
    for user in found:
        record.add_input(user.path, f"extra_pairs:{user.name}")
        for problem in user.problems:
            log.warning("curate.extra_pairs: %s", problem)
        log.info("%s: %d pair(s) of your own", user.name, len(user.pairs))
    return found


def _subset(keys: Sequence[int], found: dedup.Neighbours) -> dedup.Neighbours:
    """Neighbours found on a subset (local indices) mapped back to pair indices."""
    return {keys[i]: [(keys[j], sim) for j, sim in hits] for i, hits in found.items()}


def _embeddings(questions: list[str], keys: list[int]) -> np.ndarray:
    """One unit row per question; rows of questions outside `keys` stay zero (they are never compared)."""
    found = dedup.embed([questions[i] for i in keys])
    vectors = np.zeros((len(questions), found.shape[1]), dtype=np.float32)
    vectors[keys] = found
    return vectors


def _judge_pairs(
    cfg: Config,
    ledger: Ledger,
    prompts: dict[str, str],
    progress: Progress,
    tally: JudgeTally,
    *,
    llm: LLM | None,
    use_cache: bool,
) -> dict[int, Verdict]:
    """Ask the judge about every pair still in; reject judge errors and pairs that did not pass."""
    cur = cfg.curate
    model = cfg.model(cur.model)
    if llm is None:
        from doctune.llm.factory import build_llm

        llm = build_llm(cfg, cur.model, use_cache=use_cache, cache_path=cfg.run_folder.cache)
    judge = Judge(
        llm,
        mode=cur.mode,
        threshold=cur.threshold,
        prompts=prompts,
        language=cfg.generate.language,
        bounded_strings=model.backend == "hf",
    )
    keys = [i for i in ledger.alive() if not _is_user(ledger.pairs[i])]
    log.info("judging %d pairs with %s (%s mode)", len(keys), llm.name, cur.mode)
    results = asyncio.run(_judge(judge, [ledger.pairs[i] for i in keys], progress, tally))
    verdicts = dict(zip(keys, results, strict=True))
    for i, verdict in verdicts.items():
        if verdict.passed is None:
            ledger.reject(i, "judge_error", error=verdict.error, raw=verdict.raw)
        elif not verdict.passed:
            ledger.reject(i, "low_score" if cur.mode == "score" else "judge_no")
    return verdicts


async def _judge(
    judge: Judge, pairs: list[dict[str, Any]], progress: Progress, tally: JudgeTally
) -> list[Verdict]:
    try:
        await judge.llm.preflight()
        progress.start("curate: judge", total=len(pairs))
        return await judge_all(judge, pairs, progress=progress, tally=tally)
    finally:
        progress.finish()
        await judge.llm.aclose()


def _before_judge(
    ledger: Ledger, questions: list[str], cfg: Config, eval_items: list[EvalItem]
) -> tuple[dict[int, contamination.EvalMatch], np.ndarray | None]:
    """Rules, copies of a whole pair, eval overlaps. Returns the overlaps and, when semantic checks are on,
    the question embeddings (reused by semantic dedup)."""
    cur = cfg.curate
    for i, pair in enumerate(ledger.pairs):
        rule = rules.check(pair, max_answer_chars=cur.max_answer_chars)
        if rule is not None:
            ledger.reject(i, rule)
    alive = ledger.alive()
    whole = {
        i: f"{rules.normalize_question(questions[i])}\n{rules.normalize(ledger.pairs[i]['answer'])}"
        for i in alive
    }
    ledger.reject_duplicates(dedup.exact_duplicates(whole, alive, key=str), "duplicate_exact")
    vectors = eval_vectors = None
    if cur.dedup.semantic is not None:
        vectors = _embeddings(questions, ledger.alive())
        eval_vectors = dedup.embed([e.question for e in eval_items])
    overlaps = contamination.find_overlaps(
        questions,
        eval_items,
        keys=ledger.alive(),
        semantic=cur.dedup.semantic,
        vectors=vectors,
        eval_vectors=eval_vectors,
    )
    for i, match in overlaps.items():
        ledger.reject(i, "eval_overlap", matched=match.as_dict())
    return overlaps, vectors


def _dedup_questions(
    ledger: Ledger, questions: list[str], scores: list[int | None], cfg: Config, vectors: np.ndarray | None
) -> None:
    """Exact, near and semantic duplicate questions among the pairs still in; the best-scored stays."""
    dedup_cfg = cfg.curate.dedup
    pairs = ledger.pairs
    order = _best_first(ledger.alive(), scores, pairs)
    ledger.reject_duplicates(dedup.exact_duplicates(questions, order), "duplicate_exact")
    if dedup_cfg.near is not None:
        keys = ledger.alive()
        found = dedup.near_neighbours(dedup.Sketches([questions[i] for i in keys]), dedup_cfg.near)
        order = _best_first(keys, scores, pairs)
        ledger.reject_duplicates(dedup.keep_best(order, _subset(keys, found)), "duplicate_near")
    if dedup_cfg.semantic is not None and vectors is not None:
        keys = ledger.alive()
        found = dedup.semantic_neighbours(vectors, dedup_cfg.semantic, keys=keys)
        order = _best_first(keys, scores, pairs)
        ledger.reject_duplicates(dedup.keep_best(order, found), "duplicate_semantic")


@dataclass
class Inputs:
    """What curate reads, all of it before any work: the pairs (users' own first), the eval set, the prompts."""

    pairs: list[dict[str, Any]]
    users: list[extra_pairs.UserPairs]
    eval_items: list[EvalItem]
    prompts: dict[str, str]
    judge_model: ModelConfig | None
    record: StageRecord


@dataclass
class Curation:
    """What the checks decided: the ledger of rejections, eval overlaps, verdicts and the judge's totals."""

    ledger: Ledger
    questions: list[str]
    overlaps: dict[int, contamination.EvalMatch]
    verdicts: dict[int, Verdict]
    tally: JudgeTally

    @property
    def pairs(self) -> list[dict[str, Any]]:
        return self.ledger.pairs


@dataclass
class Split:
    """The kept pairs and the side each goes to; `in_val`: the chunks held out for validation."""

    kept: list[int]
    in_val: set[str]
    side: dict[int, str]


@dataclass
class Rows:
    """The rows of the five data files."""

    curated: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]


def run(
    cfg: Config, *, progress: Progress = NullProgress(), llm: LLM | None = None, use_cache: bool = True
) -> Summary:
    """Curate qa_raw.jsonl into training data: rules, contamination guard, judge (`curate.model`), dedup,
    train/val split by chunk. Writes six files and the manifest entry; raises FailureRateError (after
    writing) when more judge requests failed than `curate.max_failure_rate` allows. `llm` replaces the
    configured judge (tests, library use); `use_cache=False` bypasses cache.sqlite."""
    run_dir = cfg.run_folder
    inputs = _load_inputs(cfg, run_dir)
    t0 = time.perf_counter()
    curation = _check_pairs(cfg, inputs, progress, llm=llm, use_cache=use_cache)
    split = _split(cfg.curate, curation)
    seconds = time.perf_counter() - t0
    rows = _rows(cfg.curate, curation, split)
    _write_data(run_dir, rows)
    report = _report(cfg, inputs, curation, split, rows, seconds)
    atomic_write_json(run_dir.curation_report, report)
    _record(run_dir, inputs.record, report, curation)
    summary = _summary(run_dir, report)
    _check_failure_rate(cfg.curate, curation.tally, run_dir)
    return summary


# ---- setup


def _load_inputs(cfg: Config, run_dir: RunDir) -> Inputs:
    """qa_raw.jsonl, users' own pairs, the eval set and the prompts, each recorded as an input."""
    cur = cfg.curate
    generated = load_pairs(run_dir.qa_raw)
    eval_items: list[EvalItem] = load_eval_set(cfg.path(cur.eval_set)) if cur.eval_set else []
    prompts = load_prompts(STAGE, cfg.path(cur.prompts) if cur.prompts else None)
    judge_model = cfg.model(cur.model) if cur.mode != "off" else None
    record = StageRecord(
        STAGE,
        config={"curate": cur.model_dump(), "judge": judge_model.model_dump() if judge_model else None},
    )
    record.add_input(run_dir.qa_raw, run_dir.qa_raw.name)
    users = _read_extra_pairs(cfg, record)
    if cur.eval_set:
        record.add_input(cfg.path(cur.eval_set), "eval_set")
    if cur.prompts:
        record.add_input(cfg.path(cur.prompts), "prompts")
    pairs = [p for user in users for p in user.pairs] + generated
    return Inputs(pairs, users, eval_items, prompts, judge_model, record)


# ---- work


def _check_pairs(
    cfg: Config, inputs: Inputs, progress: Progress, *, llm: LLM | None, use_cache: bool
) -> Curation:
    """Steps 1-5 of the module doc: rules, whole-pair copies and eval overlaps, the judge, duplicate questions."""
    cur = cfg.curate
    ledger = Ledger(inputs.pairs)
    questions = [rules.text_of(p, "question") for p in inputs.pairs]
    # 1-3: rules, whole-pair copies, eval overlap: before the judge, free of tokens
    overlaps, vectors = _before_judge(ledger, questions, cfg, inputs.eval_items)
    log.info(
        "%d pairs: %d rejected by rules, duplicate copies or eval overlap (%d) before the judge",
        len(inputs.pairs),
        len(ledger.rejected),
        len(overlaps),
    )
    # 4: the judge
    tally = JudgeTally()
    verdicts: dict[int, Verdict] = {}
    if cur.mode != "off" and ledger.alive():
        verdicts = _judge_pairs(cfg, ledger, inputs.prompts, progress, tally, llm=llm, use_cache=use_cache)
    # 5: duplicate questions among what passed, best-scored first
    scores = [verdicts[i].score if i in verdicts else None for i in range(len(inputs.pairs))]
    _dedup_questions(ledger, questions, scores, cfg, vectors)
    return Curation(ledger, questions, overlaps, verdicts, tally)


def _split(cur: CurateConfig, curation: Curation) -> Split:
    """Step 6: the kept pairs to train or val by source chunk; users' own pairs always to train."""
    pairs = curation.pairs
    kept = curation.ledger.alive()
    log.info("%d of %d pairs kept", len(kept), len(pairs))
    in_val = val_chunks(
        (chunk_key(pairs[i]) for i in kept if not _is_user(pairs[i])), cur.val_fraction, cur.seed
    )
    side = {i: "val" if chunk_key(pairs[i]) in in_val else "train" for i in kept}
    return Split(kept, in_val, side)


# ---- write


def _rows(cur: CurateConfig, curation: Curation, split: Split) -> Rows:
    """Curated and rejected pairs with the judge's score and reason; train and val as chat rows."""
    pairs, verdicts, rejected = curation.pairs, curation.verdicts, curation.ledger.rejected

    def annotated(i: int) -> dict[str, Any]:
        verdict = verdicts.get(i)
        return {
            **pairs[i],
            "score": verdict.score if verdict else None,
            "reason": verdict.reason if verdict else None,
        }

    def chats(side: str) -> list[dict[str, Any]]:
        return [chat_row(pairs[i], cur.system_prompt) for i in split.kept if split.side[i] == side]

    return Rows(
        curated=[{**annotated(i), "split": split.side[i]} for i in split.kept],
        rejected=[{**annotated(i), **rejected[i]} for i in sorted(rejected)],
        train=chats("train"),
        val=chats("val"),
    )


def _write_data(run_dir: RunDir, rows: Rows) -> None:
    """qa_curated.jsonl, qa_rejected.jsonl, the seed's data.json, train.jsonl and val.jsonl."""
    atomic_write_jsonl(run_dir.qa_curated, rows.curated)
    atomic_write_jsonl(run_dir.qa_rejected, rows.rejected)
    atomic_write_json(run_dir.data_json, [_seed_row(p) for p in rows.curated])
    atomic_write_jsonl(run_dir.train, rows.train)
    atomic_write_jsonl(run_dir.val, rows.val)


def _seed_row(pair: dict[str, Any]) -> dict[str, str]:
    """A pair as the seed recipe's data.json holds it."""
    return {
        "Question": pair["question"].strip(),
        "Answer": pair["answer"].strip(),
        "Context": pair.get("context") or "",
    }


def _report(
    cfg: Config, inputs: Inputs, curation: Curation, split: Split, rows: Rows, seconds: float
) -> dict[str, Any]:
    """curation_report.json: counts per rule and per source, the split, the judge, dedup and contamination."""
    cur = cfg.curate
    pairs, tally, overlaps = curation.pairs, curation.tally, curation.overlaps
    return {
        "pairs_in": len(pairs),
        "rejected": curation.ledger.counts(),
        "kept": len(split.kept),
        "sources": _by_source(curation.ledger, inputs.users),
        "train": {
            "pairs": len(rows.train),
            "chunks": len({chunk_key(pairs[i]) for i in split.kept}) - len(split.in_val),
        },
        "val": {"pairs": len(rows.val), "chunks": len(split.in_val)},
        "judge": {
            "mode": cur.mode,
            "model": inputs.judge_model.model if inputs.judge_model else None,
            "threshold": cur.threshold if cur.mode == "score" else None,
            "requests": tally.requests,
            "cached": tally.cached,
            "errors": tally.errors,
            "histogram": _histogram(cur.mode, curation.verdicts.values()),
        },
        "tokens": tally.tokens(),
        "dedup": {"near": cur.dedup.near, "semantic": cur.dedup.semantic},
        "contamination": {
            "eval_set": str(cfg.path(cur.eval_set)) if cur.eval_set else None,
            "eval_questions": len(inputs.eval_items),
            "near": contamination.EVAL_NEAR_JACCARD,
            "semantic": cur.dedup.semantic,
            "overlaps": [
                {"id": pairs[i]["id"], "question": curation.questions[i], **overlaps[i].as_dict()}
                for i in sorted(overlaps)
            ],
        },
        "seconds": round(seconds, 3),
    }


def _record(run_dir: RunDir, record: StageRecord, report: dict[str, Any], curation: Curation) -> None:
    """The stage's entry in manifest.json."""
    tally = curation.tally
    record.counts = {
        "pairs_in": report["pairs_in"],
        "kept": report["kept"],
        "train": report["train"]["pairs"],
        "val": report["val"]["pairs"],
        "rejected": report["rejected"],
        "generated_kept_share": report["sources"]["generated"]["kept_share"],
        "user_pairs": report["sources"][extra_pairs.SOURCE]["pairs"],
        "judge_requests": tally.requests,
        "judge_cached": tally.cached,
        "judge_errors": tally.errors,
    }
    record.tokens = tally.tokens()
    record.notes = {"score_histogram": report["judge"]["histogram"], "eval_overlaps": len(curation.overlaps)}
    run_dir.record(record)


def _check_failure_rate(cur: CurateConfig, tally: JudgeTally, run_dir: RunDir) -> None:
    """FailureRateError when more judge requests failed than `curate.max_failure_rate` allows."""
    rate = tally.errors / tally.requests if tally.requests else 0.0
    if rate > cur.max_failure_rate:
        raise FailureRateError(
            f"{tally.errors} of {tally.requests} judge requests failed ({rate:.0%} > curate.max_failure_rate "
            f"{cur.max_failure_rate:.0%}): see the rows with rule judge_error in {run_dir.qa_rejected}; fix the "
            "cause and run again (answered requests come from the cache)"
        )


def _by_source(ledger: Ledger, users: list[extra_pairs.UserPairs]) -> dict[str, Any]:
    """Pairs in, kept, share kept and rejections per rule, for generated pairs and for users' own."""
    out: dict[str, Any] = {}
    for source in ("generated", extra_pairs.SOURCE):
        keys = [i for i, p in enumerate(ledger.pairs) if _is_user(p) == (source == extra_pairs.SOURCE)]
        tally = Counter(ledger.rejected[i]["rule"] for i in keys if i in ledger.rejected)
        kept = len(keys) - sum(tally.values())
        out[source] = {
            "pairs": len(keys),
            "kept": kept,
            "kept_share": round(kept / len(keys), 4) if keys else None,
            "rejected": {rule: tally[rule] for rule in RULE_ORDER if tally[rule]},
        }
    out[extra_pairs.SOURCE]["files"] = [
        {"file": u.name, "pairs": len(u.pairs), "problems": u.problems} for u in users
    ]
    return out


def _histogram(mode: str, verdicts: Any) -> dict[str, int]:
    if mode == "score":
        tally = Counter(v.score for v in verdicts if v.score is not None)
        return {str(s): tally[s] for s in range(1, 6)}
    if mode == "yesno":
        tally = Counter(v.passed for v in verdicts if v.passed is not None)
        return {"YES": tally[True], "NO": tally[False]}
    return {}


def _summary(run_dir: RunDir, report: dict[str, Any]) -> Summary:
    summary = Summary("curate")
    summary.add("pairs in", report["pairs_in"])
    for rule, n in report["rejected"].items():
        summary.add(f"  rejected: {rule}", n)
    summary.add("kept", report["kept"])
    for source, label in (("generated", "generated pairs kept"), (extra_pairs.SOURCE, "your own pairs kept")):
        part = report["sources"][source]
        if part["pairs"]:
            summary.add(label, f"{part['kept']:,} of {part['pairs']:,} ({part['kept_share']:.0%})")
    summary.add("train pairs (chunks)", f"{report['train']['pairs']:,} ({report['train']['chunks']:,})")
    summary.add("val pairs (chunks)", f"{report['val']['pairs']:,} ({report['val']['chunks']:,})")
    judge = report["judge"]
    if judge["mode"] != "off":
        for label, n in judge["histogram"].items():
            summary.add(f"  {'score ' if judge['mode'] == 'score' else ''}{label}", n)
        summary.add("judge requests", judge["requests"])
        summary.add("  answered from cache", judge["cached"])
        summary.add("prompt tokens", report["tokens"]["prompt"])
        summary.add("completion tokens", report["tokens"]["completion"])
    outputs = (run_dir.qa_curated, run_dir.qa_rejected, run_dir.data_json, run_dir.train, run_dir.val)
    summary.outputs = [str(path) for path in (*outputs, run_dir.curation_report)]
    overlaps = report["contamination"]["overlaps"]
    if overlaps:
        summary.warnings.append(
            f"{len(overlaps)} pair(s) matched eval questions and were left out: see {run_dir.curation_report}"
        )
    for user in report["sources"][extra_pairs.SOURCE]["files"]:
        for problem in user["problems"][:MAX_PROBLEMS_SHOWN]:
            summary.warnings.append(f"curate.extra_pairs: {problem}")
        if len(user["problems"]) > MAX_PROBLEMS_SHOWN:
            more = len(user["problems"]) - MAX_PROBLEMS_SHOWN
            summary.warnings.append(
                f"{user['file']}: {more} more row(s) skipped: see {run_dir.curation_report}"
            )
    if judge["errors"]:
        summary.warnings.append(
            f"{judge['errors']} pair(s) got no usable verdict (rule judge_error, raw replies kept in "
            f"{run_dir.qa_rejected})"
        )
    if report["kept"] == 0:
        summary.warnings.append("no pair was kept: train.jsonl is empty (see the rules in the report)")
    return summary
