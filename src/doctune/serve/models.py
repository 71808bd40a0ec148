"""What the server serves: one base model and its LoRA adapters, each under a name.

Like vLLM's `--lora-modules`, a request's `model` picks the base or an adapter; all of them share the base
weights, and one batch may mix them (PEFT's `adapter_names`). Base and adapters load through doctune.models, so
the base may be a folder, a .gguf file or a hub name, and an adapter of another base is refused in one line.

Chat template and system prompt, per served name:
- the base model uses its tokenizer's chat template and no default system prompt;
- an adapter uses the `chat_template.jinja` in its folder when it ships one (the one it was trained with), else
  the base tokenizer's; and when the client sends no system message, the `system_prompt` recorded in the
  folder's `doctune_finetune.json` (the one used in training) is put first.
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doctune.adapters import AdapterDir
from doctune.errors import ConfigError, InputError
from doctune.serve.requests import RequestRejected

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"


@dataclass(frozen=True)
class ServedModel:
    name: str
    adapter: str  # the PEFT adapter name inside the model, or BASE_ADAPTER
    source: str
    chat_template: str | None  # None: the base tokenizer's template
    system_prompt: str | None  # put first when the client sends no system message
    parent: str | None = None


@dataclass
class LoadedModels:
    model: Any
    tokenizer: Any
    served: dict[str, ServedModel]
    uses_peft: bool
    max_context: int
    eos_ids: frozenset[int]

    @property
    def device(self) -> Any:
        return self.model.device


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """`["docs=runs/x/adapter"]` → `{"docs": "runs/x/adapter"}`; a bad item raises ConfigError.

    >>> parse_adapter_specs(["docs=runs/x/adapter"])
    {'docs': 'runs/x/adapter'}
    """
    adapters: dict[str, str] = {}
    problems = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            problems.append(f"--adapter {spec!r}: expected NAME=DIR, e.g. docs=runs/my-chatbot/adapter")
        elif name in adapters:
            problems.append(f"--adapter {spec!r}: the name {name!r} is given twice")
        else:
            adapters[name] = path
    if problems:
        raise ConfigError(problems, source="command line")
    return adapters


def read_adapter(name: str, path: str | Path, adapter: str, parent: str) -> ServedModel:
    """The served entry of one adapter folder: its chat template and training system prompt, if it has them."""
    folder = AdapterDir(path).checked(path)
    template = folder.chat_template.read_text(encoding="utf-8") if folder.chat_template.is_file() else None
    prompt = folder.system_prompt()
    return ServedModel(
        name=name,
        adapter=adapter,
        source=str(folder.path),
        chat_template=template,
        system_prompt=prompt if prompt and prompt.strip() else None,
        parent=parent,
    )


def load_models(
    base: str,
    adapters: dict[str, str] | None = None,
    *,
    served_name: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
) -> LoadedModels:
    """Load the base model (a folder, a .gguf file or a hub name: doctune.models) and every adapter (served
    name → folder); InputError in one line when one of them cannot load or an adapter does not fit the base."""
    from doctune import models

    adapters = adapters or {}
    base_name = served_name or base
    if base_name in adapters:
        raise ConfigError([f"--adapter {base_name}: the base model is already served under that name"])
    served = {base_name: ServedModel(base_name, BASE_ADAPTER, base, None, None)}
    # PEFT adapter names become module attribute names: use safe internal ones, keep the user's for the API.
    for i, (name, path) in enumerate(adapters.items()):
        served[name] = read_adapter(name, path, adapter=f"adapter_{i}", parent=base_name)

    device = models.resolve_device(device)
    ref = models.resolve(base)
    tokenizer = models.load_tokenizer(ref)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None and any(s.chat_template is None for s in served.values()):
        raise InputError(f"{base}: the tokenizer has no chat template; serve a chat (instruct) model")
    model = models.load_causal_lm(ref, dtype=dtype, device=device)

    uses_peft = bool(adapters)
    with warnings.catch_warnings():  # transformers 5 deprecation noise from inside PEFT
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        for entry in (s for s in served.values() if s.adapter != BASE_ADAPTER):
            model = models.load_adapter(model, entry.source, adapter_name=entry.adapter, base=ref)
    model.eval()

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    max_context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    log.info("serving %s on %s (context %d tokens)", ", ".join(served), device, max_context)
    return LoadedModels(model, tokenizer, served, uses_peft, int(max_context), frozenset(eos_ids))


def render_prompt(tokenizer: Any, served: ServedModel, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` in `served`'s chat template, ending where the assistant's answer starts."""
    import jinja2

    if served.system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": served.system_prompt}, *messages]
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=served.chat_template, add_generation_prompt=True, tokenize=False
        )
    except jinja2.TemplateError as exc:
        raise RequestRejected(
            f"messages: the chat template of `{served.name}` refused them: {exc}", param="messages"
        ) from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Grammars:
    """xgrammar JSON grammars for one tokenizer (llm/grammar.py's SchemaGrammars, built on first use), compiled
    once per schema (xgrammar caches them), and the TokenGuard that keeps special tokens and invalid UTF-8 out."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: frozenset[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_ids)
        self._schemas: Any = None
        self._lock = threading.Lock()

    @property
    def schemas(self) -> Any:
        with self._lock:
            if self._schemas is None:
                from doctune.llm.grammar import SchemaGrammars

                self._schemas = SchemaGrammars(
                    self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_ids
                )
            return self._schemas

    @property
    def guard(self) -> Any:
        return self.schemas.guard

    def json_schema(self, schema: dict[str, Any]) -> Any:
        try:
            return self.schemas.compile(schema)
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RequestRejected(
                f"response_format.json_schema.schema: not a JSON schema xgrammar can enforce ({reason})",
                param="response_format",
            ) from None

    def json_object(self) -> Any:
        """OpenAI's json_object mode: any JSON object."""
        return self.schemas.compile({"type": "object"})

    @staticmethod
    def matcher(compiled: Any) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)
