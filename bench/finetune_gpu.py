"""Fine-tuning on a GPU: doctune's training step on a random Llama-3-8B-shaped model, tokens/s and MFU.

A random LlamaForCausalLM with Llama-3-8B's shape (hidden 4096, 32 layers, 32 heads / 8 KV heads, MLP 14336,
vocab 128256; ~8.0B parameters) in bf16 on one CUDA GPU, LoRA r 16 (alpha 32, every linear layer but the head),
padding-free rows of `--samples` sequences of `--seq` tokens (2048) laid end to end with position_ids restarting
at every sequence, attention kept per sequence (flash_attention_2 when installed, else doctune's varlen SDPA),
loss and lm_head on the second half of each sequence only (the "assistant" tokens), AdamW on the LoRA weights:
the step doctune's Trainer takes. `--warmup` steps are not timed, then `--steps` are.

Model FLOPs per trained token, counted as done (the base weights are frozen, so the backward pass computes input
gradients only, no weight gradients for them):
  linear:    2 * N_linear (forward) + 2 * N_linear (input-gradient backward); N_linear: the decoder's matmul weights
  lm_head:   (2 + 2) * hidden * vocab, on the loss tokens only
  attention: causal, per sequence: forward 2 * 2 * layers * hidden * (L + 1) / 2 per token; backward 2x forward
  LoRA:      2 * r * (in + out) per adapted layer forward, 3x that for forward + backward
MFU = counted FLOP/s / peak. Peak: `--peak-tflops`, default 989 (H100/H200 SXM bf16 dense, no sparsity).
The "6N" convention's figure (6 * all parameters per token, as if the whole model were trained) is printed too.
Target: 40% MFU. Fits a few minutes: model init ~1 min, 3 + 8 steps of 4k tokens (activations ~30 GB per 2k-token
sequence: no gradient checkpointing).

    python bench/finetune_gpu.py                  # prints a table, writes bench/results/finetune_gpu.json
    python bench/finetune_gpu.py --steps 4 --samples 1     # quicker, less memory
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_gpu.json"
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def counted_flops_per_step(
    cfg: dict, seq: int, samples: int, rank: int, loss_tokens: int
) -> tuple[float, float]:
    """(FLOPs one step does as counted in the docstring, the 6N figure) for `samples` sequences of `seq`."""
    h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    per_layer_shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]
    n_linear = layers * sum(i * o for i, o in per_layer_shapes)
    n_lora = layers * sum(rank * (i + o) for i, o in per_layer_shapes)
    tokens = seq * samples
    linear = 4 * n_linear * tokens
    lora = 3 * 2 * n_lora * tokens
    head = 4 * h * cfg["vocab_size"] * loss_tokens
    attn_fwd = samples * 2 * 2 * layers * h * seq * (seq + 1) / 2
    attention = 3 * attn_fwd
    n_all = n_linear + 2 * h * cfg["vocab_size"]
    return linear + lora + head + attention, 6 * n_all * tokens


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    parser.add_argument(
        "--samples", type=int, default=4, help="sequences per padding-free row (one row a step)"
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA r")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(
            "bench/finetune_gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine"
        )
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import is_flash_attn_2_available

    from doctune.finetune import attention
    from doctune.finetune.data import flatten_batch

    torch.manual_seed(0)
    attn = "flash_attention_2" if is_flash_attn_2_available() else attention.register()
    config = LlamaConfig(**LLAMA3_8B, use_cache=False)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.set_attn_implementation(attn)
    init_s = time.perf_counter() - t0
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules=TARGETS)
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(args.samples):
        ids = torch.randint(0, config.vocab_size, (args.seq,), generator=gen).tolist()
        labels = [-100] * (args.seq // 2) + ids[args.seq // 2 :]
        samples.append({"input_ids": ids, "labels": labels})
    batch = {k: v.cuda() for k, v in flatten_batch(samples).items()}
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != -100
    wanted = targets[targets != -100]
    loss_tokens = int(keep.sum())

    def step() -> float:
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], logits_to_keep=keep)
        loss = torch.nn.functional.cross_entropy(out.logits.float(), wanted)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    try:
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = [step() for _ in range(args.steps)]
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError:
        print(
            f"bench/finetune_gpu.py: out of GPU memory with --samples {args.samples} x --seq {args.seq}; use fewer"
        )
        return 3

    tokens = args.seq * args.samples * args.steps
    counted, six_n = counted_flops_per_step(LLAMA3_8B, args.seq, args.samples, args.rank, loss_tokens)
    peak = args.peak_tflops * 1e12
    result = {
        "benchmark": "finetune_gpu",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": torch.cuda.get_device_name(0),
        "attention": attn,
        "model": "random Llama-3-8B shape, bf16",
        "parameters": sum(p.numel() for p in model.parameters()),
        "lora_parameters": sum(p.numel() for p in params),
        "seq": args.seq,
        "samples_per_row": args.samples,
        "steps": args.steps,
        "init_s": round(init_s, 1),
        "step_s": round(elapsed / args.steps, 4),
        "tokens_per_s": round(tokens / elapsed, 1),
        "peak_tflops": args.peak_tflops,
        "mfu_counted": round(counted * args.steps / elapsed / peak, 4),
        "mfu_6n_convention": round(six_n * args.steps / elapsed / peak, 4),
        "target_mfu": 0.40,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "losses": [round(x, 4) for x in losses],
    }
    result["target_met"] = result["mfu_counted"] >= result["target_mfu"]
    for key in (
        "gpu",
        "attention",
        "step_s",
        "tokens_per_s",
        "mfu_counted",
        "mfu_6n_convention",
        "peak_memory_gib",
    ):
        print(f"{key:<20}{result[key]}")
    print(
        f"target 40% MFU (counted FLOPs, peak {args.peak_tflops:g} TFLOP/s): "
        f"{'met' if result['target_met'] else 'NOT met'}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
