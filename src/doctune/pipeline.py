"""`doctune run`: every stage in order, skipping what is already done.

The stage table is built from the stage contracts of doctune.stages (what each stage reads, which config
sections, outside files, adapters and models it depends on, and what it writes), and so are the fingerprints:
an input a stage declares is an input of its fingerprint, with nothing to keep in step by hand.

A stage is skipped when its fingerprint (sha256 of its input files, of the loaded files of its adapters, of
the config it depends on and of the identity of its models) equals the one recorded after its last successful
run and its outputs are still there. Once one stage runs, every stage after it runs too. Re-running a stage is
cheap where work was already done: LLM answers come from cache.sqlite, and fine-tuning resumes from its last
checkpoint.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doctune import prompts
from doctune.config import Config
from doctune.errors import ConfigError
from doctune.models import model_identity
from doctune.reporting import NullProgress, Progress, Summary
from doctune.runs import sha256_file, sha256_json
from doctune.stages import CONTRACTS, StageContract, adapter_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One stage of `doctune run`: its contract, and the fingerprint, done check and entry built from it."""

    contract: StageContract

    @property
    def name(self) -> str:
        return self.contract.name

    def fingerprint(self, cfg: Config) -> str:
        """sha256 of everything the contract says the stage depends on (missing files are left out)."""
        c = self.contract
        files = [*c.reads(cfg.run_folder), *c.external(cfg)]
        packaged = {name: sha256_file(prompts.packaged_prompt_file(name)) for name in c.prompts}
        return sha256_json(
            {
                # only where a stage has packaged templates, so the other stages' fingerprints stay as they were
                **({"packaged_prompts": packaged} if packaged else {}),
                "inputs": {str(p): sha256_file(p) for p in files if p.is_file()},
                "adapters": {
                    str(a): {f.name: sha256_file(f) for f in adapter_files(a)} for a in c.adapters(cfg)
                },
                "config": {section: getattr(cfg, section).model_dump() for section in c.sections},
                "models": {name: _model(cfg, name) for name in c.models(cfg)},
                "tokenizers": {t: model_identity(cfg.model_source(t)) for t in c.tokenizers(cfg)},
            }
        )

    def done(self, cfg: Config) -> bool:
        return all(p.exists() for p in self.contract.writes(cfg.run_folder))

    def options(self, resuming: bool) -> dict[str, Any]:
        return self.contract.options(resuming)

    def load(self) -> Callable[..., Summary]:
        module, func = self.contract.entry.split(":")
        return getattr(importlib.import_module(module), func)


def _model(cfg: Config, name: str | None) -> dict[str, Any] | None:
    """A model's config (less what only tunes the client) and, for an in-process model, what it points to."""
    if name is None or name not in cfg.models:
        return None
    model = cfg.models[name]
    return {
        "config": model.model_dump(exclude={"max_concurrency", "timeout", "max_retries"}),
        "identity": model_identity(cfg.model_source(model.model)) if model.backend == "hf" else None,
    }


STAGES: list[Stage] = [Stage(contract) for contract in CONTRACTS]
STAGE_NAMES = [s.name for s in STAGES]


@dataclass
class StageOutcome:
    name: str
    status: str  # "ran" | "skipped"
    seconds: float
    summary: Summary | None


def select(from_stage: str | None, only: str | None) -> list[Stage]:
    for key, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in STAGE_NAMES:
            raise ConfigError(
                [f"{key}: {value!r} is not a stage (stages: {', '.join(STAGE_NAMES)})"], "command line"
            )
    if only is not None:
        return [s for s in STAGES if s.name == only]
    start = STAGE_NAMES.index(from_stage) if from_stage else 0
    return STAGES[start:]


def check_outside_files(cfg: Config, stages: list[Stage]) -> None:
    """ConfigError naming every file outside the run (prompt file, eval set, the user's pairs) that a selected
    stage reads and that is not there: found before the first stage starts, so a wrong `eval.eval_set` is
    reported now, not after hours of generation and training."""
    readers: dict[Path, list[str]] = {}
    for stage in stages:
        for path in stage.contract.external(cfg):
            if not path.exists():
                readers.setdefault(path, []).append(stage.name)
    missing = [
        f"{path}: not found, and {' and '.join(names)} read{'s' if len(names) == 1 else ''} it; "
        "fix the path in the config"
        for path, names in readers.items()
    ]
    if missing:
        raise ConfigError(missing, source="doctune run (no stage was started)")


def run(
    cfg: Config,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    on_stage: Callable[[StageOutcome], None] | None = None,
) -> list[StageOutcome]:
    """Run the selected stages in order; `on_stage` is called after each (the CLI prints its summary)."""
    progress = progress or NullProgress()
    stages = select(from_stage, only)
    check_outside_files(cfg, stages)
    run_dir = cfg.run_folder
    run_dir.remove_stray_temporaries()  # once: no stage of this process leaves any (see runs.py)
    outcomes: list[StageOutcome] = []
    rerun_rest = force or from_stage is not None
    for stage in stages:
        recorded = run_dir.manifest().get("pipeline", {}).get(stage.name)
        fingerprint = stage.fingerprint(cfg)
        if not rerun_rest and recorded == fingerprint and stage.done(cfg):
            log.info("%s: inputs and config unchanged since its last run, skipped", stage.name)
            outcome = StageOutcome(stage.name, "skipped", 0.0, None)
        else:
            rerun_rest = True
            started = run_dir.manifest().get("pipeline_started", {}).get(stage.name)
            resuming = started == fingerprint and not force
            run_dir.set_manifest("pipeline_started", stage.name, fingerprint)
            t0 = time.perf_counter()
            summary = stage.load()(cfg, progress=progress, **stage.options(resuming))
            seconds = time.perf_counter() - t0
            run_dir.set_manifest("pipeline_seconds", stage.name, round(seconds, 1))
            run_dir.set_manifest("pipeline", stage.name, fingerprint)
            outcome = StageOutcome(stage.name, "ran", seconds, summary)
        outcomes.append(outcome)
        if on_stage is not None:
            on_stage(outcome)
    return outcomes


# The closing table of `doctune run`: what each stage recorded in manifest.json, in one place.
HEADLINE_COUNTS: dict[str, list[tuple[str, str]]] = {
    "ingest": [("documents", "documents read"), ("skipped", "files skipped"), ("chunks", "chunks")],
    "generate": [("pairs", "pairs generated"), ("failures", "generation failures")],
    "curate": [("kept", "pairs kept"), ("train", "train pairs"), ("val", "val pairs")],
    "finetune": [("steps", "training steps")],
}


def overview(cfg: Config, outcomes: list[StageOutcome]) -> Summary:
    """One table for the whole run: headline counts per stage, eval metrics, tokens, wall time per stage."""
    run_dir = cfg.run_folder
    manifest = run_dir.manifest()
    stages = manifest.get("stages", {})
    summary = Summary(title=f"doctune run: {cfg.run_path}")
    for stage, rows in HEADLINE_COUNTS.items():
        counts = stages.get(stage, {}).get("counts", {})
        for key, label in rows:
            if key in counts:
                summary.add(label, counts[key])
    summary.rows += _training_rows(run_dir.adapter.metrics)
    summary.rows += _eval_rows(run_dir.eval_summary)
    summary.warnings += _eval_warnings(run_dir.eval_summary)
    spent = {"prompt": 0, "completion": 0}
    for entry in stages.values():  # generate, curate and eval record llm.base.Usage.tokens()
        tokens = entry.get("tokens", {})
        for kind in spent:
            spent[kind] += int(tokens.get(kind) or 0)
    summary.add("LLM tokens (prompt / completion)", f"{spent['prompt']:,} / {spent['completion']:,}")
    for outcome in outcomes:
        recorded = manifest.get("pipeline_seconds", {}).get(outcome.name, "?")
        took = f"{outcome.seconds:.1f} s" if outcome.status == "ran" else f"skipped (last run {recorded} s)"
        summary.add(f"wall time: {outcome.name}", took)
    report = run_dir.eval_report_html
    if report.is_file():
        summary.outputs.append(str(report))
    return summary


def _training_rows(path: Path) -> list[tuple[str, str]]:
    """Last training loss and best validation loss / perplexity from adapter/metrics.json."""
    import json

    if not path.is_file():
        return []
    metrics = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    train_loss = (metrics.get("last") or {}).get("train_loss")
    if train_loss is not None:
        rows.append(("training loss (last)", f"{train_loss:.4f}"))
    best = metrics.get("best") or {}
    if best.get("eval_loss") is not None:
        rows.append(
            ("validation loss (best)", f"{best['eval_loss']:.4f} (perplexity {best['perplexity']:.1f})")
        )
    return rows


def _eval_rows(path: Path) -> list[tuple[str, str]]:
    """`metric: candidate  mean [low, high]` rows from eval/summary.json, and the paired difference of the
    compared candidates (empty when eval has not run)."""
    import json

    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    per_candidate = data.get("metrics") or {}
    comparison = data.get("comparison") or {}
    diffs = comparison.get("metrics") or {}
    names = data.get("metric_names") or list(dict.fromkeys(m for ms in per_candidate.values() for m in ms))
    for metric in names:  # summary.json lists key facts first: style alone must not look like a win
        for name, metrics in per_candidate.items():
            if metric in metrics:
                rows.append((f"{metric}: {name}", _mean_ci(metrics[metric])))
        if metric in diffs:
            rows.append((f"{metric}: {comparison['a']} − {comparison['b']}", _mean_ci(diffs[metric])))
    pair = data.get("pairwise")
    if pair:
        outcome = f"{pair['win']} win / {pair['tie']} tie / {pair['loss']} loss ({pair['missing']} missing)"
        rows.append((f"pairwise judge: {pair['a']} vs {pair['b']}", outcome))
    return rows


def _eval_warnings(path: Path) -> list[str]:
    """The eval's "style, not facts" sentence, when it wrote one."""
    import json

    if not path.is_file():
        return []
    flag = (json.loads(path.read_text(encoding="utf-8")).get("comparison") or {}).get("style_without_facts")
    return [flag] if flag else []


def _mean_ci(agg: dict[str, Any]) -> str:
    """An aggregate as `mean [low, high]`.

    >>> _mean_ci({"mean": 0.5, "ci": [0.25, 0.75], "n": 8})
    '0.500 [0.250, 0.750]'
    """
    if not isinstance(agg, dict) or agg.get("mean") is None:
        return "n/a"
    low, high = (agg.get("ci") or [None, None])[:2]
    ci = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
    return f"{agg['mean']:.3f}{ci}"
