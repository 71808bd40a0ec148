"""The adapter folder `doctune finetune` writes, as one object: its files, its info file and what it records.

```python
from doctune.adapters import AdapterDir
adapter = AdapterDir("runs/x/adapter").checked()     # one-line InputError unless it is a PEFT adapter folder
adapter.base_model(), adapter.system_prompt()        # from doctune_finetune.json (else adapter_config.json)
```

An adapter trained elsewhere (PEFT only, no doctune_finetune.json) is fine: it records no system prompt and its
base model comes from adapter_config.json. An info file that is not a JSON object is one InputError, the same
for every command that reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from doctune.errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FINETUNE_INFO = "doctune_finetune.json"
CHAT_TEMPLATE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
METRICS = "metrics.json"
README = "README.md"
LAST_DIR = "last"
BEST_DIR = "best"
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # in every complete Trainer checkpoint


class AdapterDir:
    """A LoRA adapter folder: PEFT's files plus what `doctune finetune` writes beside them."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.config = self.path / ADAPTER_CONFIG
        self.info_file = self.path / FINETUNE_INFO
        self.metrics = self.path / METRICS
        self.chat_template = self.path / CHAT_TEMPLATE
        self.tokenizer_config = self.path / TOKENIZER_CONFIG
        self.readme = self.path / README
        self.last = self.path / LAST_DIR  # the other of best/last that was not installed (see finetune)
        self.best = self.path / BEST_DIR
        self.checkpoints = self.path / CHECKPOINTS_DIR

    def __repr__(self) -> str:
        return f"AdapterDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def weights(self) -> Path:
        """The weights file: safetensors, else an old-style .bin; the safetensors name when neither exists."""
        for name in ADAPTER_WEIGHTS:
            if (self.path / name).is_file():
                return self.path / name
        return self.path / ADAPTER_WEIGHTS[0]

    def exists(self) -> bool:
        return self.config.is_file()

    def has_tokenizer(self) -> bool:
        """Whether the tokenizer was saved with the adapter (then it wins over the base model's)."""
        return self.tokenizer_config.is_file()

    def checked(self, reference: str | Path | None = None) -> AdapterDir:
        """This folder, checked to be a PEFT adapter (adapter_config.json that is JSON, weights beside it).
        `reference`: how the user named it, for the error line."""
        shown = reference if reference is not None else self.path
        if not self.config.is_file():
            why = "not a PEFT adapter folder" if self.path.is_dir() else "the folder does not exist"
            raise InputError(
                f"adapter {shown}: no {ADAPTER_CONFIG} there ({why}); give the adapter/ folder that "
                "`doctune finetune` writes"
            )
        try:
            json.loads(self.config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"adapter {self.config}: cannot load, not valid JSON ({exc})") from None
        if not self.weights.is_file():
            raise InputError(f"adapter {shown}: no {ADAPTER_WEIGHTS[0]} there (the adapter has no weights)")
        return self

    def info(self) -> dict[str, Any]:
        """doctune_finetune.json as a dict; {} when the adapter was not trained by doctune."""
        return _json_object(self.info_file, "run `doctune finetune` again to write it")

    def system_prompt(self) -> str | None:
        """The system prompt the adapter was trained with, if doctune trained it."""
        prompt = self.info().get("system_prompt")
        return prompt if isinstance(prompt, str) and prompt else None

    def base_model(self) -> str | None:
        """The base model it was trained on: doctune_finetune.json's `base_model` (the user's reference), else
        adapter_config.json's `base_model_name_or_path`; None when neither names one."""
        for file, key in ((self.info_file, "base_model"), (self.config, "base_model_name_or_path")):
            value = _json_object(file, "run `doctune finetune` again").get(key)
            if value:
                return str(value)
        return None


def _json_object(path: Path, fix: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: not a JSON object; {fix}")
    return value
