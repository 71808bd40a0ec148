from pathlib import Path

import pytest
import yaml

from doctune.config import (
    Config,
    build_config,
    default_config_yaml,
    load_config,
    parse_overrides,
    reference_markdown,
)
from doctune.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "doctune.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_init_yaml_loads_back_to_the_defaults(tmp_path):
    text = default_config_yaml()
    assert "# Largest chunk, in tokens" in text
    cfg = load_config(write(tmp_path, text))
    assert cfg.model_dump() == Config().model_dump()


def test_every_field_has_a_description():
    from pydantic import BaseModel

    def walk(cls: type[BaseModel]):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation)

    walk(Config)


def test_one_message_per_problem_naming_key_and_value(tmp_path):
    path = write(
        tmp_path,
        "data: {chunk_tokens: lots}\ncurate: {mode: maybe, colour: red}\ngenerate: {total_questions: -3}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 4
    joined = "\n".join(problems)
    assert "data.chunk_tokens: got 'lots'" in joined
    assert "curate.mode: got 'maybe'" in joined and "'score', 'yesno' or 'off'" in joined
    assert "curate.colour: unknown key" in joined
    assert "generate.total_questions: got -3" in joined


def test_stage_referring_to_a_missing_model_fails(tmp_path):
    path = write(tmp_path, "generate: {model: writer}\neval: {candidates: {mine: {model: ghost}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    joined = "\n".join(info.value.problems)
    assert "generate.model: 'writer' is not a model" in joined
    assert "eval.candidates.mine.model: 'ghost'" in joined


def test_judge_not_needed_when_curation_is_off(tmp_path):
    models = {"student": {"backend": "hf", "model": "m"}}
    raw = {
        "models": models,
        "generate": {"model": "student"},
        "curate": {"mode": "off"},
        "eval": {"judge": None},
    }
    cfg = build_config(raw, tmp_path)
    assert cfg.curate.mode == "off"


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = write(tmp_path, "")
    cfg = load_config(path, parse_overrides(["data.chunk_tokens=256", "curate.dedup.semantic=0.9"]))
    assert cfg.data.chunk_tokens == 256
    assert cfg.curate.dedup.semantic == 0.9
    with pytest.raises(ConfigError, match=r"data\.nope \(set on the command line\): unknown key"):
        load_config(path, parse_overrides(["data.nope=1"]))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["chunk_tokens"])


def test_overlap_must_be_below_chunk_size(tmp_path):
    with pytest.raises(ConfigError, match="chunk_overlap"):
        load_config(write(tmp_path, "data: {chunk_tokens: 64, chunk_overlap: 64}\n"))


def test_relative_paths_start_at_the_config_folder(tmp_path):
    cfg = load_config(write(tmp_path, "run_dir: runs/a\ndata: {dir: docs}\n"))
    assert cfg.run_path == tmp_path.resolve() / "runs/a"
    assert cfg.path(cfg.data.dir) == tmp_path.resolve() / "docs"
    assert cfg.path("{run_dir}/adapter") == tmp_path.resolve() / "runs/a/adapter"


@pytest.mark.parametrize("text", ["[1, 2]", "run_dir: [unclosed", "just words"])
def test_non_mapping_or_broken_yaml_is_one_clean_error(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert len(info.value.problems) == 1


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="doctune init"):
        load_config(tmp_path / "nope.yaml")


def test_reference_lists_every_leaf_key():
    table = reference_markdown()
    for key in ("`data.chunk_tokens`", "`curate.dedup.near`", "`models.NAME.base_url`", "`finetune.lora.r`"):
        assert key in table
    assert yaml.safe_load(default_config_yaml())["finetune"]["lora"]["alpha"] == 32


def test_readme_configuration_reference_is_current():
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    try:
        from config_reference import updated
    finally:
        sys.path.pop(0)
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert updated(readme) == readme, (
        "README's configuration reference is stale: run scripts/config_reference.py"
    )


def test_a_wrong_value_from_the_command_line_is_reported_as_such_not_as_the_files(tmp_path):
    path = write(tmp_path, "curate: {threshold: 9}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, parse_overrides(["data.chunk_tokens=-1"]))
    assert info.value.source == str(path)  # one problem is in the file
    assert any(
        p.startswith("data.chunk_tokens (set on the command line): got -1") for p in info.value.problems
    )
    assert any(p.startswith("curate.threshold: got 9") for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), parse_overrides(["generate.model=writer"]))
    assert info.value.source == "command line"
    assert info.value.problems[0].startswith("generate.model (set on the command line): 'writer'")


FINETUNE_ONLY = "run_dir: run\nmodels:\n  student: {backend: hf, model: some/student}\n"


def test_a_command_checks_only_the_models_its_stage_uses(tmp_path):
    path = write(tmp_path, FINETUNE_ONLY)
    cfg = load_config(path, stages=("finetune",))
    assert cfg.finetune.model == "student"
    load_config(path, stages=())  # ingest, serve, merge: no model reference
    with pytest.raises(ConfigError, match=r"generate\.model: 'teacher' is not a model") as info:
        load_config(path, stages=("generate",))
    assert len(info.value.problems) == 1  # nothing about the judge
    with pytest.raises(ConfigError) as info:
        load_config(path)  # `doctune run`: every stage
    joined = "\n".join(info.value.problems)
    assert "generate.model" in joined and "curate.model" in joined and "eval.judge" in joined


def test_finetune_only_config_works_with_the_finetune_command(tmp_path):
    write(tmp_path, FINETUNE_ONLY)
    # the config is accepted: finetune goes on to load the student (not on the hub here: an input error)
    proc = _doctune(tmp_path, "finetune")
    assert "is not a model" not in proc.stderr, proc.stderr
    assert "some/student" in proc.stderr and proc.returncode == 3, proc.stderr
    proc = _doctune(tmp_path, "run")
    assert "generate.model: 'teacher' is not a model" in proc.stderr and proc.returncode == 2


def _doctune(cwd: Path, *args: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "doctune", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("value", ["off", "Off", "OFF", "'off'", "false"])
def test_unquoted_off_is_the_off_mode(tmp_path, value):
    cfg = load_config(write(tmp_path, f"curate: {{mode: {value}}}\n"))
    assert cfg.curate.mode == "off"
    cfg = load_config(write(tmp_path, ""), parse_overrides([f"curate.mode={value}"]))
    assert cfg.curate.mode == "off"


def test_false_stays_wrong_where_off_is_not_a_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.judge_mode: got False"):
        load_config(write(tmp_path, "eval: {judge_mode: off}\n"))


def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path):
    text = "run_dir: r\ndata:\n  dir: docs\ncurate: {threshold: 3}\ndata:\n  dir: other\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    (problem,) = info.value.problems
    assert "line 5" in problem and "duplicate key 'data' (first at line 2)" in problem
    with pytest.raises(ConfigError, match="duplicate key 'dir'"):
        load_config(write(tmp_path, "data: {dir: a, dir: b}\n"))


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    text = "models:\n  teacher: &t {backend: hf, model: a}\n  judge: {<<: *t, model: b}\n  student: *t\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.models["judge"].model == "b" and cfg.models["judge"].backend == "hf"


def test_a_folder_as_config_uses_its_doctune_yaml_or_says_what_to_give(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"is a folder, give the doctune\.yaml file"):
        load_config(tmp_path / "empty")
    write(tmp_path, "run_dir: from-folder\n")
    assert load_config(tmp_path).run_dir == "from-folder"


def test_doctests():
    import doctest

    import doctune.config

    assert doctest.testmod(doctune.config).failed == 0
