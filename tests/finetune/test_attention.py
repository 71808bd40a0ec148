"""Padding-free rows: no sample attends to another, and the assistant-only loss is the per-sample loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from doctune.finetune import attention, data

LENGTHS = (7, 30, 1, 18, 42)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def random_samples(seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for n in LENGTHS:
        ids = torch.randint(10, 1000, (n,), generator=gen).tolist()
        labels = [
            tid if i >= n // 2 else data.IGNORE_INDEX for i, tid in enumerate(ids)
        ]  # "assistant" = 2nd half
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def test_padding_free_logits_equal_each_sample_run_alone(model):
    samples = random_samples()
    batch = data.flatten_batch(samples)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        alone = torch.cat([model(input_ids=torch.tensor([s["input_ids"]])).logits[0] for s in samples])
        flat_sdpa = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        model.set_attn_implementation(attention.register())
        flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        model.set_attn_implementation("sdpa")
    assert torch.allclose(flat, alone, atol=1e-5), float((flat - alone).abs().max())
    # without doctune's attention the same row lets later samples see earlier ones: the check above can fail
    assert not torch.allclose(flat_sdpa, alone, atol=1e-3)


def test_generation_with_a_cache_is_unchanged_by_the_varlen_attention(model, tiny_model_dir: Path):
    prompt = torch.tensor([[0, 2, 100, 200, 300, 4, 2]])
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
        model.set_attn_implementation(attention.register())
        got = model.generate(prompt, max_new_tokens=8, do_sample=False)
        model.set_attn_implementation("sdpa")
    assert got.tolist() == expected.tolist()


def test_assistant_only_loss_of_a_flat_row_is_the_token_mean_over_samples(
    tiny_model_dir: Path, tmp_path: Path
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from doctune.finetune.trainer import make_trainer_class

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.set_attn_implementation(attention.register())
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False
    )
    trainer = make_trainer_class()(model=model, args=args, data_collator=data.FlatCollator())
    samples = random_samples(seed=1)
    with torch.no_grad():
        loss = trainer.compute_loss(model, data.flatten_batch(samples))
        total, count = 0.0, 0
        for s in samples:
            logits = model(input_ids=torch.tensor([s["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(s["labels"][1:])
            keep = targets != data.IGNORE_INDEX
            if keep.any():
                total += float(
                    torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
                )
                count += int(keep.sum())
    assert float(loss) == pytest.approx(total / count, rel=1e-5)


def test_consecutive_rows_with_other_sample_lengths_each_equal_their_samples_alone(model):
    """The sample bounds are found once per row: a later row of other lengths must not reuse an earlier row's."""
    model.set_attn_implementation(attention.register())
    try:
        for seed, lengths in ((2, (20, 5, 33)), (3, (9, 40, 2, 7))):
            gen = torch.Generator().manual_seed(seed)
            samples = [{"input_ids": torch.randint(10, 1000, (n,), generator=gen).tolist()} for n in lengths]
            for s in samples:
                s["labels"] = s["input_ids"]
            batch = data.flatten_batch(samples)
            with torch.no_grad():
                flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
                alone = torch.cat(
                    [model(input_ids=torch.tensor([s["input_ids"]])).logits[0] for s in samples]
                )
            assert torch.allclose(flat, alone, atol=1e-5), (lengths, float((flat - alone).abs().max()))
    finally:
        model.set_attn_implementation("sdpa")
