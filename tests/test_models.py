"""doctune.models: one loader for folders, .gguf files and hub names; one-line errors naming the path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from doctune import models
from doctune.adapters import AdapterDir
from doctune.errors import InputError

DOCTUNE = [sys.executable, "-m", "doctune"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def make_lora(base_dir: Path, out_dir: Path, *, binary: bool = False) -> Path:
    """A LoRA adapter made with PEFT directly on `base_dir`, random non-zero weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base_dir),
            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
    model.save_pretrained(out_dir, safe_serialization=not binary)
    return out_dir


@pytest.fixture(scope="module")
def other_base(tiny_model_dir, tmp_path_factory):
    """A random Llama of other dimensions (hidden 32, not 64) with the tiny model's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("other-base") / "model"
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 32, 64
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def foreign_adapter(other_base, tmp_path_factory):
    return make_lora(other_base, tmp_path_factory.mktemp("foreign") / "adapter")


def run_doctune(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "250"}
    return subprocess.run(
        [*DOCTUNE, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], output
    return errors[0]


# ---------------------------------------------------------------------------------------- folders


def test_a_model_folder_loads_with_its_tokenizer_and_chat_template(tiny_model_dir):
    import torch

    ref = models.resolve(str(tiny_model_dir))
    assert (ref.kind, ref.folder) == ("folder", tiny_model_dir.resolve())
    tokenizer = models.load_tokenizer(ref, chat_template=True)
    model = models.load_causal_lm(ref, dtype="auto", device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert model(torch.tensor([ids["input_ids"] if hasattr(ids, "keys") else ids])).logits.shape[-1] == len(
        tokenizer
    )


def test_device_and_dtype_are_resolved_in_one_place():
    import torch

    assert models.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.resolve_device("cpu") == "cpu"
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(InputError, match=r"'float7'.*not a torch dtype") as err:
        models.resolve_dtype("float7", "cpu")
    one_line(err)


def test_a_path_that_does_not_exist_is_one_line_naming_it(tmp_path):
    with pytest.raises(InputError) as err:
        models.resolve(str(tmp_path / "no-such-model"))
    assert one_line(err).startswith(f"{tmp_path / 'no-such-model'}: folder does not exist")
    with pytest.raises(InputError, match=r"missing\.gguf: file does not exist") as err:
        models.resolve("missing.gguf")
    one_line(err)


def test_a_file_that_is_not_gguf_and_a_folder_of_several_ggufs_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(InputError, match=r"notes\.txt: a file that is not a \.gguf model") as err:
        models.load_causal_lm(str(tmp_path / "notes.txt"))
    one_line(err)
    both = tmp_path / "both"
    both.mkdir()
    (both / "a.gguf").write_bytes(b"")
    (both / "b.gguf").write_bytes(b"")
    with pytest.raises(InputError, match=r"both: holds several \.gguf files \(a\.gguf, b\.gguf\)") as err:
        models.load_tokenizer(str(both))
    one_line(err)


def test_a_file_that_only_looks_like_gguf_is_one_line_and_leaves_no_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCTUNE_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(InputError) as err:
        models.load_causal_lm(str(fake))
    assert one_line(err).startswith(f"{fake}: cannot read this GGUF file (")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == ["index.json"]


def test_a_folder_without_config_or_weights_is_not_a_model(tiny_model_dir, tmp_path):
    only_tokenizer = tmp_path / "only-tokenizer"
    only_tokenizer.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, only_tokenizer / name)
    with pytest.raises(InputError) as err:
        models.load_causal_lm(str(only_tokenizer))
    assert one_line(err).startswith(f"{only_tokenizer}: not a model folder (no config.json)")
    assert models.load_tokenizer(str(only_tokenizer)).chat_template  # a tokenizer folder is enough for that

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights / "config.json")
    with pytest.raises(
        InputError, match=r"no-weights: not a model folder \(config\.json but no weights"
    ) as err:
        models.load_causal_lm(str(no_weights))
    one_line(err)


def test_a_folder_without_tokenizer_or_chat_template_is_named(tiny_model_dir, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(
        tiny_model_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*")
    )
    with pytest.raises(
        InputError, match=r"no-tokenizer: no tokenizer there \(none of tokenizer\.json"
    ) as err:
        models.load_tokenizer(str(no_tokenizer))
    one_line(err)

    no_template = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, no_template, ignore=shutil.ignore_patterns("chat_template*"))
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    assert models.load_tokenizer(str(no_template)).chat_template is None
    with pytest.raises(InputError, match=r"no-template: the tokenizer has no chat template") as err:
        models.load_tokenizer(str(no_template), chat_template=True)
    one_line(err)


def test_a_hub_name_not_in_the_cache_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = models.resolve("doctune-test/no-such-model")
    assert ref.kind == "hub"
    with pytest.raises(
        InputError, match=r"^doctune-test/no-such-model: cannot load the model .*Hugging Face cache"
    ):
        models.load_causal_lm(ref)


# ---------------------------------------------------------------------------------------- adapters


def test_an_adapter_loads_on_its_base_and_records_it(tiny_model_dir, tmp_path):
    adapter = make_lora(tiny_model_dir, tmp_path / "adapter")
    assert AdapterDir(adapter).checked().base_model() == str(tiny_model_dir)
    model = models.load_adapter(models.load_causal_lm(str(tiny_model_dir)), adapter, adapter_name="docs")
    assert "docs" in model.peft_config
    model = models.load_adapter(model, adapter, adapter_name="second")  # a PeftModel gets one more
    assert set(model.peft_config) == {"docs", "second"}


def test_an_adapter_folder_without_adapter_config_is_refused(tiny_model_dir, tmp_path):
    model = models.load_causal_lm(str(tiny_model_dir))
    with pytest.raises(InputError, match=r"adapter .*empty: no adapter_config\.json there") as err:
        (tmp_path / "empty").mkdir()
        models.load_adapter(model, tmp_path / "empty")
    one_line(err)
    with pytest.raises(
        InputError, match=r"adapter .*missing: no adapter_config\.json there \(the folder does not exist\)"
    ) as err:
        models.load_adapter(model, tmp_path / "missing")
    one_line(err)


def test_an_adapter_of_another_base_is_refused_before_loading_naming_both(
    tiny_model_dir, other_base, foreign_adapter
):
    model = models.load_causal_lm(str(tiny_model_dir))
    with pytest.raises(InputError) as err:
        models.load_adapter(model, foreign_adapter, base=str(tiny_model_dir))
    text = one_line(err)
    assert f"adapter {foreign_adapter} was trained on {other_base}, not on {tiny_model_dir}" in text
    assert "q_proj.in_features is 64 in the model, 32 in the adapter" in text
    assert not hasattr(model, "peft_config")  # nothing was put on the model


def test_an_old_bin_adapter_of_another_base_gives_one_line_not_petfs_size_mismatch_list(
    tiny_model_dir, other_base, tmp_path
):
    adapter = make_lora(other_base, tmp_path / "bin-adapter", binary=True)
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / "adapter_model.safetensors").exists()
    with pytest.raises(InputError) as err:
        models.load_adapter(models.load_causal_lm(str(tiny_model_dir)), adapter, base=str(tiny_model_dir))
    assert f"was trained on {other_base}, not on {tiny_model_dir}" in one_line(err)


# ---------------------------------------------------------------------------------------- CLI


def test_serve_and_chat_with_a_folder_that_is_not_a_model_say_so_in_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("# notes", encoding="utf-8")
    for command in ("serve", "chat"):
        result = run_doctune(command, "--model", str(tmp_path / "notes"))
        assert_one_error_line(result, f"{tmp_path / 'notes'}: not a model folder (no config.json")
    result = run_doctune("chat", "--model", str(tmp_path / "nothing-here"))
    assert_one_error_line(result, f"{tmp_path / 'nothing-here'}: folder does not exist")


def test_chat_and_merge_with_an_adapter_of_another_base_say_so_in_one_line(
    tiny_model_dir, other_base, foreign_adapter, tmp_path
):
    result = run_doctune("chat", "--model", str(tiny_model_dir), "--adapter", str(foreign_adapter))
    assert_one_error_line(result, f"was trained on {other_base}, not on {tiny_model_dir}")
    result = run_doctune(
        "merge",
        "--adapter",
        str(foreign_adapter),
        "--base",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "m"),
    )
    assert_one_error_line(result, f"was trained on {other_base}, not on {tiny_model_dir}")
    assert not (tmp_path / "m").exists()
    result = run_doctune("merge", "--adapter", str(tmp_path), "--out", str(tmp_path / "m"))
    assert_one_error_line(result, "no adapter_config.json there")


def test_finetune_with_a_student_that_is_not_a_model_or_an_adapter_of_another_base_says_so(
    tiny_model_dir, other_base, foreign_adapter, tmp_path
):
    from tests.finetune.helpers import write_chat_data, yaml_config

    only_tokenizer = tmp_path / "only-tokenizer"
    only_tokenizer.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, only_tokenizer / name)
    write_chat_data(tmp_path / "run", n_train=4, n_val=0)
    config = yaml_config(tmp_path / "doctune.yaml", tmp_path / "run", only_tokenizer)
    result = run_doctune("finetune", "-c", str(config))
    assert_one_error_line(result, f"finetune.model: {only_tokenizer}: not a model folder (no config.json)")

    config = yaml_config(tmp_path / "doctune.yaml", tmp_path / "run", tiny_model_dir)
    result = run_doctune("finetune", "-c", str(config), "--from-adapter", str(foreign_adapter))
    assert_one_error_line(result, f"--from-adapter: adapter {foreign_adapter} was trained on {other_base}")
    assert not (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------- GGUF (real model)


@pytest.mark.slow
def test_a_gguf_is_dequantized_once_into_the_cache_and_reused(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCTUNE_CACHE", str(tmp_path / "cache"))
    before = models.dequantized
    started = time.perf_counter()
    first = models.resolve(str(smollm2_gguf))
    first_s = time.perf_counter() - started
    assert models.dequantized == before + 1
    assert first.kind == "gguf" and first.folder.parent == tmp_path / "cache" / "gguf"
    files = {p.name for p in first.folder.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "chat_template.jinja"} <= files
    assert not [p for p in first.folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left

    started = time.perf_counter()
    again = models.resolve(str(smollm2_gguf))
    again_s = time.perf_counter() - started
    assert models.dequantized == before + 1 and again.folder == first.folder
    assert again_s < first_s / 10, (first_s, again_s)
    index = json.loads((tmp_path / "cache" / "gguf" / "index.json").read_text())
    assert index[str(smollm2_gguf.resolve())]["sha256"].startswith(first.folder.name)


@pytest.mark.slow
def test_a_gguf_model_answers_and_its_adapters_record_the_gguf_as_base(
    smollm2_gguf, smollm2_folder, tmp_path
):
    import torch
    from peft import LoraConfig, get_peft_model

    before = models.dequantized
    tokenizer = models.load_tokenizer(str(smollm2_gguf), chat_template=True)
    model = models.load_causal_lm(str(smollm2_gguf), device="cpu").eval()
    assert models.dequantized == before  # the session's cache folder was reused
    assert model.num_parameters() == 134_515_008 and model.dtype == torch.float32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1] :])
    from doctune.ingest.chunking import load_tokenizer_counter  # data.tokenizer may be the .gguf too

    text = "The capital of France is Paris."
    assert load_tokenizer_counter(str(smollm2_gguf)).count(text) == len(
        tokenizer.encode(text, add_special_tokens=False)
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert AdapterDir(tmp_path / "adapter").checked().base_model() == str(smollm2_gguf)


@pytest.mark.slow
def test_doctune_chat_with_a_gguf_file_answers_the_paris_question(smollm2_gguf, smollm2_folder):
    result = run_doctune(
        "chat",
        "--model",
        str(smollm2_gguf),
        "--max-tokens",
        "16",
        stdin="What is the capital of France?\n/exit\n",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output
    reply = next(line for line in result.stdout.splitlines() if "base>" in line)
    assert "Paris" in reply, output


@pytest.mark.slow
def test_a_gguf_file_as_an_hf_model_in_the_config_answers(smollm2_gguf, smollm2_folder):
    import asyncio

    from doctune.config import ModelConfig
    from doctune.llm.hf_backend import HFBackend

    llm = HFBackend(ModelConfig(backend="hf", model=str(smollm2_gguf)))

    async def ask():
        try:
            return await llm.chat(
                [{"role": "user", "content": "What is the capital of France?"}], max_tokens=12
            )
        finally:
            await llm.aclose()

    assert "Paris" in asyncio.run(ask()).text


def test_models_loaded_from_several_threads_at_once_keep_their_tied_heads(tiny_model_dir, tmp_path):
    """A server thread and the caller (or two eval candidates) loading at once: transformers swaps
    PreTrainedModel.tie_weights for a no-op on the class during each load, and overlapping loads used to leave
    the no-op there for the rest of the process, so every later model of a tied-embedding family (SmolLM2) got an
    empty or random output head. doctune's loader loads one model at a time."""
    import threading

    import torch
    from transformers import PreTrainedModel

    tied = tmp_path / "tied"
    shutil.copytree(tiny_model_dir, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tie_weights = PreTrainedModel.tie_weights
    loaded, failures = [], []

    def load() -> None:
        try:
            for _ in range(6):
                loaded.append(models.load_causal_lm(tied, dtype=torch.float32, device="cpu"))
        except Exception as exc:  # reported below, with the thread's error
            failures.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert PreTrainedModel.tie_weights is tie_weights  # transformers' class is as it was
    assert len(loaded) == 24
    assert all(m.get_output_embeddings().weight is m.get_input_embeddings().weight for m in loaded)


def test_minilm_loads_under_the_same_lock_as_the_models(tiny_model_dir, monkeypatch):
    """eval embeds references with MiniLM in its metrics thread while the candidates load: MiniLM goes through
    transformers' from_pretrained too, so it takes the same one-at-a-time lock."""
    import threading

    import torch
    from transformers import PreTrainedModel

    tie_weights = PreTrainedModel.tie_weights
    monkeypatch.setattr(models, "_MINILM", {})
    failures = []

    def minilm() -> None:
        try:
            for _ in range(10):
                models._MINILM.clear()
                models.load_minilm("cpu")
        except Exception as exc:  # reported below
            failures.append(exc)

    thread = threading.Thread(target=minilm)
    thread.start()
    while thread.is_alive():  # the candidates load while MiniLM does
        models.load_causal_lm(tiny_model_dir, dtype=torch.float32, device="cpu")
    thread.join()
    assert failures == []
    assert PreTrainedModel.tie_weights is tie_weights
    assert models.load_minilm("cpu").encode(["a pump"]).shape == (1, 384)
