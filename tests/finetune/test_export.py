"""`doctune export`: adapter + base → GGUF files that transformers and llama.cpp load back as the merged model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from doctune.errors import DoctuneError, InputError
from doctune.finetune.export import derive_chat_format, export

SYSTEM = "You answer questions about the pump manual."
PROMPTS = [
    [{"role": "user", "content": "What about the pump?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Clean the filter when?"}],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Question 3: check seal replace gasket?"},
        {"role": "assistant", "content": "Every month."},
        {"role": "user", "content": "And the valve?"},
    ],
]
TEXTS = [
    "Clean the filter every month, 123 times!",
    "  leading spaces, tabs\tand\nnew lines  ",
    "Ünïcödé — naïve café, 東京, emoji 🙂",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
]


def make_adapter(base_dir: Path, out: Path, *, r: int = 4, scale: float = 1.0, seed: int = 0):
    """A LoRA adapter on `base_dir` with random (non-zero) A and B, as PEFT saves it, plus the
    doctune_finetune.json that `doctune finetune` writes beside it. Returns the merged model in memory."""
    from peft import LoraConfig, get_peft_model

    from doctune.models import load_causal_lm

    torch.manual_seed(seed)
    base = load_causal_lm(base_dir, dtype=torch.float32, device="cpu")
    model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", init_lora_weights=False)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    model.save_pretrained(out)
    (out / "doctune_finetune.json").write_text(
        json.dumps({"base_model": str(base_dir), "system_prompt": SYSTEM}), encoding="utf-8"
    )
    return model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> dict:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("export")
    merged = make_adapter(tiny_model_dir, root / "adapter")
    out = root / "export" / "chatbot-{type}.gguf"
    summary = export(root / "adapter", out, types=["f16", "q8_0"])
    return {
        "root": root,
        "merged": merged,
        "tokenizer": AutoTokenizer.from_pretrained(tiny_model_dir),
        "summary": summary,
        "f16": root / "export" / "chatbot-f16.gguf",
        "q8_0": root / "export" / "chatbot-q8_0.gguf",
    }


def encode(tokenizer, messages) -> dict:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Logits of every position as llama.cpp (what Ollama and LM Studio run) computes them from the file."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=1)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def test_summary_lists_both_files_and_their_modelfiles(exported):
    outputs = exported["summary"].outputs
    for kind in ("f16", "q8_0"):
        assert str(exported[kind]) in outputs and exported[kind].stat().st_size > 0
        assert str(exported[kind].with_suffix(".Modelfile")) in outputs
    assert not list(exported[kind].parent.glob(".*")), "no temp file or merged folder is left behind"
    assert exported["q8_0"].stat().st_size < 0.65 * exported["f16"].stat().st_size
    umask = os.umask(0o022)
    os.umask(umask)
    assert (
        exported["q8_0"].stat().st_mode & 0o777 == 0o666 & ~umask
    )  # readable like any file, not mkstemp's 0600


def test_f16_loads_in_transformers_with_logits_close_to_the_merged_model(exported, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = load_gguf(exported["f16"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for messages in PROMPTS:
        enc = encode(exported["tokenizer"], messages)
        with torch.no_grad():
            got, want = model(**enc).logits, exported["merged"](**enc).logits
            assert (base(**enc).logits - want).abs().max() > 0.1  # the adapter matters: the check can fail
        assert torch.allclose(got, want, atol=2e-3), (got - want).abs().max()


def test_q8_0_keeps_every_clear_top1_token_of_the_merged_model(exported):
    """q8_0 rounds weights to 8 bits: logits move by a few hundredths. Wherever the merged model's best token leads
    the next by more than that, the exported file picks the same token."""
    model = load_gguf(exported["q8_0"])
    clear = 0
    for messages in PROMPTS:
        enc = encode(exported["tokenizer"], messages)
        with torch.no_grad():
            got, want = model(**enc).logits[0], exported["merged"](**enc).logits[0]
        assert (got - want).abs().max() < 0.1
        top2 = want.topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) > 0.1
        assert torch.equal(got.argmax(-1)[decided], want.argmax(-1)[decided])
        clear += int(decided.sum())
    assert clear >= 10  # the check compared real positions


def test_tokenizer_and_chat_template_round_trip(exported):
    from transformers import AutoTokenizer

    original = exported["tokenizer"]
    for kind in ("f16", "q8_0"):
        loaded = AutoTokenizer.from_pretrained(str(exported[kind].parent), gguf_file=exported[kind].name)
        assert loaded.chat_template == original.chat_template
        assert (loaded.bos_token, loaded.eos_token) == (original.bos_token, original.eos_token)
        for text in TEXTS:
            assert loaded(text).input_ids == original(text).input_ids, text
        for messages in PROMPTS:
            assert (
                encode(loaded, messages)["input_ids"].tolist()
                == encode(original, messages)["input_ids"].tolist()
            )


def test_llama_cpp_reads_the_files_tokenizes_alike_and_computes_the_merged_logits(exported):
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    ids = encode(exported["tokenizer"], PROMPTS[2])["input_ids"][0].tolist()
    with torch.no_grad():
        want = exported["merged"](torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_cpp_logits(exported["f16"], ids) - want).max() < 2e-3
    assert np.abs(llama_cpp_logits(exported["q8_0"], ids) - want).max() < 0.1

    llm = llama_cpp.Llama(str(exported["q8_0"]), n_ctx=256, verbose=False, n_threads=1)
    try:
        for text in TEXTS:
            got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            assert got == exported["tokenizer"](text).input_ids, text
        assert llm.metadata["tokenizer.chat_template"] == exported["tokenizer"].chat_template
        # llama-cpp-python's chat path: the file's own template, BOS and EOS give the prompt ids transformers gives
        bos, eos = (llm.detokenize([t], special=True).decode() for t in (llm.token_bos(), llm.token_eos()))
        formatter = Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"], bos_token=bos, eos_token=eos
        )
        for messages in PROMPTS:
            rendered = formatter(messages=messages)
            ids = llm.tokenize(
                rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
            )
            assert ids == encode(exported["tokenizer"], messages)["input_ids"][0].tolist()
    finally:
        llm.close()


def test_file_layout_is_llamas(exported):
    import gguf

    reader = gguf.GGUFReader(exported["q8_0"])
    fields = {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("tokenizer.ggml")
    }
    assert fields["general.architecture"] == "llama"
    assert fields["general.name"] == "chatbot"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.1.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert "output.weight" in types  # the tiny model's embeddings are not tied
    assert len(types) == 2 + 2 * 9 + 1


def test_modelfile_has_the_template_stop_tokens_and_training_system_prompt(exported):
    text = exported["q8_0"].with_suffix(".Modelfile").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert "FROM ./chatbot-q8_0.gguf" in lines
    assert 'PARAMETER stop "<|eot_id|>"' in lines and 'PARAMETER stop "<|end_of_text|>"' in lines
    assert f'SYSTEM """{SYSTEM}"""' in lines
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template.startswith("{{ range $i, $_ := .Messages }}")  # BOS: added by Ollama, not in the template
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>" in template
    assert (
        '{{ if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n'
        in template
    )


def test_derived_chat_format_renders_like_the_jinja_template(exported):
    tokenizer = exported["tokenizer"]
    chat = derive_chat_format(tokenizer)
    assert chat is not None
    for messages in PROMPTS:
        assert chat.render(messages, True) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


MISTRAL_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def test_chat_format_of_smollm2s_chatml_and_none_for_a_template_without_role_headers(
    tiny_model_dir, smollm2_gguf
):
    import gguf
    from transformers import AutoTokenizer

    from doctune.finetune.export import modelfile_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"].contents()
    chat = derive_chat_format(tokenizer)
    assert chat is not None
    assert (chat.start, chat.before_role, chat.after_role, chat.end) == (
        "",
        "<|im_start|>",
        "\n",
        "<|im_end|>\n",
    )
    assert chat.generation_prompt == "<|im_start|>assistant\n"
    assert chat.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

    tokenizer.chat_template = MISTRAL_LIKE
    assert derive_chat_format(tokenizer) is None
    text = modelfile_text("m.gguf", None, ["<|eot_id|>"], None)
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "")
    assert 'PARAMETER stop "<|eot_id|>"' in text and "SYSTEM" not in text


def test_export_refuses_files_it_did_not_write_and_replaces_its_own(exported, tmp_path):
    foreign = tmp_path / "chatbot-q8_0.gguf"
    foreign.write_bytes(b"GGUF someone else's model")
    with pytest.raises(DoctuneError, match="not written by doctune export"):
        export(exported["root"] / "adapter", tmp_path / "chatbot-{type}.gguf", types=["f16", "q8_0"])
    assert foreign.read_bytes() == b"GGUF someone else's model"
    assert not (tmp_path / "chatbot-f16.gguf").exists()  # refused before writing anything

    own = tmp_path / "own" / "bot.gguf"
    shutil.copytree(exported["f16"].parent, own.parent)
    (own.parent / "chatbot-f16.gguf").rename(own)
    (own.parent / "chatbot-f16.Modelfile").rename(own.with_suffix(".Modelfile"))
    export(exported["root"] / "adapter", own, types=["q8_0"])
    assert "FROM ./bot.gguf" in own.with_suffix(".Modelfile").read_text()


def test_export_rejects_wrong_types_paths_and_architectures(exported, tiny_model_dir, tmp_path):
    adapter = exported["root"] / "adapter"
    with pytest.raises(DoctuneError, match=r"--type q4_k: unknown GGUF type; use f32, f16, q8_0"):
        export(adapter, tmp_path / "x.gguf", types=["q4_k"])
    with pytest.raises(DoctuneError, match=r"several --type values need \{type\}"):
        export(adapter, tmp_path / "x.gguf", types=["f16", "q8_0"])
    with pytest.raises(DoctuneError, match=r"ending in \.gguf"):
        export(adapter, tmp_path / "x", types=["f16"])
    with pytest.raises(InputError, match=r"no adapter_config\.json"):
        export(tmp_path, tmp_path / "x.gguf")

    other = tmp_path / "mistral"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))
    with pytest.raises(InputError, match=r"architecture 'mistral'; doctune export writes Llama models only"):
        export(other, tmp_path / "x.gguf", types=["f16"])
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_llama3_rope_scaling_is_written_as_llama_cpp_reads_it(tiny_model_dir, tmp_path):
    """Llama 3.1/3.2 scale RoPE frequencies; llama.cpp takes them as a rope_freqs tensor. A merged model folder
    (as `doctune merge` writes it) is exported as it is."""
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "llama31"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    export(model_dir, tmp_path / "llama31.gguf", types=["f32"])

    tokenizer_text = " ".join(["The pump must be primed before use, then close the valve."] * 8)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(tokenizer_text).input_ids
    assert len(ids) > 64
    with torch.no_grad():
        scaled = AutoModelForCausalLM.from_pretrained(model_dir)(torch.tensor([ids])).logits[0].numpy()
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp_logits(tmp_path / "llama31.gguf", ids)
    assert np.abs(got - scaled).max() < 1e-3
    assert np.abs(plain - scaled).max() > 2e-3  # the scaling matters at these positions: the check can fail


def byte_level_pre_tokenizers() -> dict:
    """The three byte-level pre-tokenizers export names for llama.cpp, as tokenizer.json spells them."""
    from tokenizers import Regex, pre_tokenizers

    from doctune.finetune.export import _LLAMA3_SPLIT

    return {
        "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),
        "smollm": pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        ),
        "llama-bpe": pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
    }


@pytest.mark.parametrize("pre_name", ["gpt-2", "smollm", "llama-bpe"])
def test_llama_cpp_splits_text_as_the_tokenizer_does(pre_name, tiny_model_dir, tmp_path):
    """A BPE trained behind each pre-tokenizer: llama.cpp, told its name, cuts every probe text into the same ids
    (digits one by one for SmolLM, in threes for Llama 3, runs for GPT-2)."""
    import gguf
    import llama_cpp
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from doctune.tinymodel import BOS, CHAT_TEMPLATE, EOT, PAD, SPECIAL_TOKENS, read_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = byte_level_pre_tokenizers()[pre_name]
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(read_corpus(None) + ["12345 678 2026 1000000"] * 20, trainer=trainer)
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOT, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(model_dir)
    export(model_dir, tmp_path / "m.gguf", types=["f16"])

    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.pre"].contents() == pre_name
    texts = [
        *TEXTS,
        "Order 12345 parts in 2026, not 1000000.",
        "I'm sure they'll do what we've said",
        "a\n\n  b\r\n",
    ]
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=256, verbose=False, n_threads=1, vocab_only=True)
    try:
        for text in texts:
            assert (
                llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == tokenizer(text).input_ids
            )
    finally:
        llm.close()


def test_a_tokenizer_llama_cpp_cannot_split_alike_is_refused(tiny_model_dir, tmp_path):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(
        InputError, match=r"pre-tokenizer \['Whitespace', 'ByteLevel'\] is not one llama.cpp names"
    ):
        export(model_dir, tmp_path / "m.gguf", types=["f16"])
    assert not list(tmp_path.glob("*.gguf"))


def test_q8_0_keeps_tensors_whose_rows_are_not_a_multiple_of_32_in_f16(tiny_model_dir, tmp_path):
    """An MLP width of 80: ffn_down's rows (80 long) cannot be q8_0 blocks; they stay f16, the rest is q8_0, the
    summary says so, and llama.cpp runs the mixed file."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = base.config
    config.intermediate_size = 80
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model_dir = tmp_path / "mlp80"
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    summary = export(model_dir, tmp_path / "m.gguf", types=["q8_0"])

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.1.ffn_down.weight"] == "F16"
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert summary.warnings == [
        "m.gguf: 2 tensor(s) kept in f16, their rows are not a multiple of 32 "
        "(blk.0.ffn_down.weight, blk.1.ffn_down.weight)"
    ]
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("Check the seal every month.").input_ids
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_cpp_logits(tmp_path / "m.gguf", ids) - want).max() < 0.1


def test_export_command_writes_both_types(exported, tmp_path):
    from typer.testing import CliRunner

    from doctune.cli import app

    out = tmp_path / "cli" / "bot-{type}.gguf"
    result = CliRunner().invoke(
        app,
        ["export", "--adapter", str(exported["root"] / "adapter"), "--out", str(out), "--type", "f16,q8_0"],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "bot-f16.gguf").is_file() and (tmp_path / "cli" / "bot-q8_0.gguf").is_file()
    assert (tmp_path / "cli" / "bot-q8_0.Modelfile").is_file()

    import subprocess
    import sys

    adapter = str(exported["root"] / "adapter")
    args = ["export", "--adapter", adapter, "--out", str(out), "--type", "f16", "--type", "q4"]
    refused = subprocess.run(
        [sys.executable, "-m", "doctune", *args], capture_output=True, text=True, check=False
    )
    assert refused.returncode == 2  # a usage error, reported before any model is loaded
    assert (
        refused.stderr.strip().splitlines()[-1] == "Error: Invalid value for --type: 'q4': use f32, f16, q8_0"
    )
    assert "Traceback" not in refused.stderr


def test_export_command_defaults_to_the_runs_adapter_and_export_folder(trained, tiny_model_dir, tmp_path):
    """`doctune export -c doctune.yaml` after `doctune finetune`: {run_dir}/adapter in, {run_dir}/export out, with
    the template and system prompt the adapter was trained with."""
    import gguf
    from tests.finetune.helpers import SYSTEM as TRAINING_SYSTEM
    from tests.finetune.helpers import yaml_config
    from typer.testing import CliRunner

    from doctune.cli import app

    run_dir = tmp_path / "run"
    shutil.copytree(trained["run_dir"], run_dir)
    config = yaml_config(tmp_path / "doctune.yaml", run_dir, tiny_model_dir)
    result = CliRunner().invoke(app, ["export", "-c", str(config)])
    assert result.exit_code == 0, result.output
    path = run_dir / "export" / "chatbot-q8_0.gguf"
    fields = gguf.GGUFReader(path).fields
    trained_template = (run_dir / "adapter" / "chat_template.jinja").read_text(encoding="utf-8")
    assert fields["tokenizer.chat_template"].contents() == trained_template
    assert fields["doctune.adapter"].contents() == str((run_dir / "adapter").resolve())
    assert f'SYSTEM """{TRAINING_SYSTEM}"""' in path.with_suffix(".Modelfile").read_text().splitlines()


def assert_same_clear_top1(got: np.ndarray, want: np.ndarray, margin: float) -> int:
    """Wherever `want`'s best token leads its second by more than `margin`, `got` picks the same token; returns how
    many positions were that clear. (A quantized file may flip a near-tie: on SmolLM2, "L" led "The" by 0.009.)"""
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > margin
    assert (got.argmax(-1)[clear] == want.argmax(-1)[clear]).all()
    return int(clear.sum())


@pytest.mark.slow
def test_smollm2_exported_files_pick_the_merged_models_tokens(smollm2_gguf, tmp_path):
    """The real instruct model: a LoRA on SmolLM2-135M-Instruct (the GGUF as it ships, dequantized by
    doctune.models), exported as f16 and q8_0. Along the merged model's greedy replies, the q8_0 file (loaded by
    transformers) and the f16 file (run by llama.cpp) pick the same next token wherever the choice is clear."""
    from transformers import AutoTokenizer

    from doctune.models import resolve

    folder = resolve(smollm2_gguf).folder
    merged = make_adapter(folder, tmp_path / "adapter", r=8, scale=0.05)  # changes the Paris answer, not all
    info = tmp_path / "adapter" / "doctune_finetune.json"
    info.write_text(json.dumps({"base_model": str(smollm2_gguf), "system_prompt": SYSTEM}))
    out = tmp_path / "export" / "smol-{type}.gguf"
    summary = export(tmp_path / "adapter", out, types=["f16", "q8_0"])
    assert dict(summary.rows)["base model"] == str(smollm2_gguf)
    f16, q8_0 = (tmp_path / "export" / f"smol-{t}.gguf" for t in ("f16", "q8_0"))

    tokenizer = AutoTokenizer.from_pretrained(folder)
    questions = ["What is the capital of France?", "How do I clean the filter of a pump?", "Say hello."]
    from_q8_0 = load_gguf(q8_0)
    positions = clear_q8_0 = clear_f16 = 0
    for question in questions:
        enc = encode(tokenizer, [{"role": "user", "content": question}])
        n = enc["input_ids"].shape[1]
        with torch.no_grad():
            ids = merged.generate(**enc, max_new_tokens=12, do_sample=False)
            want = merged(ids).logits[0, n - 1 :].numpy()
            got = from_q8_0(ids).logits[0, n - 1 :].numpy()
        clear_q8_0 += assert_same_clear_top1(got, want, margin=0.2)
        clear_f16 += assert_same_clear_top1(llama_cpp_logits(f16, ids[0].tolist())[n - 1 :], want, margin=0.2)
        positions += len(want)
    assert clear_q8_0 >= 0.75 * positions and clear_f16 >= 0.75 * positions  # most of the reply was compared
    modelfile = q8_0.with_suffix(".Modelfile").read_text()
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and f'SYSTEM """{SYSTEM}"""' in modelfile
