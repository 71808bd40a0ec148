"""finetune.dropout.BulkDropout: the LoRA dropout doctune trains with on a CPU must be dropout (independent
zeros with probability p, the rest scaled by 1/(1 - p), gradients through the kept elements only, nothing in
eval mode), and every LoRA layer of a CPU training must use it."""

from __future__ import annotations

import math

import pytest
import torch

from doctune.finetune.dropout import BulkDropout, use_bulk_dropout

P = 0.05


def sigmas(observed: float, p: float, n: int) -> float:
    return abs(observed - p) / math.sqrt(p * (1 - p) / n)


def test_each_element_is_dropped_independently_with_probability_p():
    torch.manual_seed(0)
    out = BulkDropout(P).train()(torch.ones(100_000, 4))
    assert torch.unique(out).tolist() == [0.0, pytest.approx(1 / (1 - P))]
    dropped = out == 0
    assert sigmas(dropped.float().mean().item(), P, out.numel()) < 5
    for lane in range(4):  # the four 16-bit numbers of one 64-bit draw are each uniform ...
        assert sigmas(dropped[:, lane].float().mean().item(), P, 100_000) < 5
    both = (dropped[:, 0] & dropped[:, 1]).float().mean().item()  # ... and independent of each other
    assert sigmas(both, P * P, 100_000) < 5


def test_gradient_flows_through_kept_elements_scaled_and_eval_mode_is_identity():
    torch.manual_seed(0)
    x = torch.randn(64, 48, requires_grad=True)
    dropout = BulkDropout(P).train()
    out = dropout(x)
    out.sum().backward()
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept].detach() / (1 - P))
    torch.testing.assert_close(x.grad, kept.float() / (1 - P))
    assert dropout.eval()(x) is x


def test_masks_are_fresh_each_call_reproducible_from_the_seed_and_keep_the_dtype():
    x = torch.ones(256, 256, dtype=torch.bfloat16)
    dropout = BulkDropout(P).train()
    torch.manual_seed(7)
    first, second = dropout(x), dropout(x)
    torch.manual_seed(7)
    again = dropout(x)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)
    assert first.dtype == torch.bfloat16


def test_every_lora_dropout_of_a_peft_model_is_replaced_and_outputs_in_eval_mode_are_unchanged(
    tiny_model_dir,
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_dropout=P, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    lora_layers = [
        m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
    ]
    assert use_bulk_dropout(model) == len(lora_layers) > 0
    assert all(isinstance(m.lora_dropout["default"], BulkDropout) for m in lora_layers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
        model.train()
        assert not torch.equal(model(input_ids=ids).logits, before)  # training mode drops


def test_a_cpu_training_uses_it_in_every_lora_layer(tiny_model_dir, tmp_path, monkeypatch):
    from tests.finetune.helpers import finetune_config, write_chat_data

    from doctune.finetune import dropout, train

    trained: list[list[type]] = []
    replace = dropout.use_bulk_dropout

    def recording(model):
        count = replace(model)
        kinds = [type(m.lora_dropout["default"]) for m in model.modules() if hasattr(m, "lora_dropout")]
        trained.append(kinds)
        return count

    monkeypatch.setattr(dropout, "use_bulk_dropout", recording)
    run_dir = tmp_path / "run"
    write_chat_data(run_dir, n_train=4, n_val=0)
    cfg = finetune_config(run_dir, tiny_model_dir, epochs=1, batch_size=4, lora={"r": 4, "dropout": 0.1})
    train.run(cfg)
    assert len(trained) == 1 and trained[0] and set(trained[0]) == {BulkDropout}
