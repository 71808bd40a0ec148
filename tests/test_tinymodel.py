import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from doctune.cli import app
from doctune.errors import DoctuneError
from doctune.tinymodel import build_tiny_model

CONVERSATION = [
    {"role": "system", "content": "Answer from the manual."},
    {"role": "user", "content": "What is the tank volume?"},
    {"role": "assistant", "content": "300 L."},
    {"role": "user", "content": "Und die Heizleistung?"},
    {"role": "assistant", "content": "1,8 kW bei 15 °C – „Wärmepumpe“."},
]


def model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_loads_with_auto_classes(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    assert 150_000 <= n_params <= 300_000
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    assert model.config.max_position_embeddings >= 4096
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.eos_token_id == eot
    assert eot in model.generation_config.eos_token_id
    assert tok.pad_token_id is not None and tok.pad_token_id != eot
    assert (tiny_model_dir / "chat_template.jinja").is_file()

    batch = tok(["a short one", "a somewhat longer input sentence"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[2] == len(tok)


def test_same_seed_gives_identical_files_and_another_seed_other_weights(tmp_path):
    build_tiny_model(tmp_path / "a", seed=7)
    build_tiny_model(tmp_path / "b", seed=7)
    assert model_files(tmp_path / "a") == model_files(tmp_path / "b")

    build_tiny_model(tmp_path / "b", seed=8)  # rebuilt in place
    a, b = model_files(tmp_path / "a"), model_files(tmp_path / "b")
    assert a["tokenizer.json"] == b["tokenizer.json"]
    assert a["model.safetensors"] != b["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no staging folders left behind


def test_assistant_mask_marks_exactly_answers_and_their_end_of_turn(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)

    runs, current = [], []
    for token, marked in zip(ids, mask, strict=True):
        if marked:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    answers = [m["content"] + "<|eot_id|>" for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(run) for run in runs] == answers
    assert mask[-1] == 1  # the final end-of-turn token is learned: the model learns to stop


def test_generation_prompt_ends_with_an_open_assistant_header(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer from")
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    without = tok.apply_chat_template(CONVERSATION[:2], tokenize=False)
    assert without.endswith("What is the tank volume?<|eot_id|>")


@pytest.mark.parametrize(
    "text",
    ["café “quotes” — naïve", "日本語の文書を読みます。", "Ωμέγα, Привет, 🙂 ½ °C", "  spaces\n\ttabs  "],
)
def test_tokenizer_round_trips_any_text(tiny_model_dir, text):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok(text)["input_ids"][0] == tok.bos_token_id


def test_custom_corpus_trains_its_own_vocabulary(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "notes.md").write_text("zygomorphic xylophones " * 200, encoding="utf-8")
    (corpus / "ignored.bin").write_bytes(b"\x00\x01")
    build_tiny_model(tmp_path / "m", corpus=corpus)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert len(tok(" xylophones", add_special_tokens=False)["input_ids"]) == 1


def test_unknown_size_and_empty_corpus_are_one_line_errors(tmp_path):
    with pytest.raises(DoctuneError, match=r"unknown model size .*tiny, small"):
        build_tiny_model(tmp_path / "m", size="huge")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(DoctuneError, match="no text to train the tokenizer on") as err:
        build_tiny_model(tmp_path / "m", corpus=empty)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "m").exists()


def test_cli_builds_a_loadable_model(tmp_path):
    result = CliRunner().invoke(app, ["tiny-model", str(tmp_path / "cli"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "parameters" in result.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "cli").config.hidden_size == 64


def test_cli_reports_a_bad_size_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "doctune", "tiny-model", str(tmp_path / "x"), "--size", "huge"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "unknown model size" in proc.stderr
