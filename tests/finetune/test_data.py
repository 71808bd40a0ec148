"""Chat rendering and assistant-only masks: the tiny model's template and Llama 3's published one."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest

from doctune.errors import ConfigError
from doctune.finetune import attention, data, launch, outputs

# Meta-Llama-3-8B-Instruct's tokenizer_config.json "chat_template", as published (JSON string escapes kept).
LLAMA3_PUBLISHED = json.loads(
    r'''"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"'''  # noqa: E501 (verbatim)
)

CONVERSATION = [
    {"role": "system", "content": "You answer questions about the manual."},
    {"role": "user", "content": "What about the pump?"},
    {"role": "assistant", "content": "Prime it before use."},
    {"role": "user", "content": "And the valve?"},
    {"role": "assistant", "content": "Close it after priming."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def marked_spans(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The text of each run of trained tokens."""
    spans, current = [], []
    for tid, label in zip(ids, labels, strict=True):
        if label != data.IGNORE_INDEX:
            current.append(tid)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


@pytest.mark.parametrize("module", [data, attention, launch, outputs])
def test_doctest_examples_hold(module):
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0


def test_tiny_template_trains_exactly_the_assistant_replies_and_their_end_of_turn(tokenizer):
    template, source = data.training_template(tokenizer)
    assert source == "tokenizer"
    sample = data.tokenize_conversation(tokenizer, CONVERSATION, template, max_length=512)
    spans = marked_spans(tokenizer, sample["input_ids"], sample["labels"])
    assert spans == ["Prime it before use.<|eot_id|>", "Close it after priming.<|eot_id|>"]
    assert sample["truncated"] is False
    assert data.stop_token_trained(tokenizer, template, {tokenizer.eos_token_id})


def test_llama3_published_template_gets_trls_training_version_with_the_same_text(tokenizer):
    tokenizer = _with_template(tokenizer, LLAMA3_PUBLISHED)
    assert not data.has_generation_markers(tokenizer.chat_template)
    template, source = data.training_template(tokenizer)
    assert source == "trl:llama3"
    # the training version renders exactly what the published template renders (prompts stay the same)
    for messages in (CONVERSATION, CONVERSATION[:2]):
        for add_generation_prompt in (False, True):
            published = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            training = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
            )
            assert training == published
    sample = data.tokenize_conversation(tokenizer, CONVERSATION, template, max_length=512)
    spans = marked_spans(tokenizer, sample["input_ids"], sample["labels"])
    assert spans == ["Prime it before use.<|eot_id|>", "Close it after priming.<|eot_id|>"]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert data.stop_token_trained(tokenizer, template, {eot})


def test_template_without_markers_trains_by_prefix_with_its_end_of_turn(tokenizer):
    chatml = (
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '\n' + m['content'] + '<|eot_id|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant\n' }}{% endif %}"
    )
    template, source = data.training_template(_with_template(tokenizer, chatml))
    assert (template, source) == (chatml, "prefix")
    sample = data.tokenize_conversation(tokenizer, CONVERSATION, template, max_length=512)
    spans = marked_spans(tokenizer, sample["input_ids"], sample["labels"])
    # the end-of-turn token and the newline after it are trained, as TRL's training templates mark them
    assert spans == ["Prime it before use.<|eot_id|>\n", "Close it after priming.<|eot_id|>\n"]
    assert data.stop_token_trained(tokenizer, template, {tokenizer.eos_token_id})


def test_template_that_renders_prefixes_inconsistently_fails_in_one_line(tokenizer):
    # the number of messages goes into the system message: a prompt is never the start of the longer conversation
    counting = (
        "{{ 'messages: ' ~ (messages | length) ~ '\n' }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] "
        "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(ConfigError) as err:
        data.training_template(_with_template(tokenizer, counting))
    [message] = err.value.problems
    assert "\n" not in message
    assert (
        "finetune.model" in message and "prefixes inconsistently" in message and "{% generation %}" in message
    )
    with pytest.raises(data.PrefixMismatch):  # and a single conversation is refused, not mis-masked
        data.tokenize_conversation(tokenizer, CONVERSATION, counting, max_length=512)


def test_template_whose_markers_mark_nothing_is_refused(tokenizer):
    empty = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|eot_id|>' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{% endgeneration %}{% endif %}{% endfor %}"
    )
    with pytest.raises(ConfigError, match="marks no assistant token"):
        data.training_template(_with_template(tokenizer, empty))


def test_template_that_leaves_the_end_of_turn_out_is_detected(tokenizer):
    template = (
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    )
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert not data.stop_token_trained(tokenizer, template, {eot})


def test_truncation_keeps_the_first_max_length_tokens(tokenizer):
    template, _ = data.training_template(tokenizer)
    full = data.tokenize_conversation(tokenizer, CONVERSATION, template, max_length=4096)
    cut = data.tokenize_conversation(tokenizer, CONVERSATION, template, max_length=20)
    assert cut["truncated"] is True
    assert cut["input_ids"] == full["input_ids"][:20]
    assert cut["labels"] == full["labels"][:20]


def test_reading_skips_unusable_rows_and_names_their_lines(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    good = {"messages": CONVERSATION[:3]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"Question": "seed format row"}),
        "",
        json.dumps(good),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    read = data.read_conversations(path)
    assert len(read.conversations) == 2
    assert [p.split(":")[1] for p in read.problems] == ["2", "3", "4", "5"]
    assert "no assistant message" in read.problems[2]
    assert data.system_prompt(read.conversations) == CONVERSATION[0]["content"]


def test_flattened_batch_never_trains_across_a_sample_boundary():
    a = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
    b = {"input_ids": [1, 5], "labels": [1, 5]}  # a first label that is not ignored must still be cut
    batch = data.FlatCollator()([a, {"samples": [b, a]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 1, 5, 1, 2, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, 2, 3]]


def test_packing_fills_rows_without_exceeding_capacity():
    lengths = [300, 120, 90, 400, 50, 260, 75]
    rows = data.pack_samples(lengths, capacity=512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert len(rows) == 3  # 1295 tokens need at least 3 rows of 512


def _with_template(tokenizer, template: str):
    clone = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    clone.chat_template = template
    return clone
