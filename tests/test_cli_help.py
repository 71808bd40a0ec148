"""Help texts of options that mirror a config field are that field's description (they cannot drift), and the
default paths they name are the run folder's."""

from __future__ import annotations

import re

import pytest
import typer.main

from doctune.cli import app
from doctune.config import Config

# option -> the config field it overrides, for every command that has it
MIRRORED = {
    "--run-dir": "run_dir",
    "--data-dir": "data.dir",
    "--total-questions": "generate.total_questions",
    "--pairwise": "eval.pairwise",
    "--no-similarity": "eval.similarity",
    "--mode": "curate.mode",
    "--threshold": "curate.threshold",
    "--host": "serve.host",
    "--port": "serve.port",
}
PER_COMMAND = {("eval", "--eval-set"): "eval.eval_set", ("eval", "--prompts"): "eval.prompts"}
PER_COMMAND[("curate", "--eval-set")] = "curate.eval_set"


def description(key: str) -> str:
    model = Config
    *sections, name = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[name].description


def options() -> list[tuple[str, str, str]]:
    """(command, option, help) of every option of every command."""
    group = typer.main.get_command(app)
    found = []
    for name, command in group.commands.items():
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--"):
                    found.append((name, opt, param.help or ""))
    return found


def test_every_mirrored_option_shows_its_fields_description():
    checked = set()
    for command, opt, help_text in options():
        key = PER_COMMAND.get((command, opt)) or MIRRORED.get(opt)
        if key is None:
            continue
        assert f"{key}: {description(key)}" in help_text, (command, opt, help_text)
        checked.add((command, opt))
    assert {
        ("eval", "--eval-set"),
        ("curate", "--eval-set"),
        ("serve", "--port"),
        ("ingest", "--data-dir"),
    } <= checked
    assert {opt for _, opt in checked} == set(MIRRORED) | {opt for _, opt in PER_COMMAND}


def test_no_option_names_a_config_key_it_does_not_take_the_description_of():
    """An option whose help says it overrides KEY carries KEY's description (no hand-written copy)."""
    for command, opt, help_text in options():
        match = re.match(r"(Override|Turn off) ([a-z_.]+):", help_text)
        if match:
            assert description(match.group(2)) in help_text, (command, opt)


@pytest.mark.parametrize(
    ("command", "opt", "default"),
    [
        ("finetune", "--output-dir", "{run_dir}/adapter"),
        ("merge", "--adapter", "{run_dir}/adapter"),
        ("merge", "--out", "{run_dir}/merged"),
        ("export", "--adapter", "{run_dir}/adapter"),
        ("export", "--out", "{run_dir}/export/chatbot-{type}.gguf"),
    ],
)
def test_default_paths_in_help_are_the_run_folders(command, opt, default):
    helps = {(c, o): h for c, o, h in options()}
    assert f"(default: {default})" in helps[(command, opt)]


@pytest.mark.parametrize("command", ["merge", "export"])
def test_merge_and_export_default_to_the_runs_adapter(tmp_path, command):
    """Without --adapter, both read {run_dir}/adapter of the config (here missing: one line naming it)."""
    from typer.testing import CliRunner

    config = tmp_path / "doctune.yaml"
    config.write_text("run_dir: runs/x\n", encoding="utf-8")
    result = CliRunner().invoke(app, [command, "-c", str(config)])
    assert result.exit_code != 0
    message = str(result.exception)
    assert str(tmp_path / "runs" / "x" / "adapter") in message and "\n" not in message
