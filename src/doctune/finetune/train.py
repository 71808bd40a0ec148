"""`doctune finetune`: train.jsonl + val.jsonl + the student → a LoRA adapter in {run_dir}/adapter.

transformers' Trainer + PEFT LoRA (plain Trainer, not TRL's SFTTrainer: faster in bench/finetune.py, and doctune
does the chat rendering and masking itself). `run` reads top to bottom:

- setup (`_setup`): check the settings against the hardware, render every conversation with the student's chat
  template (data.py: assistant-only labels), load the student through doctune.models (a folder, a .gguf file or
  a hub name; + 4/8-bit quantization on CUDA), add LoRA or continue an adapter; `_build_trainer` makes a Trainer
  (trainer.py) whose batches are padding-free rows (attention.py keeps samples apart);
- work (`_train`): train with validation loss every `eval_steps` and at the end, checkpoints for `--resume`;
- write (`_write`, outputs.py): the adapter `finetune.select` chooses in the output dir (val_loss: the
  lowest-val-loss step's, the default; last: the last step's), the other in `last/` or `best/`, each with the
  tokenizer and chat template, plus metrics.json, doctune_finetune.json and the manifest entry.

Layout of the output dir (default {run_dir}/adapter; doctune.adapters.AdapterDir names each file):
  adapter_config.json, adapter_model.safetensors   the chosen adapter: PeftModel / vLLM --lora-modules
  tokenizer files, chat_template.jinja              the template the adapter was trained with
  doctune_finetune.json, metrics.json               what was trained, how, and how it went
  last/ (select val_loss) or best/ (select last)    the other adapter (same files)
  checkpoints/checkpoint-N/                         Trainer checkpoints (optimizer, scheduler, RNG) for --resume
  tensorboard/                                      TensorBoard logs (report_to: [tensorboard])
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doctune import models
from doctune.adapters import ADAPTER_CONFIG, CHECKPOINTS_DIR, FINETUNE_INFO, TRAINER_STATE, AdapterDir
from doctune.config import Config, FinetuneConfig
from doctune.errors import ConfigError, DoctuneError, InputError
from doctune.finetune import data, outputs
from doctune.finetune import trainer as trainer_parts
from doctune.finetune.launch import DistInfo, dist_info
from doctune.reporting import NullProgress, Progress, Summary
from doctune.runs import RunDir, check_output_dir, make_dir, mark_output_dir

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
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
    """Complete Trainer checkpoints in `folder`, oldest first (see `checkpoint_complete`)."""
    return [path for path in _checkpoint_dirs(folder) if checkpoint_complete(path)]


def _checkpoint_dirs(folder: Path) -> list[Path]:
    """Every checkpoint-N folder in `folder`, complete or not, by step."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def checkpoint_complete(path: Path) -> bool:
    """Whether the Trainer finished writing checkpoint `path`. trainer_state.json is the last file a checkpoint
    gets (written in place, not renamed): a kill during the save leaves it missing or cut short. The adapter
    weights must also be whole (a safetensors file that covers its header's tensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        with safe_open(str(AdapterDir(path).weights), framework="pt") as f:
            f.keys()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError):
        return False
    return isinstance(state, dict) and "global_step" in state


def _resume_point(
    out: AdapterDir, resume: bool, overwrite: bool, from_adapter: AdapterDir | None
) -> Path | None:
    if resume and from_adapter is not None:
        raise DoctuneError(
            "--resume continues the interrupted run in the output dir, --from-adapter starts a new one from an "
            "adapter: pass only one"
        )
    existing = checkpoints(out.checkpoints)
    if resume:
        if not existing:
            log.warning("--resume: no complete checkpoint in %s; training from the start", out.checkpoints)
            return None
        return existing[-1]
    if (existing or out.info_file.exists()) and not overwrite:
        raise DoctuneError(
            f"{out.path}: holds an adapter or checkpoints of an earlier run; pass --resume to continue it, "
            "--overwrite to start over, or --output-dir for a new folder"
        )
    return None


def _discard_incomplete_checkpoints(out: AdapterDir) -> None:
    """Remove the checkpoints a killed run left half-written: the Trainer writes them again, and its rotation
    must not count one as a checkpoint meanwhile."""
    for path in _checkpoint_dirs(out.checkpoints):
        if not checkpoint_complete(path):
            log.warning("%s: cut short (the run was stopped while saving it); removed", path)
            shutil.rmtree(path, ignore_errors=True)


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
    source: str,
    dtype: Any,
    fcfg: FinetuneConfig,
    hw: Hardware,
    dist: DistInfo,
    from_adapter: AdapterDir | None,
) -> tuple[Any, str]:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from doctune.finetune import attention, dropout

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
            model = models.load_adapter(model, from_adapter.path, is_trainable=True, base=source)
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
    if not hw.cuda:  # torch's dropout draws a random number per element: on a CPU, most of its time
        log.debug("LoRA dropout: %d layers use finetune.dropout.BulkDropout", dropout.use_bulk_dropout(model))
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
    t0 = time.perf_counter()
    # ---- setup
    setup = _setup(cfg, output_dir, resume, from_adapter, overwrite)
    trainer = _build_trainer(setup, progress)
    # ---- work
    result = _train(trainer, setup.checkpoint, progress)
    # ---- write
    return _write(setup, trainer, result, t0)


@dataclass
class Setup:
    """What `run` sets up before training: where it writes, what it resumes, the data and the model."""

    cfg: Config
    out: AdapterDir
    from_adapter: AdapterDir | None
    checkpoint: Path | None  # resumed from
    dist: DistInfo
    hw: Hardware
    source: str  # the student as models.load_* take it
    tokenizer: Any
    template_source: str
    train: Split
    val: Split
    warnings: list[str]
    dtype: Any
    model: Any
    attention: str

    @property
    def mode_info(self) -> dict[str, Any]:
        return {
            "device": "cuda" if self.hw.cuda else "cpu",
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.attention,
        }


def _setup(
    cfg: Config, output_dir: str | Path | None, resume: bool, from_adapter: str | Path | None, overwrite: bool
) -> Setup:
    fcfg = cfg.finetune
    out = AdapterDir(output_dir) if output_dir is not None else cfg.run_folder.adapter
    base_adapter = AdapterDir(from_adapter) if from_adapter is not None else None
    _check_output_dir(cfg, out, base_adapter)  # first: a wrong --output-dir is reported at once
    dist, hw = dist_info(), preflight(cfg)
    checkpoint = _resume_point(out, resume, overwrite, base_adapter)
    if base_adapter is not None and not base_adapter.exists():
        raise InputError(
            f"--from-adapter {base_adapter.path}: no {ADAPTER_CONFIG} there (give an adapter folder)"
        )
    if dist.is_main:
        mark_output_dir(make_dir(out.path), "finetune")
        _discard_incomplete_checkpoints(out)
    source = _student_source(cfg)
    tokenizer, template_source = _load_tokenizer(source, base_adapter)
    train, val, warnings = _load_data(
        cfg.run_folder, tokenizer, fcfg.max_length, cfg.models[fcfg.model].model
    )

    from transformers import set_seed

    set_seed(fcfg.seed)
    dtype = models.resolve_dtype(cfg.models[fcfg.model].dtype, "cuda" if hw.cuda else "cpu")
    model, attention = _load_student(source, dtype, fcfg, hw, dist, base_adapter)
    if overwrite and dist.is_main:
        shutil.rmtree(out.checkpoints, ignore_errors=True)
    return Setup(
        cfg=cfg,
        out=out,
        from_adapter=base_adapter,
        checkpoint=checkpoint,
        dist=dist,
        hw=hw,
        source=source,
        tokenizer=tokenizer,
        template_source=template_source,
        train=train,
        val=val,
        warnings=warnings,
        dtype=dtype,
        model=model,
        attention=attention,
    )


def _check_output_dir(cfg: Config, out: AdapterDir, from_adapter: AdapterDir | None) -> None:
    check_output_dir(
        out.path,
        "--output-dir",
        keep=[cfg.base_dir, *([from_adapter.path] if from_adapter is not None else [])],
        # ingest skips the run dir, also inside the data folder; anywhere else there, it would read the adapter
        not_inside=[] if cfg.run_path.resolve() in out.path.resolve().parents else [cfg.path(cfg.data.dir)],
        ours=[FINETUNE_INFO, CHECKPOINTS_DIR],
    )


def _student_source(cfg: Config) -> str:
    model_cfg = cfg.models[cfg.finetune.model]
    if model_cfg.adapter is not None:
        log.warning(
            "models.%s.adapter is ignored by finetune; use --from-adapter to continue an adapter",
            cfg.finetune.model,
        )
    return cfg.model_source(model_cfg.model)


def _load_tokenizer(source: str, from_adapter: AdapterDir | None) -> tuple[Any, str]:
    """The tokenizer (the adapter's when it was saved with one) with its training chat template set, and where
    that template came from."""
    tokenizer_source = source
    if from_adapter is not None and from_adapter.has_tokenizer():
        tokenizer_source = str(from_adapter.path)
    try:
        tokenizer = models.load_tokenizer(tokenizer_source)
    except InputError as exc:
        raise InputError(f"finetune.model: {exc}") from None
    template, template_source = data.training_template(tokenizer)
    tokenizer.chat_template = template
    return tokenizer, template_source


def _load_data(
    run: RunDir, tokenizer: Any, max_length: int, model_name: str
) -> tuple[Split, Split, list[str]]:
    """train.jsonl and val.jsonl tokenized (val may be missing), and the warnings for the summary."""
    template = tokenizer.chat_template
    train = _load_split("train", run.train, tokenizer, template, max_length)
    val = (
        _load_split("val", run.val, tokenizer, template, max_length)
        if run.val.is_file()
        else Split("val", run.val, [], [], 0, [])
    )
    for problem in train.problems + val.problems:
        log.warning(problem)
    if not train.samples:
        first = train.problems[0] if train.problems else "the file has no conversations"
        raise InputError(f"{train.path}: no usable conversation ({first})")
    warnings = _template_warnings(tokenizer, template, model_name)
    if not val.samples:
        warnings.append(f"{run.val}: no validation conversations; no val loss, the last adapter is the best")
    return train, val, warnings


def _build_trainer(s: Setup, progress: Progress) -> Any:
    from transformers import PrinterCallback

    fcfg = s.cfg.finetune
    callbacks = [trainer_parts.progress_callback(progress)]
    if "tensorboard" in fcfg.report_to and s.dist.is_main:
        callbacks.append(trainer_parts.tensorboard_callback(s.out.path / TENSORBOARD_DIR))
    trainer = trainer_parts.make_trainer_class()(
        model=s.model,
        args=trainer_parts.training_args(
            fcfg, s.out.checkpoints, cuda=s.hw.cuda, dist=s.dist, has_val=bool(s.val.samples), dtype=s.dtype
        ),
        train_dataset=_items(s.train.samples, fcfg.packing, fcfg.max_length),
        eval_dataset=_items(s.val.samples, fcfg.packing, fcfg.max_length) if s.val.samples else None,
        data_collator=data.FlatCollator(),
        processing_class=s.tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log line; doctune's Progress shows them
    trainer.logits_mask = trainer_parts.accepts_logits_mask(s.model)
    mode = trainer_parts.training_mode(trainer, s.dist)
    if fcfg.fsdp is not None and mode != "fsdp":
        raise ConfigError(
            [
                f"finetune.fsdp: {fcfg.fsdp!r} was asked for but accelerate set up {mode}; check the accelerate config"
            ],
            source="finetune",
        )
    log.info(
        "rank %d/%d: %s training on %s (%s, attention %s), %d train / %d val samples",
        s.dist.rank,
        s.dist.world_size,
        mode,
        *s.mode_info.values(),
        len(s.train.samples),
        len(s.val.samples),
    )
    return trainer


def _train(trainer: Any, checkpoint: Path | None, progress: Progress) -> Any:
    try:
        return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        progress.finish()


def _write(s: Setup, trainer: Any, result: Any, t0: float) -> Summary:
    """Every rank saves the chosen adapter (FSDP gathers) and reports its counts; rank 0 writes the outputs."""
    staging = outputs.stage_chosen(trainer, s.out, s.dist)
    ranks = trainer_parts.gather_rank_counts(trainer, s.dist)
    summary = Summary(title="finetune")
    if s.dist.is_main:
        setup = {
            "mode": trainer_parts.training_mode(trainer, s.dist),
            "world_size": s.dist.world_size,
            **s.mode_info,
            "ranks": ranks,
        }
        summary = outputs.write(
            outputs.Trained(
                cfg=s.cfg,
                out=s.out,
                staging=staging,
                state=trainer.state,
                result_metrics=result.metrics,
                lora=trainer.model.peft_config["default"],
                train=s.train,
                val=s.val,
                source=s.source,
                from_adapter=s.from_adapter,
                checkpoint=s.checkpoint,
                template_source=s.template_source,
                setup=setup,
                warnings=s.warnings,
                wall_s=time.perf_counter() - t0,
            )
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
