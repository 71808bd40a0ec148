"""The eval stage: every candidate answers every eval question; answers are scored against the reference
(key facts stated, ROUGE, token F1, exact match, MiniLM similarity, LLM judge) and, optionally, judged head to head.

eval set + candidates → {run_dir}/eval/results.jsonl (one row per item × candidate), summary.json (means with
95% bootstrap CIs, paired differences, pairwise verdicts, failures), report.md and report.html.

All candidates get the same system prompt (the one used in training: the adapter's doctune_finetune.json,
else curate.system_prompt), the same temperature and max_tokens, and answer in plain text. Every request goes
through the run's cache, so a second run over the same cache sends nothing and writes the same summary.

```python
from doctune.config import load_config
from doctune.evaluate.stage import run
summary = run(load_config("doctune.yaml"))
```
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doctune.config import Config
from doctune.errors import ConfigError, FailureRateError, InputError
from doctune.evalset import EvalItem, load_eval_set
from doctune.evaluate import facts, report, stats
from doctune.evaluate.judge import Judge, PairVerdict, Verdict
from doctune.evaluate.metrics import LEXICAL_METRICS, SIMILARITY
from doctune.evaluate.scoring import Scoring
from doctune.llm.base import LLM, RequestFailed
from doctune.prompts import load_prompts
from doctune.reporting import NullProgress, Progress, Summary
from doctune.runs import RunDir, StageRecord, atomic_write_json, atomic_write_jsonl, atomic_write_text

log = logging.getLogger(__name__)

STAGE = "eval"
CACHE = "cache.sqlite"
EVAL_DIR = "eval"
FINETUNE_INFO = "doctune_finetune.json"
MAX_RAW_CHARS = 500


@dataclass(frozen=True)
class Candidate:
    name: str
    model: str  # name in `models:`
    backend: str
    model_id: str
    adapter: Path | None

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "model_id": self.model_id,
            "adapter": str(self.adapter) if self.adapter else None,
        }


# ------------------------------------------------------------------------------------------ setup


def resolve_candidates(cfg: Config) -> list[Candidate]:
    """The candidates of eval.candidates; an adapter must be a PEFT folder and belongs to an hf model only."""
    if not cfg.eval.candidates:
        raise ConfigError(["eval.candidates: name at least one model to evaluate"], source="config")
    out = []
    for name, cand in cfg.eval.candidates.items():
        mc = cfg.models[cand.model]
        adapter_ref = cand.adapter or mc.adapter
        adapter = None
        if adapter_ref:
            if mc.backend != "hf":
                raise ConfigError(
                    [
                        f"eval.candidates.{name}.adapter: {cand.model!r} is an openai model; a server serves its "
                        "LoRA under its own model name (e.g. vLLM --lora-modules chatbot=...): add that as a "
                        "model in `models:` and drop the adapter"
                    ],
                    source="config",
                )
            adapter = cfg.path(adapter_ref)
            if not (adapter / "adapter_config.json").is_file():
                raise InputError(
                    f"{adapter}: no PEFT adapter here (eval.candidates.{name}.adapter); run `doctune finetune` "
                    "first or remove the adapter from the candidate"
                )
        model_id = cfg.model_source(mc.model) if mc.backend == "hf" else mc.model
        out.append(Candidate(name, cand.model, mc.backend, model_id, adapter))
    return out


def resolve_pair(cfg: Config, names: list[str]) -> tuple[str, str] | None:
    """The two candidates of eval.pairwise (validated), or None."""
    pair = cfg.eval.pairwise
    if pair is None:
        return None
    problems = []
    if len(pair) != 2 or pair[0] == pair[1]:
        problems.append(f"eval.pairwise: {pair!r} must name two different candidates")
    problems += [
        f"eval.pairwise: {p!r} is not a candidate (candidates: {', '.join(names)})"
        for p in pair
        if p not in names
    ]
    if cfg.eval.judge is None:
        problems.append("eval.pairwise: needs a judge (eval.judge is null)")
    if problems:
        raise ConfigError(problems, source="config")
    return pair[0], pair[1]


def training_system_prompt(cfg: Config, candidates: list[Candidate]) -> tuple[str, str]:
    """(system prompt, where it came from): the training one recorded in an adapter folder, else
    curate.system_prompt. Every candidate gets this same prompt."""
    folders = [c.adapter for c in candidates if c.adapter is not None] + [cfg.run_path / "adapter"]
    found: list[tuple[str, Path]] = []
    for folder in dict.fromkeys(folders):
        info = folder / FINETUNE_INFO
        if not info.is_file():
            continue
        try:
            prompt = json.loads(info.read_text(encoding="utf-8")).get("system_prompt")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise InputError(
                f"{info}: not a JSON object; re-run `doctune finetune` to write it again"
            ) from None
        if isinstance(prompt, str):
            found.append((prompt, info))
    if not found:
        return cfg.curate.system_prompt, "curate.system_prompt"
    prompt, source = found[0]
    for other, other_source in found[1:]:
        if other != prompt:
            log.warning(
                "%s has another system prompt than %s; every candidate gets the latter's",
                other_source,
                source,
            )
    return prompt, str(source)


# ------------------------------------------------------------------------------------------ run


@dataclass
class _Run:
    """What the async part needs and fills in."""

    cfg: Config
    items: list[EvalItem]
    candidates: list[Candidate]
    pair: tuple[str, str] | None
    system_prompt: str
    prompts: dict[str, str]
    progress: Progress
    use_cache: bool
    cache_path: Path
    similarity: bool

    def __post_init__(self) -> None:
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.pairs: dict[int, PairVerdict] = {}
        self.tokens: Counter[str] = Counter()
        self.cached = 0
        self.failed = 0


async def _answer(
    run: _Run, llm: LLM, cand: Candidate, item: EvalItem, judge: Judge | None, scoring: Scoring
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "index": item.index,
        "candidate": cand.name,
        "model": cand.model_id,
        "adapter": str(cand.adapter) if cand.adapter else None,
        "question": item.question,
        "reference": item.answer,
        "answer": None,
        "answer_error": None,
        "finish_reason": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "judge": None,  # {"mode", "score", "reason", "error", "raw"} once judged
    }
    messages = [{"role": "system", "content": run.system_prompt}, {"role": "user", "content": item.question}]
    try:
        reply = await llm.chat(
            messages, max_tokens=run.cfg.eval.max_tokens, temperature=run.cfg.eval.temperature
        )
    except RequestFailed as exc:
        row["answer_error"] = exc.reason
        run.failed += 1
        scoring.add(cand.name, item.index, None)
        run.progress.advance(1, failed=run.failed)
        run.rows[(cand.name, item.index)] = row
        return row
    answer = reply.text.strip()
    row.update(
        answer=answer,
        finish_reason=reply.finish_reason,
        prompt_tokens=reply.prompt_tokens,
        completion_tokens=reply.completion_tokens,
    )
    run.tokens["answer_prompt"] += reply.prompt_tokens
    run.tokens["answer_completion"] += reply.completion_tokens
    run.cached += reply.cached
    scoring.add(cand.name, item.index, answer)
    if judge is not None:
        verdict = await judge.grade(item.question, item.answer, answer)
        row["judge"] = _verdict_dict(verdict, run.cfg.eval.judge_mode)
        run.failed += verdict.error is not None
    run.progress.advance(1, failed=run.failed)
    run.rows[(cand.name, item.index)] = row
    return row


def _verdict_dict(verdict: Verdict, mode: str) -> dict[str, Any]:
    raw = verdict.raw[:MAX_RAW_CHARS] if verdict.raw is not None else None
    return {
        "mode": mode,
        "score": verdict.score,
        "reason": verdict.reason,
        "error": verdict.error,
        "raw": raw,
    }


async def _item(
    run: _Run, llms: dict[str, LLM], item: EvalItem, judge: Judge | None, scoring: Scoring
) -> None:
    rows = await asyncio.gather(
        *(_answer(run, llms[c.name], c, item, judge, scoring) for c in run.candidates)
    )
    if run.pair is None or judge is None:
        return
    by_name = {r["candidate"]: r for r in rows}
    a, b = by_name[run.pair[0]], by_name[run.pair[1]]
    if a["answer"] is None or b["answer"] is None:
        verdict = PairVerdict(outcome=None, error="an answer is missing")
    else:
        verdict = await judge.compare(item.question, item.answer, a["answer"], b["answer"])
    run.pairs[item.index] = verdict
    run.failed += verdict.outcome is None
    run.progress.advance(1, failed=run.failed)


async def _evaluate(run: _Run) -> None:
    from doctune.llm.factory import build_llm

    cfg = run.cfg
    llms: dict[str, LLM] = {}
    in_process: list[LLM] = []  # hf backends: slow to load
    scoring = Scoring(
        [i.answer for i in run.items], [c.name for c in run.candidates], similarity=run.similarity
    )
    chart_libs = None
    try:
        for cand in run.candidates:
            adapter = str(cand.adapter) if cand.adapter else None
            llms[cand.name] = build_llm(
                cfg, cand.model, adapter=adapter, use_cache=run.use_cache, cache_path=run.cache_path
            )
            if cand.backend == "hf":
                in_process.append(llms[cand.name])
        judge = None
        if cfg.eval.judge is not None:
            judge_llm = build_llm(cfg, cfg.eval.judge, use_cache=run.use_cache, cache_path=run.cache_path)
            llms["\0judge"] = judge_llm
            judge_in_process = cfg.models[cfg.eval.judge].backend == "hf"
            if judge_in_process:
                in_process.append(judge_llm)
            judge = Judge(judge_llm, run.prompts, cfg.eval.judge_mode, bounded_strings=judge_in_process)
        # servers answer a preflight at once: fail fast on them first; then load the metric models (rouge,
        # MiniLM) and the chart library in the background while in-process models load, one at a time (two
        # hf backends importing transformers at once can fail)
        for llm in [x for x in llms.values() if x not in in_process]:
            await llm.preflight()
        scoring.start()
        chart_libs = asyncio.create_task(asyncio.to_thread(report.import_chart_libs))
        for llm in in_process:
            await llm.preflight()
        total = len(run.items) * len(run.candidates) + (len(run.items) if run.pair and judge else 0)
        run.progress.start("eval", total=total)
        try:
            await asyncio.gather(*(_item(run, llms, item, judge, scoring) for item in run.items))
        finally:
            run.progress.finish()
        metrics = await scoring.results()
        await chart_libs
        if judge is not None:
            run.tokens["judge_prompt"] += judge.tokens["prompt"]
            run.tokens["judge_completion"] += judge.tokens["completion"]
    finally:
        scoring.close()
        if chart_libs is not None:
            await asyncio.gather(chart_libs, return_exceptions=True)
        await asyncio.gather(*(llm.aclose() for llm in llms.values()), return_exceptions=True)
    for key, row in run.rows.items():
        row["metrics"] = dict(metrics.get(key, {}))
        _add_facts(row)
        row["metrics"] = dict(sorted(row["metrics"].items()))
        judge_row = row.get("judge")
        if judge_row and judge_row["score"] is not None:
            row["metrics"][_judge_metric(cfg)] = judge_row["score"]
        verdict = run.pairs.get(row["index"])
        if verdict is not None and row["candidate"] in run.pair:
            row["pairwise"] = _pair_dict(verdict, row["candidate"], run.pair)


def _add_facts(row: dict[str, Any]) -> None:
    """The reference's key facts, those the answer states, and their share (None: the reference has none)."""
    found = facts.key_facts(row["reference"])
    row["facts"] = [f.text for f in found]
    row["facts_hit"] = None
    if row["answer"] is None:
        return
    row["facts_hit"] = facts.facts_hit(found, row["answer"])
    row["metrics"][facts.KEY_FACTS] = len(row["facts_hit"]) / len(found) if found else None


def _key_fact_counts(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """How many items have key facts (the others are left out of the key-fact mean) and how many of the facts
    each candidate stated."""
    per_item = {r["index"]: len(r["facts"]) for r in rows}
    answered = {n: [r for r in rows if r["candidate"] == n and r["facts_hit"] is not None] for n in names}
    return {
        "items_with_facts": sum(1 for n in per_item.values() if n),
        "items_without_facts": sum(1 for n in per_item.values() if not n),
        "facts": sum(per_item.values()),
        "stated": {
            n: {"hit": sum(len(r["facts_hit"]) for r in rs), "of": sum(len(r["facts"]) for r in rs)}
            for n, rs in answered.items()
        },
    }


def _judge_metric(cfg: Config) -> str:
    return "judge_yes" if cfg.eval.judge_mode == "yesno" else "judge_score"


def _pair_dict(verdict: PairVerdict, candidate: str, pair: tuple[str, str]) -> dict[str, Any]:
    """The pairwise verdict from `candidate`'s side."""
    first = candidate == pair[0]
    flip = {"win": "loss", "loss": "win", "tie": "tie", None: None}
    return {
        "against": pair[1] if first else pair[0],
        "outcome": verdict.outcome if first else flip[verdict.outcome],
        "verdict_a_first": verdict.forward,
        "verdict_b_first": verdict.backward,
        "reasons": verdict.reasons,
        "error": verdict.error,
    }


# ------------------------------------------------------------------------------------------ summary


def build_summary(run: _Run, rows: list[dict[str, Any]], eval_path: Path, eval_sha: str, source: str) -> dict:
    cfg = run.cfg
    names = [c.name for c in run.candidates]
    metric_names = [facts.KEY_FACTS, *LEXICAL_METRICS]  # facts first: style alone must not look like a win
    if run.similarity:
        metric_names.append(SIMILARITY)
    if cfg.eval.judge is not None:
        metric_names.append(_judge_metric(cfg))
    judge = None
    if cfg.eval.judge is not None:
        jm = cfg.models[cfg.eval.judge]
        judge = {"model": cfg.eval.judge, "model_id": jm.model, "mode": cfg.eval.judge_mode}
    compared = run.pair or (tuple(names[:2]) if len(names) >= 2 else None)
    failed_answers = [
        {"index": r["index"], "candidate": r["candidate"], "error": r["answer_error"]}
        for r in rows
        if r["answer_error"] is not None
    ]
    missing = [
        {"index": r["index"], "candidate": r["candidate"], "error": r["judge"]["error"]}
        for r in rows
        if r.get("judge") and r["judge"]["error"] is not None
    ]
    judgements = sum(1 for r in rows if r.get("judge"))
    pair_missing = sum(1 for v in run.pairs.values() if v.outcome is None)
    units = len(rows) + judgements + len(run.pairs)
    rate = (len(failed_answers) + len(missing) + pair_missing) / units if units else 0.0
    summary: dict[str, Any] = {
        "eval_set": {"path": str(eval_path), "sha256": eval_sha, "items": len(run.items)},
        "candidates": {c.name: c.describe() for c in run.candidates},
        "system_prompt": run.system_prompt,
        "system_prompt_source": source,
        "decoding": {"temperature": cfg.eval.temperature, "max_tokens": cfg.eval.max_tokens},
        "judge": judge,
        "metric_names": metric_names,
        "metrics": stats.aggregate(rows, names, metric_names),
        "key_facts": _key_fact_counts(rows, names),
        "comparison": None,
        "pairwise": None,
        "failures": {
            "answers": {n: sum(1 for f in failed_answers if f["candidate"] == n) for n in names},
            "answers_total": len(rows),
            "judgements": judgements,
            "missing_judgements": len(missing),
            "rate": round(rate, stats.DIGITS),
            "max_failure_rate": cfg.eval.max_failure_rate,
        },
        "failed_answer_items": failed_answers,
        "missing_judgement_items": missing,
        "bootstrap": {"resamples": stats.RESAMPLES, "seed": stats.SEED, "confidence": stats.CONFIDENCE},
    }
    if compared:
        a, b = compared
        summary["comparison"] = {
            "a": a,
            "b": b,
            "ranking_metric": report.headline_metric(summary),
            "metrics": stats.compare(rows, a, b, metric_names),
        }
        summary["comparison"]["style_without_facts"] = report.style_without_facts(summary)
    if run.pair:
        outcomes = [run.pairs[i.index].outcome for i in run.items if i.index in run.pairs]
        summary["pairwise"] = {"a": run.pair[0], "b": run.pair[1], **stats.pairwise_summary(outcomes)}
    return summary


# ------------------------------------------------------------------------------------------ stage


def run(
    cfg: Config,
    *,
    progress: Progress = NullProgress(),
    use_cache: bool = True,
) -> Summary:
    """Evaluate every candidate of eval.candidates on eval.eval_set; write {run_dir}/eval/. `eval.prompts`
    replaces packaged judge prompts; `eval.similarity: false` skips the MiniLM similarity (its CPU cost is
    comparable to a small model's answers)."""
    # setup: everything that can be wrong fails here, before any request
    eval_path = cfg.path(cfg.eval.eval_set)
    items = load_eval_set(eval_path)
    candidates = resolve_candidates(cfg)
    pair = resolve_pair(cfg, [c.name for c in candidates])
    system_prompt, source = training_system_prompt(cfg, candidates)
    run_dir = RunDir(cfg.run_path)
    out_dir = run_dir.ensure() / EVAL_DIR
    rec = StageRecord(STAGE)
    eval_sha = rec.add_input(eval_path, "eval_set")
    for cand in candidates:
        weights = cand.adapter / "adapter_model.safetensors" if cand.adapter else None
        if weights is not None and weights.is_file():
            rec.add_input(weights, f"adapter:{cand.name}")
    rec.config = cfg.eval.model_dump(mode="json")
    state = _Run(
        cfg=cfg,
        items=items,
        candidates=candidates,
        pair=pair,
        system_prompt=system_prompt,
        prompts=load_prompts("eval", cfg.path(cfg.eval.prompts) if cfg.eval.prompts else None),
        progress=progress,
        use_cache=use_cache,
        cache_path=run_dir / CACHE,
        similarity=cfg.eval.similarity,
    )
    log.info(
        "eval: %d items × %d candidates (%s), judge %s",
        len(items),
        len(candidates),
        ", ".join(c.name for c in candidates),
        cfg.eval.judge or "none",
    )

    # run
    asyncio.run(_evaluate(state))

    # write
    rows = [state.rows[(c.name, i.index)] for i in items for c in candidates]
    summary = build_summary(state, rows, eval_path, eval_sha, source)
    comp = summary["comparison"]
    worst = report.worst_items(rows, comp["a"], comp["b"], comp["ranking_metric"]) if comp else []
    atomic_write_jsonl(out_dir / "results.jsonl", rows)
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "report.md", report.render_markdown(summary, worst))
    page = report.render_html(summary, worst, report.bar_chart(summary), rows)
    atomic_write_text(out_dir / "report.html", page)
    failures = summary["failures"]
    rec.counts = {
        "items": len(items),
        "candidates": len(candidates),
        "failed_answers": sum(failures["answers"].values()),
        "missing_judgements": failures["missing_judgements"],
        "pairwise_missing": summary["pairwise"]["missing"] if summary["pairwise"] else 0,
        "cached_answers": state.cached,
    }
    rec.tokens = dict(state.tokens)
    rec.notes = {"system_prompt_source": source, "failure_rate": failures["rate"]}
    run_dir.record(rec)

    result = Summary(
        title=f"eval: {len(items)} items × {len(candidates)} candidates",
        rows=report.summary_rows(summary),
        outputs=[str(out_dir / n) for n in ("results.jsonl", "summary.json", "report.md", "report.html")],
    )
    if comp and comp["style_without_facts"]:
        result.warnings.append(comp["style_without_facts"])
    if failures["missing_judgements"]:
        result.warnings.append(
            f"{failures['missing_judgements']} of {failures['judgements']} judgements are missing (failed or "
            "unparseable judge replies); see report.md"
        )
    if failures["rate"] > cfg.eval.max_failure_rate:
        raise FailureRateError(
            f"eval: failure rate {failures['rate']:.3f} is above eval.max_failure_rate "
            f"{cfg.eval.max_failure_rate}; everything is written to {out_dir} (see report.md, Failures); "
            "re-run to retry failed requests"
        )
    return result
