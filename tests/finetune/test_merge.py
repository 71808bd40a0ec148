"""`doctune merge`: adapter + base → one model folder that generates what base + adapter generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from doctune.errors import DoctuneError, InputError
from doctune.finetune.merge import merge

PROMPTS = [
    [{"role": "user", "content": "What about the pump?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Clean the filter when?"}],
    [{"role": "user", "content": "Question 3: check seal replace gasket?"}],
]


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "model"
    summary = merge(trained["adapter"], out)
    assert summary.outputs == [str(out)]
    return out


def test_merged_folder_is_a_full_model_with_the_adapters_template(merged, trained):
    from transformers import AutoTokenizer

    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
    assert not (merged / "adapter_config.json").exists()
    assert (merged / "chat_template.jinja").read_text() == (
        trained["adapter"] / "chat_template.jinja"
    ).read_text()
    assert AutoTokenizer.from_pretrained(merged).chat_template == (merged / "chat_template.jinja").read_text()
    info = json.loads((merged / "doctune_merge.json").read_text())
    assert info["base_model"] == trained["cfg"].models["student"].model


def test_merged_greedy_outputs_equal_base_plus_adapter(merged, trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    full = AutoModelForCausalLM.from_pretrained(merged).eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(trained["adapter"])
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    differs_from_base = False
    for messages in PROMPTS:
        enc = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            a = full.generate(**enc, max_new_tokens=24, do_sample=False)
            b = with_adapter.generate(**enc, max_new_tokens=24, do_sample=False)
            c = base.generate(**enc, max_new_tokens=24, do_sample=False)
            assert torch.allclose(full(**enc).logits, with_adapter(**enc).logits, atol=1e-5)
        assert a.tolist() == b.tolist()
        differs_from_base |= a.tolist() != c.tolist()
    assert differs_from_base  # the merge carried the adapter, it is not just the base model


def test_merge_refuses_a_folder_without_an_adapter_or_an_output_inside_it(trained, tmp_path):
    with pytest.raises(InputError, match=r"adapter_config\.json"):
        merge(tmp_path, tmp_path / "out")
    with pytest.raises(DoctuneError, match="must not be the adapter folder"):
        merge(trained["adapter"], trained["adapter"] / "merged")


def test_merge_command_writes_the_model(trained, tmp_path):
    from typer.testing import CliRunner

    from doctune.cli import app

    out = tmp_path / "cli-merged"
    result = CliRunner().invoke(app, ["merge", "--adapter", str(trained["adapter"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
