"""What `doctune serve` and `doctune chat` take from an adapter folder: its template and training system prompt,
read through AdapterDir like every other command (one error behaviour for doctune_finetune.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from doctune.errors import InputError
from doctune.serve.models import read_adapter

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def adapter_folder(root: Path, info: str | None = None, template: bool = True) -> Path:
    """A folder as `doctune finetune` leaves it (the weights' content is not read here)."""
    folder = root / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "m"}), encoding="utf-8"
    )
    (folder / "adapter_model.safetensors").write_bytes(b"\0")
    if template:
        (folder / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    if info is not None:
        (folder / "doctune_finetune.json").write_text(info, encoding="utf-8")
    return folder


def test_a_doctune_adapter_is_served_with_its_template_and_training_system_prompt(tmp_path):
    folder = adapter_folder(tmp_path, json.dumps({"system_prompt": "Answer about Lumen."}))
    served = read_adapter("docs", folder, adapter="adapter_0", parent="tiny")
    assert (served.name, served.adapter, served.parent) == ("docs", "adapter_0", "tiny")
    assert served.source == str(folder)
    assert served.chat_template == TEMPLATE
    assert served.system_prompt == "Answer about Lumen."


@pytest.mark.parametrize("info", [None, json.dumps({"base_model": "m"}), json.dumps({"system_prompt": "  "})])
def test_an_adapter_without_a_training_system_prompt_gets_none(tmp_path, info):
    served = read_adapter("plain", adapter_folder(tmp_path, info, template=False), "adapter_0", "tiny")
    assert served.system_prompt is None and served.chat_template is None


@pytest.mark.parametrize(
    ("info", "why"), [("{broken", "not valid JSON"), ('["a list"]', "not a JSON object")]
)
def test_an_unreadable_info_file_is_one_line_naming_it(tmp_path, info, why):
    folder = adapter_folder(tmp_path, info)
    with pytest.raises(InputError, match=why) as err:
        read_adapter("docs", folder, "adapter_0", "tiny")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(folder / "doctune_finetune.json")) and "doctune finetune" in message


def test_a_folder_that_is_no_adapter_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r"no adapter_config\.json there"):
        read_adapter("docs", tmp_path, "adapter_0", "tiny")
