"""Assistant masks for chat templates without `{% generation %}` markers, derived from conversation prefixes:
the real SmolLM2 template, and every template TRL ships with a training twin (whose marks are the reference)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from doctune.finetune import data

SYSTEM = {"role": "system", "content": "You answer questions about the manual."}
TURNS = [
    {"role": "user", "content": "What about the pump?"},
    {"role": "assistant", "content": "Prime it before use."},
    {"role": "user", "content": "And the valve?"},
    {"role": "assistant", "content": "Close it after priming."},
]
CONVERSATIONS = {
    "system, one turn": [SYSTEM, *TURNS[:2]],
    "one turn": TURNS[:2],
    "system, two turns": [SYSTEM, *TURNS],
    "two turns": TURNS,
}


def marked_spans(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The text of each run of marked tokens."""
    spans, current = [], []
    for tid, marked in zip(ids, mask, strict=True):
        if marked:
            current.append(tid)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


# ---------------------------------------------------------------- SmolLM2-135M-Instruct as it ships


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["system, two turns", "one turn"])
def test_smollm2_template_trains_each_reply_and_its_end_of_turn_and_nothing_else(smollm2_tokenizer, name):
    tokenizer = smollm2_tokenizer
    assert not data.has_generation_markers(tokenizer.chat_template)
    template, source = data.training_template(tokenizer)
    assert (template, source) == (tokenizer.chat_template, "prefix")

    messages = CONVERSATIONS[name]
    sample = data.tokenize_conversation(tokenizer, messages, template, max_length=4096)
    mask = [int(label != data.IGNORE_INDEX) for label in sample["labels"]]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert marked_spans(tokenizer, sample["input_ids"], mask) == [r + "<|im_end|>\n" for r in replies]
    # the unmarked text holds every system and user message whole (the template's default system one too)
    unmarked = tokenizer.decode([t for t, m in zip(sample["input_ids"], mask, strict=True) if not m])
    assert all(m["content"] in unmarked for m in messages if m["role"] != "assistant")
    assert "You are a helpful AI assistant named SmolLM" in unmarked or messages[0]["role"] == "system"
    # the ids are the template's own rendering, and <|im_end|> (eos) is trained so the model learns to stop
    assert sample["input_ids"] == list(
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    )
    assert data.stop_token_trained(tokenizer, template, {tokenizer.eos_token_id})


# ---------------------------------------------------------------- TRL's templates and their training twins

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
FAMILIES = sorted(
    p.name.removesuffix("_training.jinja")
    for p in TRL_TEMPLATES.glob("*_training.jinja")
    if (TRL_TEMPLATES / p.name.replace("_training.jinja", ".jinja")).is_file()
)
SPECIAL = re.compile(r"<[|｜][^<>\s'\"]*?[|｜]>|<(?:start|end)_of_[a-z_]+>|</?s>|\[gMASK\]|<sop>|<image>")

# Where prefix masks and the twin's marks differ, and why. Each entry must still hold (so a fixed twin is noticed).
# Twin marks tokens of the generation prompt, which the prompt supplies and the model never writes:
TWIN_MARKS_PROMPT = {
    "gptoss": "<|start|>assistant",
    "muse_glimmer": "<|start|>assistant",
    "qwen2_5": "the newline after 'assistant'",
    "qwen3_5_nothink": "<think> of the prompt",
    "qwen3_5_think": "<think> of the prompt",
    "qwen3_6": "<think> of the prompt",
    "qwen3_8": "<think> of the prompt",
}
# Tokens one side marks and the other not, beyond the generation prompt: {family: (prefix only, twin only)}.
OTHER_DIFFERENCES = {
    # the ' ' the template writes between turns, after </s>, is part of what the assistant turn adds
    "llava_next": ({" "}, set()),
    # an earlier turn ends in <|end|>, the last in <|return|>: the earlier turn's <|end|> is left untrained
    "gptoss": (set(), {"<|end|>"}),
}
# The generation prompt opens a reasoning block ("<think>\n") that the rendered turn does not have: no prompt is a
# prefix of the conversation, for the original and the twin alike (doctune uses the twin when the text matches).
PREFIX_INCONSISTENT = {
    "deepseek_r1_distill",
    "deepseekv3",
    "nemotron_3_5_lightning",
    "nemotron_3_nano",
    "nemotron_3_super",
    "nemotron_3_ultra",
}
# The original renders the thinking block only after the last user message, so an earlier turn renders
# differently once the conversation goes on; TRL's twin always renders it (which is why the twin exists).
ORIGINAL_INCONSISTENT_MULTI_TURN = {"qwen3", "qwen3_5_nothink", "qwen3_5_think", "qwen3_6"}
# The twin renders other text than the original (glm4moe's twin closes the last turn with <|user|>).
TWIN_RENDERS_OTHER_TEXT = {"glm4moe"}


@pytest.fixture(scope="module")
def base_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def tokenizer_for(base_tokenizer, template: str):
    """The tiny tokenizer with the template's special tokens added (so none is split into byte pieces)."""
    tokenizer = type(base_tokenizer).from_pretrained(base_tokenizer.name_or_path)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": sorted(set(SPECIAL.findall(template)))},
        replace_extra_special_tokens=False,
    )
    return tokenizer


def as_blocks(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]


def twin_marks(tokenizer, messages: list[dict], twin: str):
    """The twin's ids and marks for `messages` (or its content-block form); None when the twin refuses both."""
    from jinja2 import TemplateError

    for form in (messages, as_blocks(messages)):
        try:
            out = tokenizer.apply_chat_template(
                form, chat_template=twin, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
        except (TemplateError, TypeError):
            continue
        return form, list(out["input_ids"]), list(out["assistant_masks"])
    return None


def prompt_positions(tokenizer, messages: list[dict], template: str) -> set[int]:
    """Positions of the generation prompt's own tokens before each assistant turn."""
    positions: set[int] = set()
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = data._ids(
            tokenizer, data._render(tokenizer, messages[:i], template, add_generation_prompt=True)
        )
        before = data._ids(
            tokenizer, data._render(tokenizer, messages[:i], template, add_generation_prompt=False)
        )
        positions |= set(range(data.common_prefix_length(prompt, before if i else []), len(prompt)))
    return positions


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_masks_equal_the_trl_training_twins_marks(base_tokenizer, family):
    original = (TRL_TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")
    twin = (TRL_TEMPLATES / f"{family}_training.jinja").read_text(encoding="utf-8")
    tokenizer = tokenizer_for(base_tokenizer, twin)
    extra_allowed, missing_allowed = OTHER_DIFFERENCES.get(family, (set(), set()))
    compared, seen_prompt_marks, seen_extra, seen_missing = 0, False, set(), set()
    for name, messages in CONVERSATIONS.items():
        found = twin_marks(tokenizer, messages, twin)
        if found is None:  # e.g. Gemma has no system role
            continue
        messages, twin_ids, twin_mask = found
        multi_turn = sum(m["role"] == "assistant" for m in messages) > 1
        for which, template in (("twin", twin), ("original", original)):
            label = f"{family} {which} on {name!r}"
            if family in PREFIX_INCONSISTENT or (
                which == "original" and multi_turn and family in ORIGINAL_INCONSISTENT_MULTI_TURN
            ):
                with pytest.raises(data.PrefixMismatch):
                    data.prefix_assistant_mask(tokenizer, messages, template)
                continue
            ids, mask = data.prefix_assistant_mask(tokenizer, messages, template)
            if which == "original" and family in TWIN_RENDERS_OTHER_TEXT:
                assert ids != twin_ids, label
                continue
            assert ids == twin_ids, label
            compared += 1
            expected = list(twin_mask)
            if family in TWIN_MARKS_PROMPT:
                for k in prompt_positions(tokenizer, messages, template):
                    seen_prompt_marks |= bool(expected[k])
                    expected[k] = 0
            extra = {tokenizer.decode([ids[k]]) for k in range(len(ids)) if mask[k] and not expected[k]}
            missing = {tokenizer.decode([ids[k]]) for k in range(len(ids)) if expected[k] and not mask[k]}
            assert extra <= extra_allowed and missing <= missing_allowed, (label, extra, missing)
            seen_extra |= extra
            seen_missing |= missing
            if not (extra_allowed or missing_allowed):
                assert mask == expected, label
            assert any(mask), label
    if family in PREFIX_INCONSISTENT:
        return
    assert compared >= 2, f"{family}: too few conversations compared"
    assert seen_prompt_marks == (family in TWIN_MARKS_PROMPT), f"{family}: TWIN_MARKS_PROMPT is out of date"
    assert (seen_extra, seen_missing) == (extra_allowed, missing_allowed), (
        f"{family}: OTHER_DIFFERENCES out of date"
    )


def test_every_trl_family_is_covered():
    # a TRL upgrade that adds a family gets it tested above; these are the ones known when this was written
    assert {"llama3", "qwen2_5", "phi3", "gemma", "cohere", "gptoss"} <= set(FAMILIES)
    known = set(TWIN_MARKS_PROMPT) | set(OTHER_DIFFERENCES) | PREFIX_INCONSISTENT | TWIN_RENDERS_OTHER_TEXT
    assert known <= set(FAMILIES), known - set(FAMILIES)
