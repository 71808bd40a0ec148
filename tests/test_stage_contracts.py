"""The stage contracts (doctune.stages) against the real stages: the tiny quickstart (examples/quickstart,
doctune.tiny.yaml) on the tiny random model, with a prompt file for each stage and an adapter kept outside the
run folder as an extra eval candidate.

- One first run (module-scoped, in a subprocess that records every file each stage opens for reading, with an
  audit hook): every file a stage reads, outside Python's own files, doctune's cache and the stage's own
  outputs, is one its contract declares.
- Then, on a fresh copy of that run for each case, one declared input is changed as a user would (a document,
  a prompt file, the eval set, the user's pairs, the kept adapter, a config section, the model file) and
  `doctune run` must re-run exactly the first stage that reads it and every stage after it, and skip the rest.

Run as a script (`python tests/test_stage_contracts.py CONFIG OUT.json`), this file is the audited first run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"
PROMPTS = ROOT / "src" / "doctune" / "prompts"
STAGES = ["ingest", "generate", "curate", "finetune", "eval"]
KEPT_ADAPTER = "kept-adapter"  # outside the run folder


# ------------------------------------------------------------------------------------------- the project


def make_project(folder: Path, tiny_model_dir: Path) -> Path:
    """The tiny quickstart, made smaller, with its model, prompt files and a kept adapter in `folder`."""
    folder.mkdir(parents=True)
    shutil.copytree(QUICKSTART / "data", folder / "data")
    shutil.copy(QUICKSTART / "faq.json", folder / "faq.json")
    eval_set = json.loads((QUICKSTART / "eval_set.json").read_text(encoding="utf-8"))[:8]
    (folder / "eval_set.json").write_text(json.dumps(eval_set, indent=1), encoding="utf-8")
    shutil.copytree(tiny_model_dir, folder / "model")
    for stage in ("generate", "curate", "eval"):
        shutil.copy(PROMPTS / f"{stage}.yaml", folder / f"{stage}-prompts.yaml")
    write_adapter(folder / "model", folder / KEPT_ADAPTER, seed=0)
    raw = yaml.safe_load((QUICKSTART / "doctune.tiny.yaml").read_text(encoding="utf-8"))
    raw["run_dir"] = "run"
    raw["models"]["tiny"]["model"] = "model"
    raw["generate"] |= {"total_questions": 12, "max_tokens": 96, "prompts": "generate-prompts.yaml"}
    raw["curate"]["prompts"] = "curate-prompts.yaml"
    raw["finetune"]["epochs"] = 1
    raw["eval"] |= {"max_tokens": 24, "similarity": False, "prompts": "eval-prompts.yaml"}
    raw["eval"]["candidates"]["kept"] = {"model": "tiny", "adapter": KEPT_ADAPTER}
    config = folder / "doctune.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return config


def write_adapter(model: Path, out: Path, seed: int) -> None:
    """A LoRA adapter for `model` trained elsewhere (PEFT's files only), with random non-zero weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(out)


def edit_yaml(path: Path, change: Callable[[dict], None]) -> None:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(raw)
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")


def edit_prompt(path: Path) -> None:
    """Add a sentence to every template of a prompt file (its placeholders stay as they are)."""
    edit_yaml(path, lambda raw: raw.update({k: v + "\nBe brief." for k, v in raw.items()}))


def edit_eval_set(path: Path) -> None:
    items = json.loads(path.read_text(encoding="utf-8"))
    items.append({"question": "Does Lumen Notes sync over Bluetooth?", "answer": "No."})
    path.write_text(json.dumps(items, indent=1), encoding="utf-8")


def edit_extra_pairs(path: Path) -> None:
    pairs = json.loads(path.read_text(encoding="utf-8"))
    pairs.append({"Question": "Is Lumen Notes free?", "Answer": "The personal edition is free."})
    path.write_text(json.dumps(pairs, indent=1), encoding="utf-8")


def retrain_kept_adapter(project: Path) -> None:
    """The kept adapter replaced by another training (other weights, same files)."""
    write_adapter(project / "model", project / KEPT_ADAPTER, seed=1)


def replace_model_weights(project: Path) -> None:
    """The model file replaced by another model of the same shape (another seed)."""
    from doctune.tinymodel import build_tiny_model

    other = project.parent / "other-model"
    build_tiny_model(other, size="tiny", seed=1)
    shutil.copy(other / "model.safetensors", project / "model" / "model.safetensors")


def set_key(section: str, key: str, value) -> Callable[[Path], None]:
    def change(project: Path) -> None:
        def edit(raw: dict) -> None:
            target = raw
            for part in section.split("."):
                target = target[part]
            assert target.get(key) != value
            target[key] = value

        edit_yaml(project / "doctune.yaml", edit)

    return change


# (what changes, how, the first stage that must re-run: it and every stage after it run, the others skip)
CASES: list[tuple[str, Callable[[Path], None], str | None]] = [
    ("nothing", lambda p: None, None),
    (
        "a document",
        lambda p: append(p / "data" / "overview.md", "\nLumen Notes syncs over Bluetooth.\n"),
        "ingest",
    ),
    ("section data", set_key("data", "chunk_overlap", 24), "ingest"),
    ("the model's config", set_key("models.tiny", "dtype", "float32"), "ingest"),
    ("the model file", replace_model_weights, "ingest"),
    ("the generate prompt file", lambda p: edit_prompt(p / "generate-prompts.yaml"), "generate"),
    ("section generate", set_key("generate", "temperature", 0.9), "generate"),
    ("the curate prompt file", lambda p: edit_prompt(p / "curate-prompts.yaml"), "curate"),
    (
        "the eval set (curate's contamination guard reads it)",
        lambda p: edit_eval_set(p / "eval_set.json"),
        "curate",
    ),
    ("the user's pairs", lambda p: edit_extra_pairs(p / "faq.json"), "curate"),
    ("section curate", set_key("curate", "val_fraction", 0.25), "curate"),
    ("section finetune", set_key("finetune", "lr", 2.0e-3), "finetune"),
    ("the eval prompt file", lambda p: edit_prompt(p / "eval-prompts.yaml"), "eval"),
    ("the adapter kept outside the run", retrain_kept_adapter, "eval"),
    ("section eval", set_key("eval", "max_tokens", 20), "eval"),
]


# ------------------------------------------------------------------------------------------- the first run


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir):
    """(project folder, a pristine copy of it after the first run, the files each stage opened for reading)."""
    base = tmp_path_factory.mktemp("contracts")
    project = base / "project"
    config = make_project(project, tiny_model_dir)
    opened = base / "opened.json"
    proc = subprocess.run(
        [sys.executable, __file__, str(config), str(opened)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pristine = base / "pristine"
    shutil.copytree(project, pristine, symlinks=True)
    return project, pristine, json.loads(opened.read_text(encoding="utf-8"))


def restore(project: Path, pristine: Path) -> None:
    """The project as the first run left it, at the same path (file times kept: model identities are
    size + mtime)."""
    shutil.rmtree(project)
    shutil.copytree(pristine, project, symlinks=True)


# ------------------------------------------------------------------------------------------- the tests


@pytest.mark.slow
@pytest.mark.parametrize(("what", "change", "first"), CASES, ids=[c[0] for c in CASES])
def test_a_changed_input_reruns_its_first_reader_and_every_stage_after_it(first_run, what, change, first):
    from doctune import pipeline
    from doctune.config import load_config

    project, pristine, _ = first_run
    restore(project, pristine)
    change(project)
    outcomes = pipeline.run(load_config(project / "doctune.yaml"))
    start = STAGES.index(first) if first else len(STAGES)
    expected = [(name, "ran" if i >= start else "skipped") for i, name in enumerate(STAGES)]
    assert [(o.name, o.status) for o in outcomes] == expected, what


@pytest.mark.slow
def test_other_packaged_templates_rerun_the_stage_that_fills_them(first_run, tmp_path, monkeypatch):
    """A doctune upgrade whose packaged curate templates differ: curate runs again on them, ingest and generate
    are skipped."""
    from doctune import pipeline, prompts
    from doctune.config import load_config

    project, pristine, _ = first_run
    restore(project, pristine)
    edit_yaml(project / "doctune.yaml", lambda raw: raw["curate"].pop("prompts"))  # the packaged ones, then
    pipeline.run(load_config(project / "doctune.yaml"))
    upgraded = tmp_path / "curate.yaml"
    shutil.copy(PROMPTS / "curate.yaml", upgraded)
    edit_prompt(upgraded)
    installed = prompts.packaged_prompt_file
    monkeypatch.setattr(
        prompts, "packaged_prompt_file", lambda name: upgraded if name == "curate" else installed(name)
    )
    assert "Be brief." in prompts.load_prompts("curate")["curation_prompt_template"]
    outcomes = {o.name: o.status for o in pipeline.run(load_config(project / "doctune.yaml"))}
    assert (outcomes["ingest"], outcomes["generate"], outcomes["curate"]) == ("skipped", "skipped", "ran")


@pytest.mark.slow
def test_every_file_a_stage_reads_is_declared_in_its_contract(first_run):
    from doctune import stages
    from doctune.config import load_config

    project, pristine, opened = first_run
    restore(project, pristine)
    cfg = load_config(project / "doctune.yaml")
    ignored = [Path(p).resolve() for p in _not_run_inputs()]
    for contract in stages.CONTRACTS:
        own = [p.resolve() for p in (*contract.writes(cfg.run_folder), *contract.also_writes(cfg.run_folder))]
        declared = {p.resolve() for p in stages.declared_reads(contract, cfg)}
        read = {Path(p).resolve() for p in opened[contract.name]}
        read = {p for p in read if p.is_file() and not _within(p, ignored + own) and not _temporary(p, cfg)}
        assert read - declared == set(), f"{contract.name} reads files its contract does not declare"
    # the hook saw the reads (not an empty record): one declared input of each kind
    seen = {name: {Path(p).resolve() for p in paths} for name, paths in opened.items()}
    assert (project / "data" / "overview.md").resolve() in seen["ingest"]
    assert {cfg.run_folder.chunks, project / "generate-prompts.yaml"} <= seen["generate"]
    assert {cfg.run_folder.qa_raw, project / "faq.json", project / "curate-prompts.yaml"} <= seen["curate"]
    assert cfg.run_folder.train in seen["finetune"]
    kept_config = project / KEPT_ADAPTER / "adapter_config.json"
    assert {project / "eval_set.json", project / "eval-prompts.yaml", kept_config} <= seen["eval"]


def _not_run_inputs() -> list[str]:
    """What no contract declares as a file by design: Python and installed packages (doctune's packaged
    prompts included: contracts name them in `prompts`, fingerprinted by content), doctune's model cache,
    matplotlib's font cache (the eval report's plots), the operating system's files."""
    import site

    import matplotlib

    import doctune

    return [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        *site.getsitepackages(),
        str(Path(doctune.__file__).parent),
        __file__,  # this file, the audited run's script (read back for warnings' source lines)
        os.environ["DOCTUNE_CACHE"],
        matplotlib.get_cachedir(),
        "/proc",
        "/sys",
        "/dev",
        "/etc",
        "/usr",
    ]


def _within(path: Path, folders: list[Path]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def _temporary(path: Path, cfg) -> bool:
    from doctune.runs import TEMPORARY_NAME

    return _within(path, [cfg.run_path.resolve()]) and TEMPORARY_NAME.fullmatch(path.name) is not None


# ------------------------------------------------------------------------------------------- the audited run


def _audited_first_run(config: str, out: str) -> None:
    """Run every stage once, one at a time, recording each file a stage opens for reading."""
    import logging

    from doctune import pipeline
    from doctune.config import load_config

    logging.basicConfig(level=logging.WARNING)
    current: list[str] = []
    opened: dict[str, set[str]] = {name: set() for name in STAGES}
    write_flags = os.O_WRONLY | os.O_RDWR

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not current or isinstance(args[0], int):
            return
        path, mode, flags = args
        reading = not any(c in mode for c in "wax+") if isinstance(mode, str) else not flags & write_flags
        if reading:
            opened[current[0]].add(os.path.abspath(os.fsdecode(path)))

    cfg = load_config(config)
    sys.addaudithook(hook)
    for name in STAGES:
        current[:] = [name]
        pipeline.run(cfg, only=name)
    current.clear()
    with open(out, "w", encoding="utf-8") as f:
        json.dump({name: sorted(paths) for name, paths in opened.items()}, f, indent=1)


if __name__ == "__main__":
    _audited_first_run(sys.argv[1], sys.argv[2])
