"""The eval stage: every candidate answers every eval question; answers are scored against the reference
(key facts stated, ROUGE, token F1, exact match, MiniLM similarity, LLM judge) and, optionally, judged head to head.

eval set + candidates → {run_dir}/eval/results.jsonl (one row per item × candidate), summary.json (means with
95% bootstrap CIs, paired differences, pairwise verdicts, failures), report.md and report.html.

All candidates get the same system prompt (the one used in training: the adapter's doctune_finetune.json,
else curate.system_prompt), the same temperature and max_tokens, and answer in plain text. Every request goes
through the run's cache, so a second run over the same cache sends nothing and writes the same summary.

`run` reads as setup (`prepare`: an `EvalPlan`, everything checked before any request), work (`_evaluate`:
the models answer, the judge grades, into an `EvalOutcome`) and write (`_write_outputs`, `_record`,
`_stage_summary`).

```python
from doctune.config import load_config
from doctune.evaluate.stage import run
summary = run(load_config("doctune.yaml"))
```
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from doctune.adapters import AdapterDir
from doctune.config import Config
from doctune.errors import ConfigError, FailureRateError, InputError
from doctune.evalset import EvalItem, load_eval_set
from doctune.evaluate import facts, report, stats
from doctune.evaluate.embedding_store import EmbeddingStore
from doctune.evaluate.judge import Judge, PairVerdict, Verdict
from doctune.evaluate.metrics import LEXICAL_METRICS, SIMILARITY, Embedder
from doctune.evaluate.scoring import Scoring
from doctune.llm import gather
from doctune.llm.base import LLM, RequestFailed, Usage
from doctune.prompts import load_prompts
from doctune.reporting import NullProgress, Progress, Summary
from doctune.runs import StageRecord, atomic_write_json, atomic_write_jsonl, atomic_write_text

log = logging.getLogger(__name__)

STAGE = "eval"
MAX_RAW_CHARS = 500


@dataclass(frozen=True)
class Candidate:
    name: str
    model: str  # name in `models:`
    backend: str
    model_id: str
    adapter: AdapterDir | None

    @property
    def adapter_path(self) -> str | None:
        return str(self.adapter.path) if self.adapter else None

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "model_id": self.model_id,
            "adapter": self.adapter_path,
        }


@dataclass(frozen=True)
class EvalPlan:
    """What one eval asks and of whom, every part checked (setup's result; the work and the writing read it)."""

    cfg: Config
    eval_path: Path
    eval_sha: str
    items: list[EvalItem]
    candidates: list[Candidate]
    pair: tuple[str, str] | None  # eval.pairwise
    system_prompt: str
    system_prompt_source: str
    prompts: dict[str, str]  # the judge's
    use_cache: bool = True

    @property
    def similarity(self) -> bool:
        return self.cfg.eval.similarity

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.candidates]


@dataclass
class EvalOutcome:
    """What the work produces: a row per (candidate, item), the pairwise verdicts, tokens and failures."""

    rows: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    pairs: dict[int, PairVerdict] = field(default_factory=dict)
    answer_usage: Usage = field(default_factory=Usage)
    judge_usage: Usage = field(default_factory=Usage)
    failed: int = 0

    def ordered_rows(self, plan: EvalPlan) -> list[dict[str, Any]]:
        """results.jsonl's order: item by item, candidates in the config's order."""
        return [self.rows[(c.name, i.index)] for i in plan.items for c in plan.candidates]


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
            adapter = AdapterDir(cfg.path(adapter_ref))
            if not adapter.exists():
                raise InputError(
                    f"{adapter.path}: no PEFT adapter here (eval.candidates.{name}.adapter); run `doctune "
                    "finetune` first or remove the adapter from the candidate"
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
    """(system prompt, where it came from): the training one recorded in an adapter folder (the candidates',
    then the run's), else curate.system_prompt. Every candidate gets this same prompt."""
    folders = [c.adapter for c in candidates if c.adapter is not None] + [cfg.run_folder.adapter]
    found: list[tuple[str, Path]] = []
    for folder in {f.path: f for f in folders}.values():
        prompt = folder.system_prompt()
        if prompt is not None:
            found.append((prompt, folder.info_file))
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


def prepare(cfg: Config, record: StageRecord, *, use_cache: bool = True) -> EvalPlan:
    """Setup: everything that can be wrong fails here, before any request. Records the inputs in `record`."""
    eval_path = cfg.path(cfg.eval.eval_set)
    items = load_eval_set(eval_path)
    candidates = resolve_candidates(cfg)
    pair = resolve_pair(cfg, [c.name for c in candidates])
    system_prompt, source = training_system_prompt(cfg, candidates)
    prompts = load_prompts("eval", cfg.path(cfg.eval.prompts) if cfg.eval.prompts else None)
    cfg.run_folder.ensure()
    eval_sha = record.add_input(eval_path, "eval_set")
    for cand in candidates:
        if cand.adapter is not None and cand.adapter.weights.is_file():
            record.add_input(cand.adapter.weights, f"adapter:{cand.name}")
    record.config = cfg.eval.model_dump(mode="json")
    return EvalPlan(
        cfg=cfg,
        eval_path=eval_path,
        eval_sha=eval_sha,
        items=items,
        candidates=candidates,
        pair=pair,
        system_prompt=system_prompt,
        system_prompt_source=source,
        prompts=prompts,
        use_cache=use_cache,
    )


# ------------------------------------------------------------------------------------------ work


@dataclass
class EvalModels:
    """The LLMs of one eval: one per candidate, and the judge's when there is one."""

    candidates: dict[str, LLM] = field(default_factory=dict)
    judge: LLM | None = None
    in_process: list[LLM] = field(default_factory=list)  # hf backends: slow to load

    def all(self) -> list[LLM]:
        return [*self.candidates.values(), *([self.judge] if self.judge is not None else [])]

    def servers(self) -> list[LLM]:
        return [llm for llm in self.all() if llm not in self.in_process]

    async def aclose(self) -> None:
        await asyncio.gather(*(llm.aclose() for llm in self.all()), return_exceptions=True)


def _build_models(plan: EvalPlan, models: EvalModels) -> Judge | None:
    """Fill `models` (filled as it goes, so whatever was built is closed if a later one fails); the judge."""
    from doctune.llm.factory import build_llm

    cfg, cache = plan.cfg, plan.cfg.run_folder.cache
    for cand in plan.candidates:
        llm = build_llm(
            cfg, cand.model, adapter=cand.adapter_path, use_cache=plan.use_cache, cache_path=cache
        )
        models.candidates[cand.name] = llm
        if cand.backend == "hf":
            models.in_process.append(llm)
    if cfg.eval.judge is None:
        return None
    models.judge = build_llm(cfg, cfg.eval.judge, use_cache=plan.use_cache, cache_path=cache)
    judge_in_process = cfg.models[cfg.eval.judge].backend == "hf"
    if judge_in_process:
        models.in_process.append(models.judge)
    return Judge(models.judge, plan.prompts, cfg.eval.judge_mode, bounded_strings=judge_in_process)


class _Answering:
    """The async work over the items: each candidate answers, the judge grades, and the pair is compared."""

    def __init__(
        self,
        plan: EvalPlan,
        models: EvalModels,
        judge: Judge | None,
        scoring: Scoring,
        progress: Progress,
        outcome: EvalOutcome,
    ):
        self.plan = plan
        self.models = models
        self.judge = judge
        self.scoring = scoring
        self.progress = progress
        self.outcome = outcome

    def total(self) -> int:
        """Progress units: every answer, and every pairwise comparison."""
        plan = self.plan
        pairwise = len(plan.items) if plan.pair and self.judge else 0
        return len(plan.items) * len(plan.candidates) + pairwise

    async def all_items(self) -> None:
        await gather.ordered(self.item, self.plan.items)  # an error or Ctrl-C cancels the other items

    async def item(self, item: EvalItem) -> None:
        rows = await asyncio.gather(*(self.answer(c, item) for c in self.plan.candidates))
        pair, judge = self.plan.pair, self.judge
        if pair is None or judge is None:
            return
        by_name = {r["candidate"]: r for r in rows}
        a, b = by_name[pair[0]], by_name[pair[1]]
        if a["answer"] is None or b["answer"] is None:
            verdict = PairVerdict(outcome=None, error="an answer is missing")
        else:
            verdict = await judge.compare(item.question, item.answer, a["answer"], b["answer"])
        self.outcome.pairs[item.index] = verdict
        self._advance(failed=verdict.outcome is None)

    async def answer(self, cand: Candidate, item: EvalItem) -> dict[str, Any]:
        plan, outcome = self.plan, self.outcome
        row = _empty_row(cand, item)
        outcome.rows[(cand.name, item.index)] = row
        messages = [
            {"role": "system", "content": plan.system_prompt},
            {"role": "user", "content": item.question},
        ]
        try:
            reply = await self.models.candidates[cand.name].chat(
                messages, max_tokens=plan.cfg.eval.max_tokens, temperature=plan.cfg.eval.temperature
            )
        except RequestFailed as exc:
            row["answer_error"] = exc.reason
            self.scoring.add(cand.name, item.index, None)
            self._advance(failed=True)
            return row
        answer = reply.text.strip()
        row.update(
            answer=answer,
            finish_reason=reply.finish_reason,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
        )
        outcome.answer_usage.add_reply(reply)
        self.scoring.add(cand.name, item.index, answer)
        failed = False
        if self.judge is not None:
            verdict = await self.judge.grade(item.question, item.answer, answer)
            row["judge"] = _verdict_dict(verdict, plan.cfg.eval.judge_mode)
            failed = verdict.error is not None
        self._advance(failed=failed)
        return row

    def _advance(self, *, failed: bool) -> None:
        self.outcome.failed += failed
        self.progress.advance(1, failed=self.outcome.failed)


def _empty_row(cand: Candidate, item: EvalItem) -> dict[str, Any]:
    """A results.jsonl row before the candidate answers."""
    return {
        "index": item.index,
        "candidate": cand.name,
        "model": cand.model_id,
        "adapter": cand.adapter_path,
        "question": item.question,
        "reference": item.answer,
        "answer": None,
        "answer_error": None,
        "finish_reason": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "judge": None,  # {"mode", "score", "reason", "error", "raw"} once judged
    }


def _verdict_dict(verdict: Verdict, mode: str) -> dict[str, Any]:
    raw = verdict.raw[:MAX_RAW_CHARS] if verdict.raw is not None else None
    return {
        "mode": mode,
        "score": verdict.score,
        "reason": verdict.reason,
        "error": verdict.error,
        "raw": raw,
    }


async def _evaluate(plan: EvalPlan, progress: Progress) -> EvalOutcome:
    """Work: load the models, answer and judge every item, score the answers; rows complete with metrics."""
    outcome = EvalOutcome()
    models = EvalModels()
    store = EmbeddingStore(plan.cfg.run_folder.eval_embeddings)  # a re-run embeds only texts it has not seen
    scoring = Scoring(
        [i.answer for i in plan.items], plan.names, embedder=Embedder(store=store), similarity=plan.similarity
    )
    chart_libs = None
    try:
        judge = _build_models(plan, models)
        # servers answer a preflight at once: fail fast on them first; then load the metric models (rouge,
        # MiniLM) and the chart library in the background while in-process models load, one at a time (two
        # hf backends importing transformers at once can fail)
        for llm in models.servers():
            await llm.preflight()
        scoring.start()
        chart_libs = asyncio.create_task(asyncio.to_thread(report.import_chart_libs))
        for llm in models.in_process:
            await llm.preflight()
        answering = _Answering(plan, models, judge, scoring, progress, outcome)
        progress.start("eval", total=answering.total())
        try:
            await answering.all_items()
        finally:
            progress.finish()
        metrics = await scoring.results()
        await chart_libs
        if judge is not None:
            outcome.judge_usage = judge.usage
    finally:
        scoring.close()
        if chart_libs is not None:
            await asyncio.gather(chart_libs, return_exceptions=True)
        await models.aclose()
    _complete_rows(plan, outcome, metrics)
    return outcome


def _complete_rows(plan: EvalPlan, outcome: EvalOutcome, metrics: dict[tuple[str, int], Any]) -> None:
    """Each row gets its reference metrics, key facts, judge score and pairwise verdict."""
    for key, row in outcome.rows.items():
        row["metrics"] = dict(metrics.get(key, {}))
        _add_facts(row)
        row["metrics"] = dict(sorted(row["metrics"].items()))
        judge_row = row.get("judge")
        if judge_row and judge_row["score"] is not None:
            row["metrics"][_judge_metric(plan.cfg)] = judge_row["score"]
        verdict = outcome.pairs.get(row["index"])
        if verdict is not None and plan.pair is not None and row["candidate"] in plan.pair:
            row["pairwise"] = _pair_dict(verdict, row["candidate"], plan.pair)


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


def _metric_names(plan: EvalPlan) -> list[str]:
    cfg = plan.cfg
    names = [facts.KEY_FACTS, *LEXICAL_METRICS]  # facts first: style alone must not look like a win
    if plan.similarity:
        names.append(SIMILARITY)
    if cfg.eval.judge is not None:
        names.append(_judge_metric(cfg))
    return names


def _failures(
    plan: EvalPlan, rows: list[dict[str, Any]], pairs: dict[int, PairVerdict]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """summary.json's `failures`, and the failed answers and missing judgements it counts."""
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
    pair_missing = sum(1 for v in pairs.values() if v.outcome is None)
    units = len(rows) + judgements + len(pairs)
    rate = (len(failed_answers) + len(missing) + pair_missing) / units if units else 0.0
    failures = {
        "answers": {n: sum(1 for f in failed_answers if f["candidate"] == n) for n in plan.names},
        "answers_total": len(rows),
        "judgements": judgements,
        "missing_judgements": len(missing),
        "rate": round(rate, stats.DIGITS),
        "max_failure_rate": plan.cfg.eval.max_failure_rate,
    }
    return failures, failed_answers, missing


def build_summary(plan: EvalPlan, rows: list[dict[str, Any]], pairs: dict[int, PairVerdict]) -> dict:
    """summary.json: means with CIs per candidate, the paired comparison, pairwise verdicts, failures."""
    cfg = plan.cfg
    names = plan.names
    metric_names = _metric_names(plan)
    judge = None
    if cfg.eval.judge is not None:
        jm = cfg.models[cfg.eval.judge]
        judge = {"model": cfg.eval.judge, "model_id": jm.model, "mode": cfg.eval.judge_mode}
    compared = plan.pair or (tuple(names[:2]) if len(names) >= 2 else None)
    failures, failed_answers, missing = _failures(plan, rows, pairs)
    summary: dict[str, Any] = {
        "eval_set": {"path": str(plan.eval_path), "sha256": plan.eval_sha, "items": len(plan.items)},
        "candidates": {c.name: c.describe() for c in plan.candidates},
        "system_prompt": plan.system_prompt,
        "system_prompt_source": plan.system_prompt_source,
        "decoding": {"temperature": cfg.eval.temperature, "max_tokens": cfg.eval.max_tokens},
        "judge": judge,
        "metric_names": metric_names,
        "metrics": stats.aggregate(rows, names, metric_names),
        "key_facts": _key_fact_counts(rows, names),
        "comparison": None,
        "pairwise": None,
        "failures": failures,
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
    if plan.pair:
        outcomes = [pairs[i.index].outcome for i in plan.items if i.index in pairs]
        summary["pairwise"] = {"a": plan.pair[0], "b": plan.pair[1], **stats.pairwise_summary(outcomes)}
    return summary


# ------------------------------------------------------------------------------------------ write


def _write_outputs(plan: EvalPlan, rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[Path]:
    """results.jsonl, summary.json, report.md and report.html in {run_dir}/eval/, each written atomically."""
    folder = plan.cfg.run_folder
    comp = summary["comparison"]
    worst = report.worst_items(rows, comp["a"], comp["b"], comp["ranking_metric"]) if comp else []
    atomic_write_jsonl(folder.eval_results, rows)
    atomic_write_json(folder.eval_summary, summary)
    atomic_write_text(folder.eval_report_md, report.render_markdown(summary, worst))
    page = report.render_html(summary, worst, report.bar_chart(summary), rows)
    atomic_write_text(folder.eval_report_html, page)
    return [folder.eval_results, folder.eval_summary, folder.eval_report_md, folder.eval_report_html]


def total_usage(*usages: Usage) -> Usage:
    """The token totals of several `Usage`s (answers and judge).

    >>> total_usage(Usage(prompt_tokens=3, cached=1), Usage(prompt_tokens=4)).prompt_tokens
    7
    """
    return Usage(**{f.name: sum(getattr(u, f.name) for u in usages) for f in fields(Usage)})


def _record(plan: EvalPlan, outcome: EvalOutcome, summary: dict[str, Any], record: StageRecord) -> None:
    """The stage's entry in manifest.json: counts, tokens (as every stage records them: Usage.tokens()), notes."""
    failures = summary["failures"]
    record.counts = {
        "items": len(plan.items),
        "candidates": len(plan.candidates),
        "failed_answers": sum(failures["answers"].values()),
        "missing_judgements": failures["missing_judgements"],
        "pairwise_missing": summary["pairwise"]["missing"] if summary["pairwise"] else 0,
        "cached_answers": outcome.answer_usage.cached,
    }
    record.tokens = total_usage(outcome.answer_usage, outcome.judge_usage).tokens()
    record.notes = {
        "system_prompt_source": plan.system_prompt_source,
        "failure_rate": failures["rate"],
        "tokens_answers": outcome.answer_usage.tokens(),
        "tokens_judge": outcome.judge_usage.tokens(),
    }
    plan.cfg.run_folder.record(record)


def _stage_summary(plan: EvalPlan, summary: dict[str, Any], outputs: list[Path]) -> Summary:
    """The closing table and its warnings; FailureRateError when too much failed (everything is written)."""
    cfg = plan.cfg
    result = Summary(
        title=f"eval: {len(plan.items)} items × {len(plan.candidates)} candidates",
        rows=report.summary_rows(summary),
        outputs=[str(p) for p in outputs],
    )
    comp = summary["comparison"]
    if comp and comp["style_without_facts"]:
        result.warnings.append(comp["style_without_facts"])
    failures = summary["failures"]
    if failures["missing_judgements"]:
        result.warnings.append(
            f"{failures['missing_judgements']} of {failures['judgements']} judgements are missing (failed or "
            "unparseable judge replies); see report.md"
        )
    if failures["rate"] > cfg.eval.max_failure_rate:
        raise FailureRateError(
            f"eval: failure rate {failures['rate']:.3f} is above eval.max_failure_rate "
            f"{cfg.eval.max_failure_rate}; everything is written to {cfg.run_folder.eval_dir} (see report.md, "
            "Failures); re-run to retry failed requests"
        )
    return result


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
    record = StageRecord(STAGE)
    plan = prepare(cfg, record, use_cache=use_cache)
    log.info(
        "eval: %d items × %d candidates (%s), judge %s",
        len(plan.items),
        len(plan.candidates),
        ", ".join(plan.names),
        cfg.eval.judge or "none",
    )

    outcome = asyncio.run(_evaluate(plan, progress))

    rows = outcome.ordered_rows(plan)
    summary = build_summary(plan, rows, outcome.pairs)
    outputs = _write_outputs(plan, rows, summary)
    _record(plan, outcome, summary, record)
    return _stage_summary(plan, summary, outputs)
