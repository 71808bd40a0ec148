"""`doctune run`: every stage in order, skipping what is already done.

A stage is skipped when its fingerprint (sha256 of its input files and of the config it depends on) equals the
one recorded after its last successful run and its outputs are still there. Once one stage runs, every stage
after it runs too. Re-running a stage is cheap where work was already done: LLM answers come from
cache.sqlite, and fine-tuning resumes from its last checkpoint.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doctune.config import Config
from doctune.errors import ConfigError
from doctune.reporting import NullProgress, Progress, Summary
from doctune.runs import RunDir, sha256_file, sha256_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str  # "module:function", imported only when the stage runs
    inputs: Callable[[Config], list[Path]]
    outputs: Callable[[Config], list[Path]]
    sections: Callable[[Config], dict[str, Any]]
    # keyword arguments of the stage's run(); `resuming`: this stage was started on these same inputs and
    # config before and did not finish (killed, crashed), so it may continue what it left
    options: Callable[[bool], dict[str, Any]] = lambda resuming: {}

    def fingerprint(self, cfg: Config) -> str:
        files = {str(p): sha256_file(p) for p in self.inputs(cfg) if p.is_file()}
        return sha256_json({"inputs": files, "config": self.sections(cfg)})

    def done(self, cfg: Config) -> bool:
        return all(p.exists() for p in self.outputs(cfg))

    def load(self) -> Callable[..., Summary]:
        module, func = self.entry.split(":")
        return getattr(importlib.import_module(module), func)


def _data_files(cfg: Config) -> list[Path]:
    root = cfg.path(cfg.data.dir)
    if not root.is_dir():
        return []
    run = cfg.run_path.resolve()
    return sorted(
        p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and run not in p.resolve().parents
    )


def _model(cfg: Config, name: str | None) -> dict[str, Any] | None:
    if name is None or name not in cfg.models:
        return None
    return cfg.models[name].model_dump(exclude={"max_concurrency", "timeout", "max_retries"})


def _optional(cfg: Config, value: str | None) -> list[Path]:
    return [cfg.path(value)] if value else []


def _listed(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _run_file(name: str) -> Callable[[Config], list[Path]]:
    return lambda cfg: [cfg.run_path / name]


STAGES: list[Stage] = [
    Stage(
        "ingest",
        "doctune.ingest.stage:run",
        _data_files,
        _run_file("chunks.jsonl"),
        lambda c: {"data": c.data.model_dump(), "counter": _model(c, c.generate.model)},
    ),
    Stage(
        "generate",
        "doctune.generate:run",
        lambda c: [c.run_path / "chunks.jsonl", *_optional(c, c.generate.prompts)],
        _run_file("qa_raw.jsonl"),
        lambda c: {"generate": c.generate.model_dump(), "model": _model(c, c.generate.model)},
    ),
    Stage(
        "curate",
        "doctune.curate.stage:run",
        lambda c: [
            c.run_path / "qa_raw.jsonl",
            *_optional(c, c.curate.eval_set),
            *_optional(c, c.curate.prompts),
            *(c.path(p) for p in _listed(c.curate.extra_pairs)),
        ],
        lambda c: [c.run_path / "train.jsonl", c.run_path / "val.jsonl", c.run_path / "data.json"],
        lambda c: {"curate": c.curate.model_dump(), "model": _model(c, c.curate.model)},
    ),
    Stage(
        "finetune",
        "doctune.finetune.train:run",
        lambda c: [c.run_path / "train.jsonl", c.run_path / "val.jsonl"],
        lambda c: [c.run_path / "adapter" / "adapter_config.json"],
        lambda c: {"finetune": c.finetune.model_dump(), "model": _model(c, c.finetune.model)},
        # an interrupted training of the same data continues from its checkpoint; new data starts over
        lambda resuming: {"resume": True} if resuming else {"overwrite": True},
    ),
    Stage(
        "eval",
        "doctune.evaluate.stage:run",
        lambda c: [c.path(c.eval.eval_set), c.run_path / "adapter" / "adapter_model.safetensors"],
        lambda c: [c.run_path / "eval" / "summary.json"],
        lambda c: {
            "eval": c.eval.model_dump(),
            "models": {n: _model(c, cand.model) for n, cand in c.eval.candidates.items()},
            "judge": _model(c, c.eval.judge),
        },
    ),
]
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
    run_dir = RunDir(cfg.run_path)
    outcomes: list[StageOutcome] = []
    rerun_rest = force or from_stage is not None
    for stage in select(from_stage, only):
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
    manifest = RunDir(cfg.run_path).manifest()
    stages = manifest.get("stages", {})
    summary = Summary(title=f"doctune run: {cfg.run_path}")
    for stage, rows in HEADLINE_COUNTS.items():
        counts = stages.get(stage, {}).get("counts", {})
        for key, label in rows:
            if key in counts:
                summary.add(label, counts[key])
    summary.rows += _training_rows(cfg.run_path / "adapter" / "metrics.json")
    summary.rows += _eval_rows(cfg.run_path / "eval" / "summary.json")
    summary.warnings += _eval_warnings(cfg.run_path / "eval" / "summary.json")
    spent = {"prompt": 0, "completion": 0}
    for entry in stages.values():
        for key, value in entry.get("tokens", {}).items():
            for (
                kind
            ) in spent:  # "prompt", "answer_prompt", "judge_prompt", ...; not the *_cached/*_sent splits
                if key == kind or key.endswith(f"_{kind}"):
                    spent[kind] += int(value or 0)
    summary.add("LLM tokens (prompt / completion)", f"{spent['prompt']:,} / {spent['completion']:,}")
    for outcome in outcomes:
        recorded = manifest.get("pipeline_seconds", {}).get(outcome.name, "?")
        took = f"{outcome.seconds:.1f} s" if outcome.status == "ran" else f"skipped (last run {recorded} s)"
        summary.add(f"wall time: {outcome.name}", took)
    report = cfg.run_path / "eval" / "report.html"
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
    """>>> _mean_ci({"mean": 0.5, "ci": [0.25, 0.75], "n": 8})
    '0.500 [0.250, 0.750]'
    """
    if not isinstance(agg, dict) or agg.get("mean") is None:
        return "n/a"
    low, high = (agg.get("ci") or [None, None])[:2]
    ci = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
    return f"{agg['mean']:.3f}{ci}"
