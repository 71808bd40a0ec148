"""What each stage reads and writes, as data: the contracts `doctune run` builds its stage table and its
fingerprints from (pipeline.py), so that an input a stage depends on cannot be left out of its fingerprint.

A contract names, for one stage:
- `reads`: files of the run an earlier stage wrote (RunDir attributes);
- `sections`: the config sections whose values it depends on;
- `external`: files outside the run it reads: the documents, prompt files, eval sets, the user's own pairs;
- `prompts`: the packaged prompt templates it fills (doctune.prompts; a user's prompt file replaces only the
  keys it has), so that a doctune upgrade with other templates re-runs the stage;
- `adapters`: adapter folders it loads (an eval candidate's, a model's `adapter:`), wherever they are kept;
- `models`: names in `models:` it loads (their config and the identity of what they point to: see
  doctune.models.model_identity); `tokenizers`: other model references it loads (data.tokenizer);
- `writes`: the outputs that show it finished (all present = done); `also_writes`: everything else it writes
  or keeps in the run (manifest, reply cache, reports, checkpoints);
- `options`: keyword arguments of its entry function, given whether it is resuming an interrupted run.

Light on purpose (no torch, transformers): `doctune --help` imports the CLI, which imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doctune.adapters import METRICS, README, AdapterDir
from doctune.config import Config
from doctune.curate import extra_pairs
from doctune.runs import OUTPUT_MARKER, RunDir

# Files of an adapter folder that loading it never reads (everything else at its top level is hashed).
ADAPTER_NOT_LOADED = (METRICS, README, OUTPUT_MARKER)


def _none(_: Any) -> list[Any]:
    return []


@dataclass(frozen=True)
class StageContract:
    """One stage's entry point and everything it reads and writes (see the module docstring)."""

    name: str
    entry: str  # "module:function", imported only when the stage runs
    reads: Callable[[RunDir], list[Path]] = _none
    sections: tuple[str, ...] = ()
    external: Callable[[Config], list[Path]] = _none
    prompts: tuple[str, ...] = ()
    adapters: Callable[[Config], list[Path]] = _none
    models: Callable[[Config], list[str]] = _none
    tokenizers: Callable[[Config], list[str]] = _none
    writes: Callable[[RunDir], list[Path]] = _none
    also_writes: Callable[[RunDir], list[Path]] = _none
    # keyword arguments of the stage's run(); `resuming`: this stage was started on these same inputs and
    # config before and did not finish (killed, crashed), so it may continue what it left
    options: Callable[[bool], dict[str, Any]] = field(default=lambda resuming: {})


# ------------------------------------------------------------------------------------------- inputs


def documents(cfg: Config) -> list[Path]:
    """Every file of the data folder (recursively; no symlinks, nothing inside the run folder), sorted."""
    root = cfg.path(cfg.data.dir)
    if not root.is_dir():
        return []
    run = cfg.run_path.resolve()
    return sorted(
        p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and run not in p.resolve().parents
    )


def adapter_files(folder: str | Path) -> list[Path]:
    """The files of an adapter folder that loading it reads: adapter config, weights, doctune_finetune.json,
    tokenizer and chat template files (every top-level file but the metrics, README and output marker)."""
    adapter = AdapterDir(folder)
    if not adapter.path.is_dir():
        return []
    return sorted(p for p in adapter.path.iterdir() if p.is_file() and p.name not in ADAPTER_NOT_LOADED)


def model_files(reference: str) -> list[Path]:
    """The local files behind a model reference as `Config.model_source` gives it: a .gguf file, every file
    of a model folder; none for a hub name."""
    path = Path(reference)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return []


def _optional(cfg: Config, value: str | None) -> list[Path]:
    return [cfg.path(value)] if value else []


def _model_adapters(cfg: Config, names: list[str]) -> list[Path]:
    """The `adapter:` folders of the named models (an hf model may carry one)."""
    return [cfg.path(cfg.models[n].adapter) for n in names if n in cfg.models and cfg.models[n].adapter]


# ------------------------------------------------------------------------------------------- per stage


def _ingest_models(cfg: Config) -> list[str]:
    return [] if cfg.data.tokenizer else [cfg.generate.model]  # chunk tokens: the teacher's tokenizer


def _eval_models(cfg: Config) -> list[str]:
    names = [c.model for c in cfg.eval.candidates.values()]
    return list(dict.fromkeys([*names, *([cfg.eval.judge] if cfg.eval.judge else [])]))


def _eval_adapters(cfg: Config) -> list[Path]:
    """Every candidate's adapter (its own, else its model's), inside the run folder or kept elsewhere."""
    folders = [cfg.path(c.adapter) for c in cfg.eval.candidates.values() if c.adapter]
    return list(dict.fromkeys([*folders, *_model_adapters(cfg, _eval_models(cfg))]))


def _curate_external(cfg: Config) -> list[Path]:
    cur = cfg.curate
    return [
        *_optional(cfg, cur.eval_set),
        *_optional(cfg, cur.prompts),
        *(cfg.path(p) for p in extra_pairs.configured(cur.extra_pairs)),
    ]


def _finetune_options(resuming: bool) -> dict[str, Any]:
    # an interrupted training of the same data continues from its checkpoint; new data starts over
    return {"resume": True} if resuming else {"overwrite": True}


CONTRACTS: list[StageContract] = [
    StageContract(
        "ingest",
        "doctune.ingest.stage:run",
        sections=("data",),
        external=documents,
        models=_ingest_models,
        tokenizers=lambda c: [c.data.tokenizer] if c.data.tokenizer else [],
        writes=lambda r: [r.chunks],
        also_writes=lambda r: [r.ingest_report, r.manifest_file],
    ),
    StageContract(
        "generate",
        "doctune.generate:run",
        reads=lambda r: [r.chunks],
        sections=("generate",),
        external=lambda c: _optional(c, c.generate.prompts),
        prompts=("generate",),
        adapters=lambda c: _model_adapters(c, [c.generate.model]),
        models=lambda c: [c.generate.model],
        writes=lambda r: [r.qa_raw],
        also_writes=lambda r: [r.generate_failures, r.cache, r.manifest_file],
    ),
    StageContract(
        "curate",
        "doctune.curate.stage:run",
        reads=lambda r: [r.qa_raw],
        sections=("curate",),
        external=_curate_external,
        prompts=("curate",),
        adapters=lambda c: _model_adapters(c, [c.curate.model]),
        models=lambda c: [c.curate.model],
        writes=lambda r: [r.train, r.val, r.data_json],
        also_writes=lambda r: [r.qa_curated, r.qa_rejected, r.curation_report, r.cache, r.manifest_file],
    ),
    StageContract(
        "finetune",
        "doctune.finetune.train:run",
        reads=lambda r: [r.train, r.val],
        sections=("finetune",),
        adapters=lambda c: _model_adapters(c, [c.finetune.model]),
        models=lambda c: [c.finetune.model],
        writes=lambda r: [r.adapter.config],
        also_writes=lambda r: [r.adapter.path, r.manifest_file],
        options=_finetune_options,
    ),
    StageContract(
        "eval",
        "doctune.evaluate.stage:run",
        # the training system prompt comes from the run's adapter even when no candidate loads it
        reads=lambda r: [r.adapter.info_file],
        sections=("eval",),
        external=lambda c: [c.path(c.eval.eval_set), *_optional(c, c.eval.prompts)],
        prompts=("eval",),
        adapters=_eval_adapters,
        models=_eval_models,
        writes=lambda r: [r.eval_summary],
        also_writes=lambda r: [r.eval_dir, r.cache, r.manifest_file],
    ),
]
STAGE_NAMES = [c.name for c in CONTRACTS]


def declared_reads(contract: StageContract, cfg: Config) -> list[Path]:
    """Every file `contract`'s stage may read under `cfg`: run files, outside files, the loaded files of its
    adapters, and the local files of its models and tokenizers."""
    refs = [cfg.model_source(cfg.models[n].model) for n in contract.models(cfg) if n in cfg.models]
    refs += [cfg.model_source(t) for t in contract.tokenizers(cfg)]
    return [
        *contract.reads(cfg.run_folder),
        *contract.external(cfg),
        *(f for folder in contract.adapters(cfg) for f in adapter_files(folder)),
        *(f for ref in refs for f in model_files(ref)),
    ]


__all__ = [
    "CONTRACTS",
    "STAGE_NAMES",
    "StageContract",
    "adapter_files",
    "declared_reads",
    "documents",
    "model_files",
]
