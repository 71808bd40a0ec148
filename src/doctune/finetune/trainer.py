"""The pieces of transformers' Trainer that `doctune finetune` sets up: the assistant-only-loss Trainer, its
TrainingArguments, the callbacks that feed doctune's Progress and TensorBoard, and the per-rank counts.

torch and transformers are imported inside the functions (the CLI's --help stays fast).
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path
from typing import Any

from doctune.config import FinetuneConfig
from doctune.finetune import data
from doctune.finetune.launch import DistInfo
from doctune.reporting import Progress


def make_trainer_class() -> type:
    """The Trainer subclass doctune trains with (built on first use: it subclasses transformers' Trainer)."""
    import torch
    import torch.nn.functional as F
    from transformers import Trainer

    class AssistantLossTrainer(Trainer):
        """Trainer whose loss covers assistant tokens only, with lm_head run on those positions alone."""

        logits_mask = True
        batches_seen = 0
        tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            targets = labels[:, 1:]
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = targets != data.IGNORE_INDEX
            forward = {
                "input_ids": inputs["input_ids"],
                "position_ids": inputs["position_ids"],
                "use_cache": False,
            }
            if self.logits_mask:
                outputs = model(**forward, logits_to_keep=keep)
                logits = outputs.logits
            else:
                outputs = model(**forward)
                logits = outputs.logits[keep]
            loss = F.cross_entropy(logits.float(), targets[targets != data.IGNORE_INDEX], reduction="sum")
            if num_items_in_batch is None:
                loss = loss / max(1, int(keep.sum()))
            else:
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    loss = loss * self.accelerator.num_processes
            if model.training:
                self.batches_seen += 1
                self.tokens_seen += int(inputs["input_ids"].numel())
            return (loss, outputs) if return_outputs else loss

    return AssistantLossTrainer


def accepts_logits_mask(model: Any) -> bool:
    """Whether the model's forward slices hidden states with a boolean `logits_to_keep` (transformers 5 models
    do through `slice_logits_to_keep`); if not, logits are computed everywhere and selected after."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules.get(type(base).__module__)
    try:
        return module is not None and "slice_logits_to_keep" in inspect.getsource(module)
    except (OSError, TypeError):
        return False


def progress_callback(progress: Progress) -> Any:
    """A TrainerCallback that feeds doctune's Progress: one step per optimizer step, with train loss, val loss
    and tokens/s."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self.fields: dict[str, Any] = {}
            self.t0 = 0.0
            self.tokens0 = 0

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
                progress.start("finetune", total=state.max_steps)
                if state.global_step:
                    progress.advance(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.fields["loss"] = f"{logs['loss']:.3f}"

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_loss" in metrics:
                self.fields["val"] = f"{metrics['eval_loss']:.3f}"

        def on_step_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            elapsed = time.perf_counter() - self.t0
            if elapsed > 0:
                self.fields["tok/s"] = f"{(state.num_input_tokens_seen - self.tokens0) / elapsed:,.0f}"
            progress.advance(1, **self.fields)

    return ProgressCallback()


def tensorboard_callback(log_dir: Path) -> Any:
    """transformers' TensorBoard callback writing into `log_dir`."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(SummaryWriter(log_dir=str(log_dir)))


def training_args(
    fcfg: FinetuneConfig, checkpoints_dir: Path, *, cuda: bool, dist: DistInfo, has_val: bool, dtype: Any
) -> Any:
    """TrainingArguments for `finetune.*`: val loss and a checkpoint every `eval_steps` into `checkpoints_dir`,
    the lowest-val-loss model loaded at the end when `select: val_loss`."""
    import torch
    from transformers import TrainingArguments

    report_to = [r for r in fcfg.report_to if r not in ("none", "tensorboard")] or "none"
    fsdp: dict[str, Any] = {}
    if fcfg.fsdp is not None:
        fsdp = {"fsdp": f"{fcfg.fsdp} auto_wrap", "fsdp_config": {"state_dict_type": "FULL_STATE_DICT"}}
    return TrainingArguments(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=fcfg.batch_size,
        per_device_eval_batch_size=fcfg.batch_size,
        gradient_accumulation_steps=fcfg.gradient_accumulation_steps,
        num_train_epochs=fcfg.epochs,
        learning_rate=fcfg.lr,
        logging_steps=max(1, min(10, fcfg.eval_steps)),
        eval_strategy="steps" if has_val else "no",
        eval_steps=fcfg.eval_steps,
        save_strategy="steps",
        save_steps=fcfg.eval_steps,
        # 2, not 1: rotation always keeps the best and the newest checkpoint, but with a limit of 1 Trainer deletes
        # the last checkpoint after training when it is not the best, and last/ would get the best weights
        save_total_limit=2,
        load_best_model_at_end=has_val and fcfg.select == "val_loss",
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        prediction_loss_only=True,
        report_to=report_to,
        seed=fcfg.seed,
        data_seed=fcfg.seed,
        use_cpu=not cuda,
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        ddp_backend=None if cuda or not dist.distributed else "gloo",
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
        **fsdp,
    )


def training_mode(trainer: Any, dist: DistInfo) -> str:
    """What accelerate set up: fsdp, ddp or single."""
    return "fsdp" if trainer.is_fsdp_enabled else ("ddp" if dist.distributed else "single")


def gather_rank_counts(trainer: Any, dist: DistInfo) -> list[dict[str, int]]:
    """Batches and tokens each rank trained on in this session (proof that every rank took part)."""
    import torch.distributed as tdist

    mine = {"rank": dist.rank, "batches": trainer.batches_seen, "tokens": trainer.tokens_seen}
    if not (dist.distributed and tdist.is_available() and tdist.is_initialized()):
        return [mine]
    gathered: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(gathered, mine)
    return gathered
