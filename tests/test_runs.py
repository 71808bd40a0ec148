import json

import pytest

from doctune.errors import InputError
from doctune.runs import (
    RunDir,
    StageRecord,
    atomic_write_jsonl,
    atomic_write_text,
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
