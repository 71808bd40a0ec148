"""Chat data and configs for the finetune tests (tiny model, a few steps)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from doctune.config import Config, build_config

SYSTEM = "You answer questions about the pump manual."
WORDS = [
    "the",
    "pump",
    "valve",
    "must",
    "be",
    "primed",
    "before",
    "use",
    "close",
    "it",
    "after",
    "priming",
    "manual",
    "says",
    "water",
    "pressure",
    "filter",
    "clean",
    "every",
    "month",
    "check",
    "seal",
    "replace",
    "gasket",
]


def conversation(rng: random.Random, i: int) -> dict[str, Any]:
    question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
    answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Question {i}: {question}?"},
            {"role": "assistant", "content": answer},
        ]
    }


def write_chat_data(run_dir: Path, n_train: int, n_val: int, seed: int = 0) -> None:
    """train.jsonl and val.jsonl as curate writes them."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [conversation(rng, i) for i in range(n_train + n_val)]
    (run_dir / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows[:n_train]), encoding="utf-8"
    )
    (run_dir / "val.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows[n_train:]), encoding="utf-8"
    )


def finetune_config(run_dir: Path, model_dir: Path, **finetune: Any) -> Config:
    """A config whose student is `model_dir`; `finetune` overrides finetune.* (small, quick defaults)."""
    section = {"epochs": 2, "batch_size": 4, "eval_steps": 2, "lr": 5e-3, "report_to": ["none"], "seed": 0}
    section.update(finetune)
    raw = {
        "run_dir": str(run_dir),
        "models": {"student": {"backend": "hf", "model": str(model_dir)}},
        "generate": {"model": "student"},
        "curate": {"model": "student"},
        "eval": {"judge": None},
        "finetune": section,
    }
    return build_config(raw, run_dir.parent)


def yaml_config(path: Path, run_dir: Path, model_dir: Path, **finetune: Any) -> Path:
    """The same config as a doctune.yaml (for CLI runs)."""
    import yaml

    section = {"epochs": 2, "batch_size": 4, "eval_steps": 2, "lr": 5e-3, "report_to": ["none"], "seed": 0}
    section.update(finetune)
    raw = {
        "run_dir": str(run_dir),
        "models": {"student": {"backend": "hf", "model": str(model_dir)}},
        "generate": {"model": "student"},
        "curate": {"model": "student"},
        "eval": {"judge": None},
        "finetune": section,
    }
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path
