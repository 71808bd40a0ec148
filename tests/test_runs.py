import json
import os

import pytest

from doctune.errors import DoctuneError, InputError
from doctune.runs import (
    OUTPUT_MARKER,
    RunDir,
    StageRecord,
    atomic_write_jsonl,
    atomic_write_text,
    check_output_dir,
    check_writable_dir,
    mark_output_dir,
    read_jsonl,
    sha256_file,
)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.jsonl"
    atomic_write_jsonl(target, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write_jsonl(target, rows())
    assert read_jsonl(target) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_jsonl_keeps_unicode_and_names_a_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    atomic_write_jsonl(path, [{"text": "café “quoted” 日本語"}])
    assert "日本語" in path.read_text(encoding="utf-8")
    assert read_jsonl(path)[0]["text"] == "café “quoted” 日本語"
    path.write_text('{"ok": 1}\n{broken\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"rows\.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_manifest_records_each_stage_without_losing_the_others(tmp_path):
    run = RunDir(tmp_path / "run")
    data = tmp_path / "doc.txt"
    atomic_write_text(data, "hello")
    rec = StageRecord("ingest", config={"chunk_tokens": 64}, counts={"chunks": 3})
    rec.add_input(data, "doc.txt")
    run.record(rec)
    run.record(StageRecord("generate", tokens={"prompt": 10}))
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert set(manifest["stages"]) == {"ingest", "generate"}
    entry = manifest["stages"]["ingest"]
    assert entry["inputs"] == {"doc.txt": sha256_file(data)}
    assert entry["counts"] == {"chunks": 3}
    assert "torch" in entry["versions"] and entry["wall_time_s"] >= 0


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_permissions_the_umask_allows(tmp_path, umask):
    import os
    import subprocess
    import sys

    target = tmp_path / "out.txt"
    code = (
        f"import os; os.umask({umask}); from doctune.runs import atomic_write_text; "
        f"atomic_write_text({str(target)!r}, 'x')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_an_output_folder_may_be_new_empty_or_doctunes_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_dir(tmp_path / "new", "--out") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "--out")
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "model.safetensors").write_text("w")
    mark_output_dir(ours, "merge")
    assert (ours / OUTPUT_MARKER).is_file()
    check_output_dir(ours, "--out")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "doctune_merge.json").write_text("{}")
    check_output_dir(legacy, "--out", ours=["doctune_merge.json"])


def test_an_output_folder_doctune_did_not_write_is_refused_in_one_line(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "notes.md").write_text("mine")
    (project / "runs" / "r").mkdir(parents=True)
    (project / "doctune.yaml").write_text("run_dir: runs/r\n")
    monkeypatch.chdir(project / "runs")
    refused = {
        project / "data": "the documents folder",
        project / "data" / "sub": "the documents folder",
        project / "doctune.yaml": "is a file",
        project / "runs": "current folder",
        project: "current folder",
        project / "runs" / "r": "would replace",
    }
    for path, says in refused.items():
        with pytest.raises(DoctuneError) as info:
            check_output_dir(path, "--out", keep=[project / "runs" / "r"], not_inside=[project / "data"])
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"--out {path}:") and says in message, message
    assert (project / "data" / "notes.md").read_text() == "mine"


def test_a_run_dir_where_a_file_is_in_the_way_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DoctuneError, match=r"run_dir .*afile: is a file"):
        check_writable_dir(tmp_path / "afile", "run_dir")
    with pytest.raises(DoctuneError, match=r"cannot be created: .*afile is a file"):
        check_writable_dir(tmp_path / "afile" / "run", "run_dir")
    with pytest.raises(DoctuneError, match="is a file"):
        RunDir(tmp_path / "afile" / "run").ensure()
    with pytest.raises(DoctuneError, match="is a folder"):
        atomic_write_text(tmp_path, "x")
    assert check_writable_dir(tmp_path / "a" / "b", "run_dir") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # checking creates nothing


def _killed_writes(*targets) -> None:
    """Write each target with atomic_open in a process that dies before the rename (as under SIGKILL)."""
    import subprocess
    import sys

    for target in targets:
        code = (
            "import os\nfrom doctune.runs import atomic_open\n"
            f"with atomic_open({str(target)!r}) as f:\n    f.write('new')\n    f.flush()\n    os._exit(0)\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)


def _remove_in_a_new_process(folder) -> tuple[list[str], str]:
    """(names removed, log) of remove_stray_temporaries run by a process started after the killed writes."""
    import subprocess
    import sys

    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
        "from doctune.runs import RunDir; "
        f"print(sorted(p.name for p in RunDir({str(folder)!r}).remove_stray_temporaries()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return eval(proc.stdout), proc.stderr  # a printed list of str


def test_a_stage_start_removes_the_temporaries_killed_writes_left_and_nothing_else(tmp_path):
    run = RunDir(tmp_path / "run")
    atomic_write_text(run.chunks, "old\n")
    atomic_write_text(run.eval_summary, "{}\n")
    _killed_writes(run.chunks, run.eval_summary)
    leftovers = sorted(p.name for p in run.path.rglob(".*.tmp"))
    assert len(leftovers) == 2 and all(n.startswith((".chunks.jsonl.", ".summary.json.")) for n in leftovers)
    mine = {  # names that only look like doctune's temporaries: never removed
        "notes.tmp": "a",
        ".notes.tmp": "b",
        "chunks.jsonl.tmp": "c",
        ".chunks.jsonl.ABCDEFGH.tmp": "d",  # mkstemp's names are lower case
        ".chunks.jsonl.abcdefghi.tmp": "e",  # and 8 characters long
        ".chunks.jsonl.abcdefgh.tmp.bak": "f",
    }
    for name, text in mine.items():
        (run.path / name).write_text(text)

    removed, log = _remove_in_a_new_process(run.path)

    assert removed == leftovers
    assert "removed 2 temporary file(s)" in log and log.count("\n") == 1
    assert run.chunks.read_text() == "old\n" and run.eval_summary.read_text() == "{}\n"
    assert {p.name: p.read_text() for p in run.path.glob("*tmp*")} == mine
    assert not list(run.eval_dir.glob("*.tmp"))
    assert _remove_in_a_new_process(run.path) == ([], "")  # nothing more to remove, nothing logged


def test_a_temporary_written_after_the_process_started_is_a_write_in_progress_and_kept(tmp_path):
    import tempfile

    run = RunDir(tmp_path / "run")
    run.ensure()
    fd, live = tempfile.mkstemp(prefix=f".{run.chunks.name}.", suffix=".tmp", dir=run.path)
    os.close(fd)
    assert run.remove_stray_temporaries() == []
    assert os.path.exists(live)


def test_doctests():
    import doctest

    import doctune.runs

    assert doctest.testmod(doctune.runs).failed == 0
