"""A new user's mistakes on the command line: a usage line and one error line, the right exit code, never a
Python traceback. The commands are read from the Typer app itself, so a new command is covered too."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import typer.main
from tests.support.serve_process import start_serve, wait_for_url

from doctune.cli import app

DOCTUNE = str(Path(sys.executable).with_name("doctune"))
COMMANDS = typer.main.get_command(app).commands  # name -> click command, as the CLI builds them
NUMBERS = (int, float)
NO_INPUT_PATH = {"init"}  # commands that read no file a user names (init writes one)


def doctune(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    return subprocess.run(
        [DOCTUNE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def _annotation(param) -> type:
    return param.type_descriptor.annotation


def _required(command) -> list[str]:
    """Values that satisfy the command's required parameters (so that another mistake can be tried alone)."""
    args: list[str] = []
    for param in command.params:
        if param.required and param.param_type_name == "argument":
            args.append("out-folder")
        elif param.required:
            args += [param.opts[0], "some-model"]
    return args


def _valued_options(command) -> list:
    return [p for p in command.params if p.param_type_name == "option" and not p.is_flag and p.name != "help"]


def _mistakes(name: str, command) -> list[tuple[str, list[str], str]]:
    """(what, argv, text the error must contain) for each kind of mistake this command can be given."""
    required = _required(command)
    cases = [("unknown option", [name, *required, "--no-such-option"], "No such option: --no-such-option")]
    if required:
        cases.append(("missing required", [name], "Missing"))
    elif options := _valued_options(command):
        cases.append(("option without its value", [name, options[-1].opts[0]], "requires an argument"))
    for param in _valued_options(command):
        if _annotation(param) in NUMBERS:
            opt = param.opts[0]
            cases.append((f"{opt} not a number", [name, *required, opt, "abc"], f"Invalid value for '{opt}'"))
            if param.min is not None:
                low = str(param.min - 1)
                cases.append((f"{opt} below its minimum", [name, *required, opt, low], "Invalid value"))
    path = _input_path_option(command)
    if path is not None:
        argv = [name, *required, path.opts[0], "/no/such/place/doctune.yaml"]
        cases.append((f"{path.opts[0]} does not exist", argv, "/no/such/place/doctune.yaml"))
    return cases


def _input_path_option(command):
    """The option naming a file the command reads: -c/--config (its own one-line error) or a Path that must
    exist."""
    for param in command.params:
        if "--config" in getattr(param, "opts", []):
            return param
    for param in command.params:
        if param.param_type_name == "option" and getattr(
            param.type_descriptor.parameter_info, "exists", False
        ):
            return param
    return None


CASES = [(name, *case) for name, command in sorted(COMMANDS.items()) for case in _mistakes(name, command)]


def test_every_command_has_been_given_each_kind_of_mistake():
    assert {"init", "tiny-model", "ingest", "generate", "curate", "finetune", "eval", "serve", "chat"} <= set(
        COMMANDS
    )
    with_path = {name for name, what, *_ in CASES if what.endswith("does not exist")}
    assert set(COMMANDS) - with_path == NO_INPUT_PATH
    with_numbers = {name for name, what, *_ in CASES if "not a number" in what}
    assert {"generate", "finetune", "chat", "serve", "curate", "tiny-model"} <= with_numbers


def test_every_mistake_is_a_usage_error_without_a_traceback(tmp_path):
    def one(case):
        started = time.monotonic()
        proc = doctune(*case[2], cwd=tmp_path)
        return case, proc, time.monotonic() - started

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(one, CASES))
    failures = []
    for (_, what, argv, expected), proc, _seconds in results:
        output = proc.stdout + proc.stderr
        problems = []
        if proc.returncode != 2:
            problems.append(f"exit {proc.returncode}")
        if "Traceback" in output:
            problems.append("a traceback")
        if expected not in output:
            problems.append(f"no {expected!r}")
        if problems:
            failures.append(f"doctune {' '.join(argv)} ({what}): {', '.join(problems)}: {output[-600:]}")
    assert not failures, "\n".join(failures)
    slowest = max(seconds for *_, seconds in results)
    print(f"{len(results)} mistakes, slowest {slowest:.2f} s")


def test_a_usage_error_shows_the_usage_line_and_one_error_line(tmp_path):
    proc = doctune("finetune", "--nproc", "0", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[0] == "Usage: doctune finetune [OPTIONS]"
    assert lines[-1] == "Error: Invalid value for '--nproc': Input should be greater than or equal to 1"


def test_cli_doctests():
    import doctest

    import doctune.cli

    assert doctest.testmod(doctune.cli).failed == 0


def test_interrupted_hint_tells_finetune_to_resume():
    from doctune.cli import interrupted_hint

    assert interrupted_hint(["generate"]) == "interrupted: run the same command again to resume"
    assert "--resume" in interrupted_hint(["finetune", "-c", "x.yaml"])
    assert interrupted_hint(["finetune", "--resume"]) == "interrupted: run the same command again to resume"


# ---------------------------------------------------------------- output paths: one line each


def _one_line_error(proc: subprocess.CompletedProcess, *parts: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for part in parts:
        assert part in errors[0], proc.stderr


def test_init_into_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("mine\n")
    _one_line_error(doctune("init", "afile", cwd=tmp_path), "afile", "is a file")
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_a_run_dir_that_is_a_file_or_below_one_is_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.md").write_text("# A\n\nSome text about things.\n")
    (tmp_path / "afile").write_text("mine\n")
    assert doctune("init", cwd=tmp_path).returncode == 0
    _one_line_error(doctune("ingest", "--run-dir", "afile", cwd=tmp_path), "afile", "is a file")
    _one_line_error(doctune("ingest", "--run-dir", "afile/run", cwd=tmp_path), "afile", "is a file")
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_finetune_output_dir_that_is_the_config_or_inside_the_documents_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    assert doctune("init", cwd=tmp_path).returncode == 0
    config = (tmp_path / "doctune.yaml").read_text()
    _one_line_error(doctune("finetune", "--output-dir", "doctune.yaml", cwd=tmp_path), "doctune.yaml", "file")
    _one_line_error(doctune("finetune", "--output-dir", "data", cwd=tmp_path), "documents folder")
    _one_line_error(doctune("finetune", "--output-dir", "data/adapter", cwd=tmp_path), "documents folder")
    assert (tmp_path / "doctune.yaml").read_text() == config and not any((tmp_path / "data").iterdir())
    # documents in the project folder itself, the run dir inside it (ingest skips it): the adapter may go there
    inside = doctune("finetune", "--set", "data.dir=.", cwd=tmp_path)
    assert "documents folder" not in inside.stderr and inside.returncode == 3, inside.stderr  # then: no model


@pytest.mark.slow
def test_report_to_an_unknown_logger_names_the_allowed_ones(tmp_path):
    assert doctune("init", cwd=tmp_path).returncode == 0
    proc = doctune("finetune", "--set", "finetune.report_to=[foo]", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'foo' is not a logger doctune knows (allowed: none, tensorboard, wandb" in proc.stderr
    assert "pip install foo" not in proc.stderr


# ---------------------------------------------------------------- files doctune did not write are kept


def _fake_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x"}))
    (folder / "adapter_model.safetensors").write_bytes(b"")  # never read: --out is refused first
    return folder


@pytest.mark.parametrize(
    ("out", "says"),
    [
        (".", "current folder"),
        ("runs/r", "would replace runs/r/adapter"),
        ("data", "did not write"),
        ("doctune.yaml", "is a file"),
    ],
)
def test_merge_never_replaces_what_it_did_not_write(tmp_path, out, says):
    adapter = _fake_adapter(tmp_path / "runs" / "r" / "adapter")
    (tmp_path / "runs" / "r" / "cache.sqlite").write_text("answers")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "important.md").write_text("# mine\n")
    (tmp_path / "doctune.yaml").write_text("run_dir: runs/r\n")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    proc = doctune("merge", "--adapter", str(adapter.relative_to(tmp_path)), "--out", out, cwd=tmp_path)
    _one_line_error(proc, f"--out {out}", says)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "data" / "important.md").read_text() == "# mine\n"


@pytest.mark.slow
def test_tiny_model_keeps_a_folder_it_did_not_write_and_replaces_its_own(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "important.md").write_text("# mine\n")
    _one_line_error(doctune("tiny-model", "docs", cwd=tmp_path), "tiny-model docs", "did not write")
    assert (tmp_path / "docs" / "important.md").read_text() == "# mine\n"
    assert doctune("tiny-model", "m", cwd=tmp_path).returncode == 0
    assert (tmp_path / "m" / ".doctune-output").is_file()
    again = doctune("tiny-model", "m", "--seed", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "seed 1" in (tmp_path / "m" / "README.md").read_text()
    (tmp_path / "m" / ".doctune-output").unlink()  # as a doctune before the marker wrote it
    assert doctune("tiny-model", "m", cwd=tmp_path).returncode == 0
    assert "seed 0" in (tmp_path / "m" / "README.md").read_text()


# ---------------------------------------------------------------- serve: the port


def test_serve_on_a_port_in_use_is_one_line_before_the_model_loads(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = doctune("serve", "--model", "no/such-model", "--port", str(port), cwd=tmp_path)
    _one_line_error(proc, f"--port {port}: already in use", "--port 0")
    assert "http://" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_serve_on_port_0_prints_the_port_it_really_listens_on(tiny_model_dir, tmp_path):
    proc = start_serve("--model", str(tiny_model_dir), "--port", "0", cwd=tmp_path)
    try:
        url = wait_for_url(proc, timeout=100)  # answers /health there
        assert not url.endswith(":0") and not url.endswith(":8000")
    finally:
        proc.terminate()
        proc.wait(30)
