"""`doctune finetune` on the tiny model: what it writes, what it refuses, and that it learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tests.finetune.helpers import SYSTEM, finetune_config, write_chat_data

from doctune.adapters import ADAPTER_WEIGHTS, BEST_DIR, CHECKPOINTS_DIR, FINETUNE_INFO, LAST_DIR, METRICS
from doctune.errors import ConfigError, DoctuneError, InputError
from doctune.finetune import train

WEIGHTS = ADAPTER_WEIGHTS[0]  # adapter_model.safetensors


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_adapter_folder_holds_a_standard_adapter_its_template_and_what_was_trained(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = trained["adapter"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 32
    # short module names, the form every adapter loader (vLLM --lora-modules included) accepts
    assert sorted(config["target_modules"]) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert (adapter / "chat_template.jinja").read_text() == AutoTokenizer.from_pretrained(
        tiny_model_dir
    ).chat_template

    info = json.loads((adapter / FINETUNE_INFO).read_text())
    assert info["base_model"] == str(tiny_model_dir)
    assert info["system_prompt"] == SYSTEM
    assert info["chat_template"] == {"file": "chat_template.jinja", "source": "tokenizer"}
    assert info["data"]["train_samples"] == 16 and info["data"]["val_samples"] == 4
    assert info["training"]["mode"] == "single" and info["training"]["steps"] == 8

    manifest = json.loads((trained["run_dir"] / "manifest.json").read_text())
    assert manifest["stages"]["finetune"]["counts"]["steps"] == 8
    assert "train.jsonl" in manifest["stages"]["finetune"]["inputs"]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[0, 2, 100, 200, 4, 2]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)  # the adapter is trained, not the zero init


def test_val_loss_and_perplexity_every_eval_steps_and_best_and_last_adapters_kept(trained):
    adapter = trained["adapter"]
    metrics = json.loads((adapter / METRICS).read_text())
    evals = metrics["eval"]
    assert [e["step"] for e in evals] == [2, 4, 6, 8]
    assert all(e["perplexity"] == pytest.approx(math.exp(e["loss"])) for e in evals)
    best = min(evals, key=lambda e: e["loss"])
    assert metrics["best"]["step"] == best["step"] and metrics["last"]["step"] == 8
    checkpoints = adapter / CHECKPOINTS_DIR
    weights = WEIGHTS
    assert same_tensors(adapter / weights, checkpoints / f"checkpoint-{best['step']}" / weights)
    assert same_tensors(adapter / LAST_DIR / weights, checkpoints / "checkpoint-8" / weights)
    assert (adapter / LAST_DIR / "chat_template.jinja").is_file()


def test_loss_falls_on_a_small_set_it_can_memorise(tiny_model_dir, tmp_path):
    # LoRA cannot touch the random model's output head or final norm, so its loss floor on 4 answers is
    # ~5.5 nats (from ln(1024) = 6.9 at the start): a fall of 0.5 nats is learning, not noise.
    run_dir = tmp_path / "run"
    write_chat_data(run_dir, n_train=4, n_val=0)
    cfg = finetune_config(
        run_dir,
        tiny_model_dir,
        epochs=50,
        batch_size=4,
        lr=1e-2,
        eval_steps=1000,
        lora={"r": 16, "alpha": 32, "dropout": 0.0},
    )
    summary = train.run(cfg)
    metrics = json.loads((run_dir / "adapter" / METRICS).read_text())
    losses = [row["loss"] for row in metrics["train"]]
    assert [row["step"] for row in metrics["train"]] == [10, 20, 30, 40, 50]
    assert losses[-1] < losses[0] - 0.5, losses
    assert losses == sorted(losses, reverse=True), losses
    assert any("no validation" in w for w in summary.warnings)


def test_an_earlier_run_is_not_overwritten_without_resume_or_overwrite(trained):
    with pytest.raises(DoctuneError, match=r"--resume.*--overwrite"):
        train.run(trained["cfg"])


def test_from_adapter_continues_that_adapter_without_stacking_a_second(trained, tmp_path):
    cfg = finetune_config(trained["run_dir"], trained["cfg"].models["student"].model, epochs=1, lora={"r": 2})
    out = tmp_path / "continued"
    train.run(cfg, output_dir=out, from_adapter=trained["adapter"])
    original = tensors(trained["adapter"] / WEIGHTS)
    continued = tensors(out / WEIGHTS)
    assert continued.keys() == original.keys()  # one adapter, same modules (no second one on top)
    assert all(continued[k].shape == original[k].shape for k in original)  # r=8 from the adapter, not r=2
    assert any(not torch.equal(continued[k], original[k]) for k in original)  # and it trained further
    info = json.loads((out / FINETUNE_INFO).read_text())
    assert info["from_adapter"] == str(trained["adapter"]) and info["lora"]["r"] == 8


def test_unusable_conversations_are_skipped_and_reported(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    write_chat_data(run_dir, n_train=8, n_val=2)
    with open(run_dir / "train.jsonl", "a", encoding="utf-8") as f:
        f.write("{broken\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    summary = train.run(finetune_config(run_dir, tiny_model_dir, epochs=1))
    info = json.loads((run_dir / "adapter" / FINETUNE_INFO).read_text())
    assert info["data"]["train_samples"] == 8 and info["data"]["skipped"] == 2
    assert any("train.jsonl:9" in w for w in summary.warnings)
    assert any("train.jsonl:10" in w for w in summary.warnings)


def test_no_trainable_conversation_fails_before_training(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    write_chat_data(run_dir, n_train=4, n_val=1)
    with pytest.raises(InputError, match=r"no usable conversation.*max_length"):
        train.run(finetune_config(run_dir, tiny_model_dir, max_length=8))
    assert not (run_dir / "adapter" / FINETUNE_INFO).exists()  # no adapter written (the folder is claimed)


def test_packing_trains_and_evaluates_at_eval_steps_and_at_the_end(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    write_chat_data(run_dir, n_train=24, n_val=4)
    cfg = finetune_config(
        run_dir,
        tiny_model_dir,
        packing=True,
        max_length=128,
        batch_size=1,
        epochs=4,
        eval_steps=3,
        report_to=["tensorboard"],
    )
    train.run(cfg)
    info = json.loads((run_dir / "adapter" / FINETUNE_INFO).read_text())
    steps = info["training"]["steps"]
    assert 0 < steps < 4 * 24  # rows of several samples, not one sample per step
    evals = json.loads((run_dir / "adapter" / METRICS).read_text())["eval"]
    expected = list(range(3, steps + 1, 3)) + ([steps] if steps % 3 else [])
    assert [e["step"] for e in evals] == expected

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "adapter" / train.TENSORBOARD_DIR)).Reload()
    assert [e.step for e in events.Scalars("eval/loss")] == expected


def test_template_that_renders_prefixes_inconsistently_stops_before_training(tiny_model_dir, tmp_path):
    import shutil

    student = tmp_path / "student"
    shutil.copytree(tiny_model_dir, student)
    # no generation markers, and the message count in the first line: no prompt is the start of the conversation
    (student / "chat_template.jinja").write_text(
        "{{ 'messages: ' ~ (messages | length) ~ '\n' }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] "
        "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
        encoding="utf-8",
    )
    run_dir = tmp_path / "run"
    write_chat_data(run_dir, n_train=4, n_val=1)
    with pytest.raises(ConfigError, match=r"prefixes inconsistently.*\{% generation %\}"):
        train.run(finetune_config(run_dir, student))
    assert not (run_dir / "adapter" / FINETUNE_INFO).exists()  # no adapter written (the folder is claimed)


def val_loss(model_dir: Path, adapter: Path, val_path: Path) -> float:
    """Mean loss per trained token of val.jsonl under base + adapter, each conversation run on its own (the
    Trainer's eval loss when val.jsonl fits in one eval batch: it averages per batch)."""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from doctune.finetune import data

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    template, _ = data.training_template(tokenizer)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)).eval()
    total, count = 0.0, 0
    for messages in data.read_conversations(val_path).conversations:
        sample = data.tokenize_conversation(tokenizer, messages, template, max_length=2048)
        targets = torch.tensor(sample["labels"][1:])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0, :-1]
        keep = targets != data.IGNORE_INDEX
        total += F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


@pytest.fixture(scope="module")
def overfit(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run whose val loss bottoms out before the last step (high lr, 24 steps, val loss every 2)."""
    run_dir = tmp_path_factory.mktemp("overfit") / "run"
    write_chat_data(run_dir, n_train=16, n_val=4)  # 4 val conversations: one eval batch of 4
    runs = {}
    for select in ("val_loss", "last"):
        out = run_dir / f"adapter-{select}"
        train.run(finetune_config(run_dir, tiny_model_dir, epochs=6, lr=5e-2, select=select), output_dir=out)
        runs[select] = out
    return {"run_dir": run_dir, **runs}


def test_adapter_holds_the_lowest_val_loss_step_and_last_the_last_step(overfit, tiny_model_dir):
    out = overfit["val_loss"]
    metrics = json.loads((out / METRICS).read_text())
    best, last = metrics["best"], metrics["last"]
    assert (
        best["step"] < last["step"] == 24 and best["eval_loss"] < last["eval_loss"]
    )  # they differ in this run
    assert best["eval_loss"] == min(e["loss"] for e in metrics["eval"])
    weights = WEIGHTS
    assert not same_tensors(out / weights, out / LAST_DIR / weights)
    val = overfit["run_dir"] / "val.jsonl"
    assert val_loss(tiny_model_dir, out, val) == pytest.approx(best["eval_loss"], abs=1e-4)
    assert val_loss(tiny_model_dir, out / LAST_DIR, val) == pytest.approx(last["eval_loss"], abs=1e-4)
    info = json.loads((out / FINETUNE_INFO).read_text())
    assert info["select"] == "val_loss" and info["best"]["dir"] == "." and info["last"]["dir"] == LAST_DIR
    assert not (out / BEST_DIR).exists()


def test_select_last_puts_the_last_step_in_the_adapter_and_the_best_in_best(overfit, tiny_model_dir):
    out, by_val_loss = overfit["last"], overfit["val_loss"]
    weights = WEIGHTS
    # the same seed and data: the same training, only which adapter goes where differs
    assert same_tensors(out / weights, by_val_loss / LAST_DIR / weights)
    assert same_tensors(out / BEST_DIR / weights, by_val_loss / weights)
    metrics = json.loads((out / METRICS).read_text())
    val = overfit["run_dir"] / "val.jsonl"
    assert val_loss(tiny_model_dir, out, val) == pytest.approx(metrics["last"]["eval_loss"], abs=1e-4)
    info = json.loads((out / FINETUNE_INFO).read_text())
    assert info["select"] == "last" and info["last"]["dir"] == "." and info["best"]["dir"] == BEST_DIR
    assert not (out / LAST_DIR).exists()
    assert (out / BEST_DIR / "chat_template.jinja").is_file()


NO_CUDA = train.Hardware(cuda=False, bf16=False, bitsandbytes=False, flash_attention=False)
CUDA_NO_BNB = train.Hardware(cuda=True, bf16=True, bitsandbytes=False, flash_attention=False)
CUDA = train.Hardware(cuda=True, bf16=True, bitsandbytes=True, flash_attention=False)


def test_settings_this_machine_cannot_honour_are_named_not_replaced(tiny_model_dir, tmp_path):
    fcfg = finetune_config(tmp_path / "run", tiny_model_dir, quantization="4bit").finetune
    [problem] = train.settings_problems(fcfg, NO_CUDA)
    assert problem.startswith("finetune.quantization: '4bit'") and "CUDA" in problem
    [problem] = train.settings_problems(fcfg, CUDA_NO_BNB)
    assert "pip install bitsandbytes" in problem
    assert train.settings_problems(fcfg, CUDA) == []

    fsdp = finetune_config(tmp_path / "run", tiny_model_dir, fsdp="full_shard").finetune
    [problem] = train.settings_problems(fsdp, NO_CUDA)
    assert problem.startswith("finetune.fsdp: 'full_shard'") and "DDP" in problem
    assert train.settings_problems(fsdp, CUDA) == []

    wandb = finetune_config(tmp_path / "run", tiny_model_dir, report_to=["no_such_logger_pkg"]).finetune
    assert "not a logger doctune knows" in train.settings_problems(wandb, NO_CUDA)[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_quantization_on_a_machine_without_cuda_is_a_config_error(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    write_chat_data(run_dir, n_train=4, n_val=1)
    with pytest.raises(ConfigError, match=r"finetune\.quantization"):
        train.run(finetune_config(run_dir, tiny_model_dir, quantization="8bit"))


def test_qlora_settings_are_nf4_with_double_quantization():
    q4 = train.quantization_config("4bit", torch.bfloat16)
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4" and q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == torch.bfloat16
    assert train.quantization_config("8bit", torch.bfloat16).load_in_8bit
