"""Chat samples → token ids + assistant-only labels, and padding-free batches. Pure functions, no model.

One chat template end to end: every sample is rendered with the student tokenizer's own template, and the
template used travels with the adapter so eval, chat and serve render prompts the same way. Which tokens the
assistant wrote comes from, in this order:

- `"tokenizer"`: the template marks them itself with `{% generation %}` (transformers' assistant masks);
- `"trl:<family>"`: TRL's training version of a published template that matches it byte for byte;
- `"prefix"`: any other template. For each assistant turn i, messages[:i] rendered with the generation prompt is
  what the model is given; the tokens that messages[:i+1] adds beyond it are the ones it writes (its end-of-turn
  token and the newline some templates put after it included, as TRL's training templates mark them).

```python
template, source = training_template(tokenizer)            # ConfigError when no method yields assistant tokens
sample = tokenize_conversation(tokenizer, messages, template, max_length=2048)
batch = flatten_batch([sample, ...])                       # one row, position_ids restart at every sample
```
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doctune.errors import ConfigError, InputError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")

# A conversation that every chat template renders: what the template checks run on.
PROBE_CONVERSATION = [
    {"role": "system", "content": "You answer questions about the documents."},
    {"role": "user", "content": "What does the manual say about the pump?"},
    {"role": "assistant", "content": "It says the pump must be primed before use."},
    {"role": "user", "content": "And the valve?"},
    {"role": "assistant", "content": "Close it after priming."},
]


@dataclass
class Conversations:
    """Conversations read from a chat JSONL file, with one line per row that could not be used."""

    path: Path
    conversations: list[list[dict[str, str]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def message_problem(messages: Any) -> str | None:
    """Why `messages` cannot be trained on, or None when it can.

    >>> message_problem([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]) is None
    True
    >>> message_problem([{"role": "user", "content": "Hi"}])
    'no assistant message to learn from'
    """
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] is not an object"
        if message.get("role") not in ROLES:
            return f"messages[{i}].role is {message.get('role')!r} (allowed: {', '.join(ROLES)})"
        if not isinstance(message.get("content"), str):
            return f"messages[{i}].content is not text"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message to learn from"
    return None


def read_conversations(path: str | Path) -> Conversations:
    """Rows `{"messages": [...]}` of a chat JSONL file (train.jsonl / val.jsonl as curate writes them).

    A row that is not valid JSON or not a usable conversation is skipped and named in `problems`; the rest of
    the file is still read. A missing file is an InputError.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{path}: not found (run `doctune curate` first, or pass the run directory that has it)"
        )
    result = Conversations(path=path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                result.problems.append(f"{path.name}:{lineno}: not valid JSON ({exc.msg}); line skipped")
                continue
            messages = row.get("messages") if isinstance(row, dict) else None
            problem = message_problem(messages)
            if problem is not None:
                result.problems.append(f"{path.name}:{lineno}: {problem}; line skipped")
                continue
            result.conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return result


def system_prompt(conversations: list[list[dict[str, str]]]) -> str | None:
    """The system message the conversations were written with (the most common one), or None.

    >>> system_prompt([[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]])
    'Be brief.'
    """
    counts = Counter(m["content"] for conv in conversations for m in conv if m["role"] == "system")
    return counts.most_common(1)[0][0] if counts else None


def has_generation_markers(template: str | None) -> bool:
    """Whether a chat template marks assistant output with `{% generation %}` (any whitespace-trim variant).

    >>> has_generation_markers("{%- generation %}{{ m }}{%- endgeneration %}")
    True
    """
    return bool(template) and GENERATION_MARKER.search(template) is not None


def training_template(tokenizer: Any) -> tuple[str, str]:
    """The chat template to train with and how assistant tokens are found: `"tokenizer"` (it marks them itself),
    `"trl:<family>"` (TRL's training version of a known family's template, e.g. Llama 3) or `"prefix"` (derived
    by rendering conversation prefixes, see `prefix_assistant_mask`).

    Raises ConfigError, before any training, when the template fails on the probe conversation, renders its
    prefixes inconsistently, or marks no assistant token.
    """
    from jinja2 import TemplateError

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ConfigError(
            [
                f"finetune.model: the tokenizer of {tokenizer.name_or_path!r} has no chat template; use an instruct "
                "model, or add a chat_template.jinja with {% generation %} around the assistant reply"
            ],
            source="finetune",
        )
    source = "tokenizer"
    if not has_generation_markers(template):
        patched, family = _known_training_template(template)
        template, source = (patched, f"trl:{family}") if patched is not None else (template, "prefix")
    try:
        _, mask = assistant_tokens(tokenizer, PROBE_CONVERSATION, template)
    except PrefixMismatch as exc:
        raise ConfigError(
            [
                f"finetune.model: the chat template of {tokenizer.name_or_path!r} cannot mark assistant tokens and "
                f"renders conversation prefixes inconsistently ({exc}); wrap each assistant reply and its end-of-turn "
                "token in {% generation %}...{% endgeneration %} in a copy of its chat_template.jinja and point the "
                "student at a folder with that template"
            ],
            source="finetune",
        ) from None
    except (TemplateError, TypeError, KeyError) as exc:
        raise ConfigError(
            [
                f"finetune.model: the chat template ({source}) of {tokenizer.name_or_path!r} fails on a "
                f"system/user/assistant conversation ({type(exc).__name__}: {exc}); use a template that renders "
                "these three roles"
            ],
            source="finetune",
        ) from None
    if not any(mask):
        raise ConfigError(
            [
                f"finetune.model: the chat template ({source}) of {tokenizer.name_or_path!r} marks no assistant "
                "token; put {% generation %}...{% endgeneration %} around the assistant content it writes"
            ],
            source="finetune",
        )
    return template, source


def _known_training_template(template: str) -> tuple[str | None, str | None]:
    """TRL's training-compatible template for a published template it knows, matched on the exact text."""
    from importlib import resources

    folder = resources.files("trl") / "chat_templates"
    wanted = template.strip()
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        name = entry.name
        if not name.endswith("_training.jinja"):
            continue
        family = name.removesuffix("_training.jinja")
        original = folder / f"{family}.jinja"
        if original.is_file() and original.read_text(encoding="utf-8").strip() == wanted:
            return entry.read_text(encoding="utf-8"), family
    return None, None


class PrefixMismatch(ValueError):
    """A chat template renders a conversation's prefixes in a way that is not a prefix of the whole."""


def assistant_tokens(
    tokenizer: Any, messages: list[dict[str, Any]], template: str
) -> tuple[list[int], list[int]]:
    """Token ids of `messages` rendered with `template`, and 1 for each token the assistant wrote, else 0:
    the template's own `{% generation %}` marks when it has them, else `prefix_assistant_mask`."""
    if has_generation_markers(template):
        out = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        return list(out["input_ids"]), list(out["assistant_masks"])
    return prefix_assistant_mask(tokenizer, messages, template)


def assistant_mask(tokenizer: Any, messages: list[dict[str, Any]], template: str) -> list[int]:
    """1 for each token of `messages` (rendered with `template`) that the assistant wrote, else 0."""
    return assistant_tokens(tokenizer, messages, template)[1]


def prefix_assistant_mask(
    tokenizer: Any, messages: list[dict[str, Any]], template: str
) -> tuple[list[int], list[int]]:
    """Assistant tokens of any chat template, found by rendering prefixes of the conversation.

    For each assistant turn i: the prompt P (messages[:i] with the generation prompt) must be a prefix of the
    whole conversation's render F, as text and as token ids; the turn is F's tokens from the end of P to where the
    render of messages[:i+1] stops agreeing with F. What that render has beyond this point must be how the
    template closes a conversation (an eos some templates append, or a different last end-of-turn token), so
    F must end with it too. Anything else raises PrefixMismatch.
    """
    full = _render(tokenizer, messages, template, add_generation_prompt=False)
    ids = _ids(tokenizer, full)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], template, add_generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1], template, add_generation_prompt=False)
        prompt_ids, turn_ids = _ids(tokenizer, prompt), _ids(tokenizer, turn)
        if not (full.startswith(prompt) and turn.startswith(prompt)):
            raise PrefixMismatch(f"the prompt up to message {i} is not the start of the conversation's text")
        if ids[: len(prompt_ids)] != prompt_ids or turn_ids[: len(prompt_ids)] != prompt_ids:
            raise PrefixMismatch(
                f"the prompt up to message {i} is not the start of the conversation's tokens"
            )
        end = common_prefix_length(turn_ids, ids)
        closing = turn_ids[end:]
        if end <= len(prompt_ids) or (closing and ids[len(ids) - len(closing) :] != closing):
            raise PrefixMismatch(f"assistant message {i} renders differently once the conversation goes on")
        mask[len(prompt_ids) : end] = [1] * (end - len(prompt_ids))
    return ids, mask


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading items `a` and `b` share.

    >>> common_prefix_length([1, 2, 3, 4], [1, 2, 5])
    2
    """
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _render(
    tokenizer: Any, messages: list[dict[str, Any]], template: str, add_generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered chat text, as apply_chat_template(tokenize=True) makes them (no extra bos/eos)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_trained(tokenizer: Any, template: str, stop_ids: set[int]) -> bool:
    """Whether every assistant turn the template marks ends (ignoring whitespace tokens such as a newline after
    the end-of-turn token) with a token that stops generation: the model learns to end its answers.
    `stop_ids`: eos ids of the tokenizer and generation config."""
    ids, mask = assistant_tokens(tokenizer, PROBE_CONVERSATION, template)
    turns: list[list[int]] = []
    for k, (tid, marked) in enumerate(zip(ids, mask, strict=True)):
        if marked and (k == 0 or not mask[k - 1]):
            turns.append([])
        if marked:
            turns[-1].append(tid)
    if not turns:
        return False
    for turn in turns:
        last = next((tid for tid in reversed(turn) if tokenizer.decode([tid]).strip()), None)
        if last not in stop_ids:
            return False
    return True


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], template: str, max_length: int
) -> dict[str, Any]:
    """`{"input_ids", "labels", "truncated"}` of one conversation: labels are the ids of assistant tokens and
    IGNORE_INDEX elsewhere (also at position 0, which no token predicts). Longer conversations are cut to
    `max_length` tokens. PrefixMismatch (a ValueError) when the template renders this conversation's turns
    inconsistently."""
    ids, mask = assistant_tokens(tokenizer, messages, template)
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    return {"input_ids": ids, "labels": labels_from_mask(ids, mask), "truncated": truncated}


def labels_from_mask(input_ids: list[int], mask: list[int]) -> list[int]:
    """Assistant tokens keep their id, everything else (and the first token) becomes IGNORE_INDEX.

    >>> labels_from_mask([1, 5, 6, 7, 2], [0, 0, 1, 1, 1])
    [-100, -100, 6, 7, 2]
    """
    labels = [tid if m else IGNORE_INDEX for tid, m in zip(input_ids, mask, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def n_trained(sample: dict[str, Any]) -> int:
    """Tokens of a sample that carry loss."""
    return sum(1 for label in sample["labels"] if label != IGNORE_INDEX)


def pack_samples(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group sample indices into rows of at most `capacity` tokens, first-fit decreasing (few, full rows).
    A sample longer than `capacity` gets a row of its own. Rows come out in a deterministic order.

    >>> pack_samples([5, 3, 4, 2, 6], capacity=8)
    [[4, 3], [0, 1], [2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def flatten_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples → one row without padding: ids end to end, `position_ids` restarting at 0 for every sample
    (that is how the attention keeps samples apart), labels with IGNORE_INDEX at each sample's first token so
    no sample's last token is trained to predict the next sample.

    >>> b = flatten_batch([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [1, 7]}])
    >>> b["input_ids"].tolist(), b["position_ids"].tolist(), b["labels"].tolist()
    ([[1, 5, 6, 1, 7]], [[0, 1, 2, 0, 1]], [[-100, 5, 6, -100, 7]])
    """
    import torch

    ids: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    for sample in samples:
        n = len(sample["input_ids"])
        ids += sample["input_ids"]
        positions += range(n)
        labels += [IGNORE_INDEX, *sample["labels"][1:]]
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
    }


class FlatCollator:
    """Trainer collator: a list of dataset items (samples, or packed rows of samples) → `flatten_batch`."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        samples: list[dict[str, Any]] = []
        for item in items:
            samples += item.get("samples", [item])
        return flatten_batch(samples)
