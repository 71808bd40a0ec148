"""merge and export read the adapter folder one way (doctune.adapters.AdapterDir): a broken
doctune_finetune.json is the same one-line InputError in both, before any model is loaded or file written."""

from __future__ import annotations

import json
import shutil

import pytest

from doctune.adapters import CHECKPOINTS_DIR, AdapterDir
from doctune.errors import InputError
from doctune.finetune.export import export
from doctune.finetune.merge import merge
from doctune.runs import sha256_file


@pytest.fixture
def adapter_copy(trained, tmp_path) -> AdapterDir:
    copy = tmp_path / "adapter"
    shutil.copytree(trained["adapter"], copy, ignore=shutil.ignore_patterns(CHECKPOINTS_DIR))
    return AdapterDir(copy)


@pytest.mark.parametrize(
    ("content", "error"), [("{not json", r"not valid JSON"), ("[1, 2]", r"not a JSON object")]
)
def test_a_broken_info_file_is_one_input_error_in_merge_and_export(adapter_copy, tmp_path, content, error):
    adapter_copy.info_file.write_text(content, encoding="utf-8")
    pattern = rf"^{adapter_copy.info_file}: {error}[^\n]*$"
    with pytest.raises(InputError, match=pattern):
        merge(adapter_copy.path, tmp_path / "merged")
    with pytest.raises(InputError, match=pattern):
        export(adapter_copy.path, tmp_path / "out" / "chatbot.gguf")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob("out/*"))


def test_merge_records_the_weights_and_the_adapters_template(adapter_copy, trained, tmp_path):
    out = tmp_path / "merged"
    merge(adapter_copy.path, out)
    info = json.loads((out / "doctune_merge.json").read_text())
    assert info["adapter_sha256"] == sha256_file(trained["adapter"] / adapter_copy.weights.name)
    assert info["chat_template_from"] == str(adapter_copy.path)  # it holds the tokenizer, so it wins
    assert info["base_model"] == AdapterDir(trained["adapter"]).base_model()
    assert (out / adapter_copy.chat_template.name).read_text() == adapter_copy.chat_template.read_text()
