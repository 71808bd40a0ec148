"""`doctune finetune`: train.jsonl + val.jsonl + the student → a LoRA adapter in {run_dir}/adapter.

transformers' Trainer + PEFT LoRA (plain Trainer, not TRL's SFTTrainer: faster in bench/finetune.py, and doctune
does the chat rendering and masking itself). Reads top to bottom:

- setup: check the settings against the hardware, render every conversation with the student's chat template
  (data.py: assistant-only labels), load the student through doctune.models (a folder, a .gguf file or a hub
  name; + 4/8-bit quantization on CUDA), add LoRA or continue an adapter, build a Trainer whose batches are
  padding-free rows (attention.py keeps samples apart);
- run: train with validation loss every `eval_steps` and at the end, checkpoints for `--resume`;
- write: the adapter `finetune.select` chooses in the output dir (val_loss: the lowest-val-loss step's, the
  default; last: the last step's), the other in `last/` or `best/`, each with the tokenizer and chat template,
  plus metrics.json, doctune_finetune.json and the manifest entry.

Layout of the output dir (default {run_dir}/adapter):
  adapter_config.json, adapter_model.safetensors   the chosen adapter: PeftModel / vLLM --lora-modules
  tokenizer files, chat_template.jinja              the template the adapter was trained with
  doctune_finetune.json, metrics.json               what was trained, how, and how it went
  last/ (select val_loss) or best/ (select last)    the other adapter (same files)
  checkpoints/checkpoint-N/                         Trainer checkpoints (optimizer, scheduler, RNG) for --resume
  tensorboard/                                      TensorBoard logs (report_to: [tensorboard])
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doctune import models
from doctune.config import Config, FinetuneConfig
from doctune.errors import ConfigError, DoctuneError, InputError
from doctune.finetune import data
from doctune.finetune.launch import DistInfo, dist_info
from doctune.reporting import NullProgress, Progress, Summary
from doctune.runs import (
    RunDir,
    StageRecord,
    atomic_write_json,
    check_output_dir,
    make_dir,
    mark_output_dir,
    sha256_file,
)

log = logging.getLogger(__name__)

INFO_FILE = "doctune_finetune.json"
METRICS_FILE = "metrics.json"
LAST_DIR = "last"
BEST_DIR = "best"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------- settings vs hardware


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    bf16: bool
    bitsandbytes: bool
    flash_attention: bool


def detect_hardware() -> Hardware:
    import torch
    from transformers.utils import is_flash_attn_2_available

    cuda = torch.cuda.is_available()
    return Hardware(
        cuda=cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
        flash_attention=cuda and is_flash_attn_2_available(),
    )


# transformers' report_to integrations that doctune's users may name, and "none"
KNOWN_REPORTERS = ("none", "tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "trackio", "swanlab")


def settings_problems(fcfg: FinetuneConfig, hw: Hardware) -> list[str]:
    """One line per finetune setting this machine cannot honour (nothing is silently replaced)."""
    problems = []
    if fcfg.quantization is not None:
        if not hw.cuda:
            problems.append(
                f"finetune.quantization: {fcfg.quantization!r} (QLoRA via bitsandbytes) needs a CUDA GPU and this "
                "machine has none; set finetune.quantization: null to train unquantized here"
            )
        elif not hw.bitsandbytes:
            problems.append(
                f"finetune.quantization: {fcfg.quantization!r} needs bitsandbytes: `pip install bitsandbytes`, "
                "or set finetune.quantization: null"
            )
    if fcfg.fsdp is not None:
        if not hw.cuda:
            problems.append(
                f"finetune.fsdp: {fcfg.fsdp!r} needs CUDA GPUs (on CPU accelerate would silently run DDP instead); "
                "set finetune.fsdp: null to run DDP"
            )
        if fcfg.quantization is not None:
            problems.append(
                "finetune.fsdp: FSDP with finetune.quantization is not supported; use one of the two"
            )
    for name in fcfg.report_to:
        if name not in ("none", "tensorboard") and importlib.util.find_spec(name) is None:
            problems.append(
                f"finetune.report_to: {name!r} is not installed (`pip install {name}`) or remove it"
                if name in KNOWN_REPORTERS
                else f"finetune.report_to: {name!r} is not a logger doctune knows (allowed: "
                f"{', '.join(KNOWN_REPORTERS)})"
            )
    return problems


def preflight(cfg: Config) -> Hardware:
    """Check the finetune settings against this machine before anything is loaded; ConfigError if one fails."""
    hw = detect_hardware()
    problems = settings_problems(cfg.finetune, hw)
    if problems:
        raise ConfigError(problems, source="finetune")
    return hw


def quantization_config(kind: str, compute_dtype: Any) -> Any:
    """transformers' BitsAndBytesConfig for `finetune.quantization` (QLoRA: 4-bit NF4 with double quantization)."""
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError([f"finetune.quantization: {kind!r} is not one of 4bit, 8bit, null"], source="finetune")


# ---------------------------------------------------------------- checkpoints


def checkpoints(folder: Path) -> list[Path]:
    """Complete Trainer checkpoints in `folder`, oldest first. trainer_state.json is the last file a checkpoint
    gets, so a checkpoint cut short by a kill is not counted."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _resume_point(out: Path, resume: bool, overwrite: bool, from_adapter: Path | None) -> Path | None:
    if resume and from_adapter is not None:
        raise DoctuneError(
            "--resume continues the interrupted run in the output dir, --from-adapter starts a new one from an "
            "adapter: pass only one"
        )
    existing = checkpoints(out / CHECKPOINTS_DIR)
    if resume:
        if not existing:
            log.warning(
                "--resume: no complete checkpoint in %s; training from the start", out / CHECKPOINTS_DIR
            )
            return None
        return existing[-1]
    if (existing or (out / INFO_FILE).exists()) and not overwrite:
        raise DoctuneError(
            f"{out}: holds an adapter or checkpoints of an earlier run; pass --resume to continue it, "
            "--overwrite to start over, or --output-dir for a new folder"
        )
    return None


# ---------------------------------------------------------------- data


@dataclass
class Split:
    name: str
    path: Path
    samples: list[dict[str, Any]]
    problems: list[str]
    truncated: int
    conversations: list[list[dict[str, str]]]

    @property
    def tokens(self) -> int:
        return sum(len(s["input_ids"]) for s in self.samples)

    @property
    def trained_tokens(self) -> int:
        return sum(data.n_trained(s) for s in self.samples)


def _load_split(name: str, path: Path, tokenizer: Any, template: str, max_length: int) -> Split:
    from jinja2 import TemplateError

    read = data.read_conversations(path)
    samples, problems, truncated = [], list(read.problems), 0
    for i, messages in enumerate(read.conversations):
        try:
            sample = data.tokenize_conversation(tokenizer, messages, template, max_length)
        except (TemplateError, ValueError) as exc:
            problems.append(f"{path.name}: conversation {i + 1}: chat template failed ({exc}); skipped")
            continue
        if data.n_trained(sample) == 0:
            problems.append(
                f"{path.name}: conversation {i + 1}: no assistant token within finetune.max_length="
                f"{max_length}; skipped"
            )
            continue
        truncated += sample.pop("truncated")
        samples.append(sample)
    return Split(name, path, samples, problems, truncated, read.conversations)


def _items(samples: list[dict[str, Any]], packing: bool, max_length: int) -> list[dict[str, Any]]:
    """Dataset items: one per sample, or with packing one per row of samples filling up to max_length tokens."""
    if not packing:
        return samples
    rows = data.pack_samples([len(s["input_ids"]) for s in samples], max_length)
    return [{"samples": [samples[i] for i in row]} for row in rows]


# ---------------------------------------------------------------- model


def _load_student(
    source: str, dtype: Any, fcfg: FinetuneConfig, hw: Hardware, dist: DistInfo, from_adapter: Path | None
) -> tuple[Any, str]:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from doctune.finetune import attention

    kwargs: dict[str, Any] = {}
    if fcfg.quantization is not None:
        kwargs["quantization_config"] = quantization_config(fcfg.quantization, dtype)
        kwargs["device_map"] = {"": dist.local_rank}
    try:  # placed by Trainer, or by device_map when quantized
        model = models.load_causal_lm(source, dtype=dtype, device=None, **kwargs)
    except InputError as exc:
        raise InputError(f"finetune.model: {exc}") from None
    model.config.use_cache = False
    if fcfg.quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # Padding-free rows need attention that keeps samples apart: flash-attention's varlen kernels on CUDA when
    # installed, else doctune's per-sample SDPA.
    attn = "flash_attention_2" if hw.flash_attention else attention.register()
    model.set_attn_implementation(attn)

    if from_adapter is not None:
        try:
            model = models.load_adapter(model, from_adapter, is_trainable=True, base=source)
        except InputError as exc:
            raise InputError(f"--from-adapter: {exc}") from None
    else:
        lora = fcfg.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=linear_layer_names(model)
                if lora.target_modules == "all-linear"
                else lora.target_modules,
                bias="none",
                task_type="CAUSAL_LM",
            ),
        )
    return model, attn


def linear_layer_names(model: Any) -> list[str]:
    """`all-linear` as the module names adapters usually list (q_proj, ..., down_proj): every linear layer but
    the output head. PEFT's own `all-linear` would store one full path per layer in adapter_config.json, which
    some adapter loaders (older vLLM) reject."""
    import torch

    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )


def _accepts_logits_mask(model: Any) -> bool:
    """Whether the model's forward slices hidden states with a boolean `logits_to_keep` (transformers 5 models
    do through `slice_logits_to_keep`); if not, logits are computed everywhere and selected after."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules.get(type(base).__module__)
    try:
        return module is not None and "slice_logits_to_keep" in inspect.getsource(module)
    except (OSError, TypeError):
        return False


# ---------------------------------------------------------------- trainer


def _make_trainer_class() -> type:
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


def _progress_callback(progress: Progress) -> Any:
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Feeds doctune's Progress: one step per optimizer step, with train loss, val loss and tokens/s."""

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


def _training_args(
    fcfg: FinetuneConfig, out: Path, hw: Hardware, dist: DistInfo, has_val: bool, dtype: Any
) -> Any:
    import torch
    from transformers import TrainingArguments

    report_to = [r for r in fcfg.report_to if r not in ("none", "tensorboard")] or "none"
    fsdp: dict[str, Any] = {}
    if fcfg.fsdp is not None:
        fsdp = {"fsdp": f"{fcfg.fsdp} auto_wrap", "fsdp_config": {"state_dict_type": "FULL_STATE_DICT"}}
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS_DIR),
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
        use_cpu=not hw.cuda,
        bf16=hw.cuda and dtype == torch.bfloat16,
        fp16=hw.cuda and dtype == torch.float16,
        ddp_backend=None if hw.cuda or not dist.distributed else "gloo",
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
        **fsdp,
    )


# ---------------------------------------------------------------- the stage


def run(
    cfg: Config,
    *,
    progress: Progress = NullProgress(),
    output_dir: str | Path | None = None,
    resume: bool = False,
    from_adapter: str | Path | None = None,
    overwrite: bool = False,
) -> Summary:
    """Fine-tune the student on {run_dir}/train.jsonl (validated on val.jsonl) into `output_dir`
    (default {run_dir}/adapter). `resume`: continue from the last checkpoint there. `from_adapter`: continue
    training that adapter instead of a new LoRA. `overwrite`: replace an earlier run's adapter and checkpoints."""
    # ---- setup
    t0 = time.perf_counter()
    fcfg = cfg.finetune
    model_cfg = cfg.models[fcfg.model]
    out = Path(output_dir) if output_dir is not None else cfg.run_path / "adapter"
    from_adapter = Path(from_adapter) if from_adapter is not None else None
    check_output_dir(  # first: a wrong --output-dir is reported at once
        out,
        "--output-dir",
        keep=[cfg.base_dir, *([from_adapter] if from_adapter else [])],
        # ingest skips the run dir, also inside the data folder; anywhere else there, it would read the adapter
        not_inside=[] if cfg.run_path.resolve() in out.resolve().parents else [cfg.path(cfg.data.dir)],
        ours=[INFO_FILE, CHECKPOINTS_DIR],
    )
    from transformers import PrinterCallback, set_seed

    dist = dist_info()
    hw = preflight(cfg)
    checkpoint = _resume_point(out, resume, overwrite, from_adapter)
    if from_adapter is not None and not (from_adapter / "adapter_config.json").is_file():
        raise InputError(
            f"--from-adapter {from_adapter}: no adapter_config.json there (give an adapter folder)"
        )
    if dist.is_main:
        mark_output_dir(make_dir(out), "finetune")
    source = cfg.model_source(model_cfg.model)
    if model_cfg.adapter is not None:
        log.warning(
            "models.%s.adapter is ignored by finetune; use --from-adapter to continue an adapter", fcfg.model
        )

    has_tokenizer = from_adapter is not None and (from_adapter / "tokenizer_config.json").is_file()
    tokenizer_source = str(from_adapter) if has_tokenizer else source
    try:
        tokenizer = models.load_tokenizer(tokenizer_source)
    except InputError as exc:
        raise InputError(f"finetune.model: {exc}") from None
    template, template_source = data.training_template(tokenizer)
    tokenizer.chat_template = template

    train = _load_split("train", cfg.run_path / "train.jsonl", tokenizer, template, fcfg.max_length)
    val_path = cfg.run_path / "val.jsonl"
    val = (
        _load_split("val", val_path, tokenizer, template, fcfg.max_length)
        if val_path.is_file()
        else Split("val", val_path, [], [], 0, [])
    )
    for problem in train.problems + val.problems:
        log.warning(problem)
    if not train.samples:
        first = train.problems[0] if train.problems else "the file has no conversations"
        raise InputError(f"{train.path}: no usable conversation ({first})")
    warnings = _template_warnings(tokenizer, template, model_cfg.model)
    if not val.samples:
        warnings.append(f"{val_path}: no validation conversations; no val loss, the last adapter is the best")

    set_seed(fcfg.seed)
    dtype = models.resolve_dtype(model_cfg.dtype, "cuda" if hw.cuda else "cpu")
    model, attn = _load_student(source, dtype, fcfg, hw, dist, from_adapter)
    trainer_cls = _make_trainer_class()
    callbacks = [_progress_callback(progress)]
    if "tensorboard" in fcfg.report_to and dist.is_main:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))))
    if overwrite and dist.is_main:
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
    trainer = trainer_cls(
        model=model,
        args=_training_args(fcfg, out, hw, dist, bool(val.samples), dtype),
        train_dataset=_items(train.samples, fcfg.packing, fcfg.max_length),
        eval_dataset=_items(val.samples, fcfg.packing, fcfg.max_length) if val.samples else None,
        data_collator=data.FlatCollator(),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log line; doctune's Progress shows them
    trainer.logits_mask = _accepts_logits_mask(model)
    mode = "fsdp" if trainer.is_fsdp_enabled else ("ddp" if dist.distributed else "single")
    if fcfg.fsdp is not None and mode != "fsdp":
        raise ConfigError(
            [
                f"finetune.fsdp: {fcfg.fsdp!r} was asked for but accelerate set up {mode}; check the accelerate config"
            ],
            source="finetune",
        )
    log.info(
        "rank %d/%d: %s training on %s (%s, attention %s), %d train / %d val samples",
        dist.rank,
        dist.world_size,
        mode,
        "cuda" if hw.cuda else "cpu",
        str(dtype).removeprefix("torch."),
        attn,
        len(train.samples),
        len(val.samples),
    )

    # ---- run
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        progress.finish()
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    staging = out / ".best.partial"
    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every rank takes part (FSDP gathers); rank 0 writes
    ranks = _gather_rank_counts(trainer, dist)
    summary = Summary(title="finetune")
    if dist.is_main:
        summary = _write_outputs(
            cfg=cfg,
            out=out,
            staging=staging,
            trainer=trainer,
            result=result,
            train=train,
            val=val,
            source=source,
            from_adapter=from_adapter,
            checkpoint=checkpoint,
            template_source=template_source,
            info_extra={
                "mode": mode,
                "world_size": dist.world_size,
                "device": "cuda" if hw.cuda else "cpu",
                "dtype": str(dtype).removeprefix("torch."),
                "attention": attn,
                "ranks": ranks,
            },
            warnings=warnings,
            wall_s=time.perf_counter() - t0,
        )
    trainer.accelerator.wait_for_everyone()
    return summary


def _template_warnings(tokenizer: Any, template: str, model_name: str) -> list[str]:
    stop_ids = set()
    for value in (tokenizer.eos_token_id, *getattr(tokenizer, "all_special_ids", [])):
        if isinstance(value, int):
            stop_ids.add(value)
    if data.stop_token_trained(tokenizer, template, stop_ids):
        return []
    return [
        f"the chat template of {model_name!r} does not mark the end-of-turn token as assistant output; the model "
        "may not learn to stop (put it inside {% generation %})"
    ]


def _gather_rank_counts(trainer: Any, dist: DistInfo) -> list[dict[str, int]]:
    """Batches and tokens each rank trained on in this session (proof that every rank took part)."""
    import torch.distributed as tdist

    mine = {"rank": dist.rank, "batches": trainer.batches_seen, "tokens": trainer.tokens_seen}
    if not (dist.distributed and tdist.is_available() and tdist.is_initialized()):
        return [mine]
    gathered: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(gathered, mine)
    return gathered


# ---------------------------------------------------------------- write


def _write_outputs(
    *,
    cfg: Config,
    out: Path,
    staging: Path,
    trainer: Any,
    result: Any,
    train: Split,
    val: Split,
    source: str,
    from_adapter: Path | None,
    checkpoint: Path | None,
    template_source: str,
    info_extra: dict[str, Any],
    warnings: list[str],
    wall_s: float,
) -> Summary:
    fcfg = cfg.finetune
    state = trainer.state
    (staging / "training_args.bin").unlink(missing_ok=True)
    other_dir = _install_other_adapter(out, staging, fcfg.select, state.best_global_step, state.global_step)
    n_tensors = adapter_tensor_count(staging)
    if n_tensors == 0:
        raise DoctuneError(
            f"{staging}: the saved adapter holds no weights (a distributed save went wrong); nothing was replaced "
            f"in {out}, the checkpoints in {out / CHECKPOINTS_DIR} are kept"
        )
    for path in sorted(staging.iterdir()):
        os.replace(path, out / path.name)
    staging.rmdir()

    metrics = training_metrics(state.log_history, state.best_global_step, state.global_step)
    metrics["train_runtime_s"] = round(float(result.metrics.get("train_runtime", 0.0)), 3)
    metrics["train_tokens_per_second"] = result.metrics.get("train_tokens_per_second")
    metrics["num_input_tokens_seen"] = int(state.num_input_tokens_seen)
    atomic_write_json(out / METRICS_FILE, metrics)

    lora = trainer.model.peft_config["default"]
    info = {
        "base_model": source,
        "student": fcfg.model,
        "from_adapter": str(from_adapter) if from_adapter is not None else None,
        "resumed_from": str(checkpoint) if checkpoint is not None else None,
        "system_prompt": data.system_prompt(train.conversations),
        "chat_template": {"file": "chat_template.jinja", "source": template_source},
        "lora": {
            "r": lora.r,
            "alpha": lora.lora_alpha,
            "dropout": lora.lora_dropout,
            "target_modules": sorted(lora.target_modules)
            if isinstance(lora.target_modules, set)
            else lora.target_modules,
        },
        "config": fcfg.model_dump(),
        "data": {
            "train": str(train.path),
            "train_sha256": sha256_file(train.path),
            "val": str(val.path) if val.path.is_file() else None,
            "val_sha256": sha256_file(val.path) if val.path.is_file() else None,
            "train_samples": len(train.samples),
            "val_samples": len(val.samples),
            "skipped": len(train.problems) + len(val.problems),
            "truncated": train.truncated + val.truncated,
            "train_tokens": train.tokens,
            "train_trained_tokens": train.trained_tokens,
        },
        "training": {"steps": state.global_step, "epochs": state.epoch, **info_extra},
        "select": fcfg.select,
        "best": {**metrics["best"], "dir": BEST_DIR if other_dir == BEST_DIR else "."},
        "last": {**metrics["last"], "dir": LAST_DIR if other_dir == LAST_DIR else "."},
        "adapter_tensors": n_tensors,
    }
    atomic_write_json(out / INFO_FILE, info)

    rec = StageRecord(stage="finetune", _t0=time.perf_counter() - wall_s)  # the whole stage, not this step
    rec.add_input(train.path, "train.jsonl")
    if val.path.is_file():
        rec.add_input(val.path, "val.jsonl")
    rec.config = {"finetune": fcfg.model_dump(), "model": cfg.models[fcfg.model].model_dump()}
    rec.counts = {
        "train_samples": len(train.samples),
        "val_samples": len(val.samples),
        "skipped": len(train.problems) + len(val.problems),
        "steps": state.global_step,
    }
    rec.tokens = {"seen": int(state.num_input_tokens_seen), "train_trained": train.trained_tokens}
    rec.notes = {"output_dir": str(out), **{k: v for k, v in info_extra.items() if k != "ranks"}}
    RunDir(cfg.run_path).record(rec)

    summary = Summary(title="finetune")
    summary.add("train samples", len(train.samples))
    summary.add("val samples", len(val.samples))
    if train.problems or val.problems:
        summary.add("skipped conversations", len(train.problems) + len(val.problems))
    summary.add("steps", state.global_step)
    summary.add("mode", f"{info_extra['mode']} x{info_extra['world_size']} on {info_extra['device']}")
    if metrics["last"].get("train_loss") is not None:
        summary.add("train loss (last logged)", round(metrics["last"]["train_loss"], 4))
    best = metrics["best"]
    if best.get("eval_loss") is not None:
        summary.add(
            "best val loss / perplexity",
            f"{best['eval_loss']:.4f} / {best['perplexity']:.2f} (step {best['step']})",
        )
    if metrics["train_tokens_per_second"]:
        summary.add("tokens/s", f"{metrics['train_tokens_per_second']:,.0f}")
    summary.add("seconds", round(wall_s, 1))
    summary.outputs += [str(out), str(out / other_dir), str(out / METRICS_FILE)]
    summary.warnings += warnings
    problems = train.problems + val.problems
    summary.warnings += problems[:5]
    if len(problems) > 5:
        summary.warnings.append(f"... and {len(problems) - 5} more skipped conversations (see the log)")
    return summary


def _install_other_adapter(
    out: Path, staging: Path, select: str, best_step: int | None, last_step: int
) -> str:
    """Copy the adapter that `finetune.select` did not choose into its folder of `out`: the last step's into
    last/ (select val_loss) or the lowest-val-loss step's into best/ (select last), from its checkpoint. The
    chosen one is `staging` (the Trainer's model after training). Returns the folder's name."""
    other_dir, stale_dir = (BEST_DIR, LAST_DIR) if select == "last" else (LAST_DIR, BEST_DIR)
    best_step = best_step if best_step is not None else last_step  # no val loss: the last is the best
    chosen_step, other_step = (last_step, best_step) if select == "last" else (best_step, last_step)
    checkpoint = out / CHECKPOINTS_DIR / f"checkpoint-{other_step}"
    if checkpoint.is_dir():
        _install_adapter_copy(checkpoint, out / other_dir)
    elif other_step == chosen_step:
        _install_adapter_copy(staging, out / other_dir)
    else:
        raise DoctuneError(
            f"{checkpoint}: missing, so {other_dir}/ cannot hold the adapter of step {other_step}; nothing was "
            f"replaced in {out}, the adapter of step {chosen_step} is in {staging}"
        )
    shutil.rmtree(out / stale_dir, ignore_errors=True)  # an earlier run's with the other select
    return other_dir


def _install_adapter_copy(source: Path, target: Path) -> None:
    """Copy an adapter folder's files (not optimizer state) to `target`, swapping it in whole."""
    keep = {"adapter_config.json", ADAPTER_WEIGHTS, "chat_template.jinja", "README.md"}
    partial = target.with_name(f".{target.name}.copy.partial")  # not .best.partial: the staged adapter
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


def adapter_tensor_count(folder: Path) -> int:
    """Tensors in folder/adapter_model.safetensors (0 when missing)."""
    from safetensors import safe_open

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        return 0
    with safe_open(str(path), framework="pt") as f:
        return len(list(f.keys()))


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
