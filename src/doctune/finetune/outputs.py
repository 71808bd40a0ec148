"""What `doctune finetune` writes after training, one function per job:

1. `stage_chosen`: every rank saves the Trainer's model (the adapter `finetune.select` chose) into a staging folder;
2. `install_other`: the other adapter (last step's or lowest val loss's) from its checkpoint into last/ or best/;
3. `swap_in_chosen`: the staged adapter's files into the output dir (refused if it holds no weights);
4. `write_metrics`: metrics.json (train loss, val loss and perplexity per step, best and last);
5. `write_info`: doctune_finetune.json (what was trained, on what, how, and where each adapter is);
6. `record_manifest` and `summary`: the run's manifest entry and the table the CLI prints.

`write` runs 2-6 in order on rank 0.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doctune.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BEST_DIR,
    CHAT_TEMPLATE,
    LAST_DIR,
    README,
    AdapterDir,
)
from doctune.config import Config
from doctune.errors import DoctuneError
from doctune.finetune import data
from doctune.finetune.launch import DistInfo
from doctune.reporting import Summary
from doctune.runs import StageRecord, atomic_write_json, sha256_file

if TYPE_CHECKING:
    from doctune.finetune.train import Split

STAGING_DIR = ".best.partial"  # the chosen adapter, saved by the Trainer, before it is swapped in


@dataclass
class Trained:
    """Everything one finished training leaves for the write step."""

    cfg: Config
    out: AdapterDir
    staging: Path
    state: Any  # transformers.TrainerState
    result_metrics: dict[str, Any]  # trainer.train()'s metrics
    lora: Any  # the PEFT LoraConfig of the trained adapter
    train: Split
    val: Split
    source: str  # the base model as loaded
    from_adapter: AdapterDir | None
    checkpoint: Path | None  # resumed from
    template_source: str
    setup: dict[str, Any]  # mode, world_size, device, dtype, attention, ranks
    warnings: list[str]
    wall_s: float


def stage_chosen(trainer: Any, out: AdapterDir, dist: DistInfo) -> Path:
    """Save the Trainer's model (the chosen adapter) into out's staging folder; every rank takes part (FSDP
    gathers), rank 0 writes."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    staging = out.path / STAGING_DIR
    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    return staging


def write(t: Trained) -> Summary:
    """Install both adapters and write metrics.json, doctune_finetune.json and the manifest entry (rank 0)."""
    from transformers.trainer import TRAINING_ARGS_NAME  # saved with every model; not part of an adapter

    (t.staging / TRAINING_ARGS_NAME).unlink(missing_ok=True)
    state = t.state
    other = install_other(t.out, t.staging, t.cfg.finetune.select, state.best_global_step, state.global_step)
    n_tensors = swap_in_chosen(t.out, t.staging)
    metrics = write_metrics(t.out, state, t.result_metrics)
    write_info(t, metrics, other, n_tensors)
    record_manifest(t)
    return summary(t, metrics, other)


def install_other(out: AdapterDir, staging: Path, select: str, best_step: int | None, last_step: int) -> Path:
    """Copy the adapter that `finetune.select` did not choose into its folder of `out`: the last step's into
    last/ (select val_loss) or the lowest-val-loss step's into best/ (select last), from its checkpoint. The
    chosen one is `staging` (the Trainer's model after training). Returns that folder."""
    other, stale = (out.best, out.last) if select == "last" else (out.last, out.best)
    best_step = best_step if best_step is not None else last_step  # no val loss: the last is the best
    chosen_step, other_step = (last_step, best_step) if select == "last" else (best_step, last_step)
    checkpoint = out.checkpoints / f"checkpoint-{other_step}"
    if checkpoint.is_dir():
        _install_adapter_copy(checkpoint, other)
    elif other_step == chosen_step:
        _install_adapter_copy(staging, other)
    else:
        raise DoctuneError(
            f"{checkpoint}: missing, so {other.name}/ cannot hold the adapter of step {other_step}; nothing was "
            f"replaced in {out.path}, the adapter of step {chosen_step} is in {staging}"
        )
    shutil.rmtree(stale, ignore_errors=True)  # an earlier run's with the other select
    return other


def _install_adapter_copy(source: Path, target: Path) -> None:
    """Copy an adapter folder's files (not optimizer state) to `target`, swapping it in whole."""
    keep = {ADAPTER_CONFIG, *ADAPTER_WEIGHTS, CHAT_TEMPLATE, README}
    partial = target.with_name(f".{target.name}.copy.partial")  # not STAGING_DIR: the staged adapter
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and (
            path.name in keep or path.name.startswith("tokenizer") or "special_tokens" in path.name
        ):
            shutil.copy2(path, partial / path.name)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    partial.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def swap_in_chosen(out: AdapterDir, staging: Path) -> int:
    """Move the staged adapter's files into `out` (then remove the staging folder); returns its tensor count.
    An adapter without weights (a distributed save gone wrong) is refused before anything is replaced."""
    n_tensors = adapter_tensor_count(staging)
    if n_tensors == 0:
        raise DoctuneError(
            f"{staging}: the saved adapter holds no weights (a distributed save went wrong); nothing was replaced "
            f"in {out.path}, the checkpoints in {out.checkpoints} are kept"
        )
    for path in sorted(staging.iterdir()):
        os.replace(path, out.path / path.name)
    staging.rmdir()
    return n_tensors


def adapter_tensor_count(folder: str | Path) -> int:
    """Tensors in the folder's adapter_model.safetensors (0 when missing)."""
    from safetensors import safe_open

    weights = AdapterDir(folder).weights
    if weights.name != ADAPTER_WEIGHTS[0] or not weights.is_file():
        return 0
    with safe_open(str(weights), framework="pt") as f:
        return len(list(f.keys()))


def write_metrics(out: AdapterDir, state: Any, result_metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the Trainer's log history as train / val loss per step, best and last, and throughput."""
    metrics = training_metrics(state.log_history, state.best_global_step, state.global_step)
    metrics["train_runtime_s"] = round(float(result_metrics.get("train_runtime", 0.0)), 3)
    metrics["train_tokens_per_second"] = result_metrics.get("train_tokens_per_second")
    metrics["num_input_tokens_seen"] = int(state.num_input_tokens_seen)
    atomic_write_json(out.metrics, metrics)
    return metrics


def training_metrics(
    log_history: list[dict[str, Any]], best_step: int | None, last_step: int
) -> dict[str, Any]:
    """metrics.json from the Trainer's log history: train loss and val loss / perplexity per step, the best
    and the last point.

    >>> m = training_metrics([{"loss": 2.0, "step": 1}, {"eval_loss": 1.0, "step": 1}], best_step=1, last_step=1)
    >>> m["best"]["perplexity"] == math.exp(1.0), m["last"]["train_loss"]
    (True, 2.0)
    """
    train = [
        {k: row[k] for k in ("step", "epoch", "loss", "learning_rate", "grad_norm") if k in row}
        for row in log_history
        if "loss" in row
    ]
    evals = [
        {
            "step": row["step"],
            "epoch": row.get("epoch"),
            "loss": row["eval_loss"],
            "perplexity": _perplexity(row["eval_loss"]),
        }
        for row in log_history
        if "eval_loss" in row
    ]
    best_eval = next((e for e in evals if e["step"] == best_step), None)
    last_eval = next((e for e in reversed(evals) if e["step"] == last_step), None)
    return {
        "train": train,
        "eval": evals,
        "best": {
            "step": best_step if best_eval is not None else last_step,
            "eval_loss": best_eval["loss"] if best_eval else None,
            "perplexity": best_eval["perplexity"] if best_eval else None,
        },
        "last": {
            "step": last_step,
            "train_loss": train[-1]["loss"] if train else None,
            "eval_loss": last_eval["loss"] if last_eval else None,
            "perplexity": last_eval["perplexity"] if last_eval else None,
        },
    }


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def write_info(t: Trained, metrics: dict[str, Any], other: Path, n_tensors: int) -> dict[str, Any]:
    """doctune_finetune.json: base model, system prompt, template, LoRA settings, data, training, adapters."""
    fcfg, state, lora = t.cfg.finetune, t.state, t.lora
    info = {
        "base_model": t.source,
        "student": fcfg.model,
        "from_adapter": str(t.from_adapter.path) if t.from_adapter is not None else None,
        "resumed_from": str(t.checkpoint) if t.checkpoint is not None else None,
        "system_prompt": data.system_prompt(t.train.conversations),
        "chat_template": {"file": CHAT_TEMPLATE, "source": t.template_source},
        "lora": {
            "r": lora.r,
            "alpha": lora.lora_alpha,
            "dropout": lora.lora_dropout,
            "target_modules": sorted(lora.target_modules)
            if isinstance(lora.target_modules, set)
            else lora.target_modules,
        },
        "config": fcfg.model_dump(),
        "data": _data_info(t.train, t.val),
        "training": {"steps": state.global_step, "epochs": state.epoch, **t.setup},
        "select": fcfg.select,
        "best": {**metrics["best"], "dir": BEST_DIR if other.name == BEST_DIR else "."},
        "last": {**metrics["last"], "dir": LAST_DIR if other.name == LAST_DIR else "."},
        "adapter_tensors": n_tensors,
    }
    atomic_write_json(t.out.info_file, info)
    return info


def _data_info(train: Split, val: Split) -> dict[str, Any]:
    has_val = val.path.is_file()
    return {
        "train": str(train.path),
        "train_sha256": sha256_file(train.path),
        "val": str(val.path) if has_val else None,
        "val_sha256": sha256_file(val.path) if has_val else None,
        "train_samples": len(train.samples),
        "val_samples": len(val.samples),
        "skipped": len(train.problems) + len(val.problems),
        "truncated": train.truncated + val.truncated,
        "train_tokens": train.tokens,
        "train_trained_tokens": train.trained_tokens,
    }


def record_manifest(t: Trained) -> None:
    """The finetune entry of the run's manifest.json: inputs' hashes, config, counts, tokens, wall time."""
    fcfg, state = t.cfg.finetune, t.state
    rec = StageRecord(stage="finetune", _t0=time.perf_counter() - t.wall_s)  # the whole stage, not this step
    rec.add_input(t.train.path, t.train.path.name)
    if t.val.path.is_file():
        rec.add_input(t.val.path, t.val.path.name)
    rec.config = {"finetune": fcfg.model_dump(), "model": t.cfg.models[fcfg.model].model_dump()}
    rec.counts = {
        "train_samples": len(t.train.samples),
        "val_samples": len(t.val.samples),
        "skipped": len(t.train.problems) + len(t.val.problems),
        "steps": state.global_step,
    }
    rec.tokens = {"seen": int(state.num_input_tokens_seen), "train_trained": t.train.trained_tokens}
    rec.notes = {"output_dir": str(t.out.path), **{k: v for k, v in t.setup.items() if k != "ranks"}}
    t.cfg.run_folder.record(rec)


def summary(t: Trained, metrics: dict[str, Any], other: Path) -> Summary:
    """The table the CLI prints: samples, steps, mode, losses, speed, outputs and warnings."""
    train, val, setup = t.train, t.val, t.setup
    result = Summary(title="finetune")
    result.add("train samples", len(train.samples))
    result.add("val samples", len(val.samples))
    if train.problems or val.problems:
        result.add("skipped conversations", len(train.problems) + len(val.problems))
    result.add("steps", t.state.global_step)
    result.add("mode", f"{setup['mode']} x{setup['world_size']} on {setup['device']}")
    if metrics["last"].get("train_loss") is not None:
        result.add("train loss (last logged)", round(metrics["last"]["train_loss"], 4))
    best = metrics["best"]
    if best.get("eval_loss") is not None:
        result.add(
            "best val loss / perplexity",
            f"{best['eval_loss']:.4f} / {best['perplexity']:.2f} (step {best['step']})",
        )
    if metrics["train_tokens_per_second"]:
        result.add("tokens/s", f"{metrics['train_tokens_per_second']:,.0f}")
    result.add("seconds", round(t.wall_s, 1))
    result.outputs += [str(t.out.path), str(other), str(t.out.metrics)]
    result.warnings += t.warnings
    problems = train.problems + val.problems
    result.warnings += problems[:5]
    if len(problems) > 5:
        result.warnings.append(f"... and {len(problems) - 5} more skipped conversations (see the log)")
    return result
