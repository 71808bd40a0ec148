"""`doctune ingest` as a user runs it: a folder of good and bad files in, chunks.jsonl + ingest_report.json +
a manifest entry out; every good file chunked, every bad one reported with its reason; the same bytes twice;
nothing written into the data folder."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from doctune.config import build_config
from doctune.errors import InputError
from doctune.ingest.readers import PAGE_SEPARATOR, document_text
from doctune.ingest.stage import run
from doctune.runs import read_jsonl, sha256_file

from .pdfs import (
    CJK_LINE,
    NON_ASCII_LINE,
    paragraphs,
    wrap,
    write_drawing_only_pdf,
    write_encrypted_pdf,
    write_pdf,
    write_truncated_pdf,
)

FIELDS = ["chunk_id", "doc", "doc_sha256", "pages", "char_start", "char_end", "n_tokens", "text"]


def build_corpus(data: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Good files (path -> type) and bad files (path -> reason) under `data`."""
    pages = [wrap(p) for p in paragraphs(6, seed=3)]
    pages[0] = [NON_ASCII_LINE, *pages[0]]
    pages[1] = [CJK_LINE, *pages[1]]
    manual = write_pdf(data / "manuals" / "pump manual.pdf", pages)
    write_pdf(data / "manuals" / "short.PDF", [["A one-page PDF about valves."]])
    (data / "notes").mkdir()
    (data / "notes" / "latin1.txt").write_bytes(
        "Der Kühlschrank ist kaputt. Ça coûte cher.\n".encode("latin-1")
    )
    (data / "notes" / "utf16.txt").write_bytes("UTF-16 notes: naïve “quotes”.\n".encode("utf-16"))
    (data / "guide.md").write_text(
        "# Guide\n\n" + "\n\n".join(paragraphs(4, seed=4)) + "\n", encoding="utf-8"
    )
    (data / "readme.markdown").write_text("Short *markdown* file.\n", encoding="utf-8")
    good = {
        "guide.md": "markdown",
        "manuals/pump manual.pdf": "pdf",
        "manuals/short.PDF": "pdf",
        "notes/latin1.txt": "text",
        "notes/utf16.txt": "text",
        "readme.markdown": "markdown",
    }
    bad_dir = data / "rejects"
    bad_dir.mkdir()
    write_truncated_pdf(bad_dir / "truncated.pdf", manual)
    (bad_dir / "fake.pdf").write_text("this is a text file named .pdf\n")
    write_encrypted_pdf(bad_dir / "locked.pdf", manual)
    write_drawing_only_pdf(bad_dir / "scan.pdf")
    (bad_dir / "random.txt").write_bytes(random.Random(1).randbytes(4000))
    (bad_dir / "empty.md").write_bytes(b"")
    (bad_dir / "blank.txt").write_text("  \n\n \t\n")
    (bad_dir / "slides.pptx").write_bytes(b"PK\x03\x04")
    (bad_dir / "copy of guide.md").write_bytes((data / "guide.md").read_bytes())
    bad = {
        "rejects/blank.txt": "no text",
        "rejects/copy of guide.md": "duplicate",
        "rejects/empty.md": "empty file",
        "rejects/fake.pdf": "not a PDF",
        "rejects/locked.pdf": "encrypted PDF",
        "rejects/random.txt": "binary content",
        "rejects/scan.pdf": "no text layer",
        "rejects/slides.pptx": "unsupported type",
        "rejects/truncated.pdf": "corrupt PDF",
    }
    (data / ".hidden.txt").write_text("hidden files are not documents\n")
    (data / ".git").mkdir()
    (data / ".git" / "notes.txt").write_text("nor is what hidden folders hold\n")
    return good, bad


def make_cfg(tmp_path: Path, **data):
    return build_config({"run_dir": "run", "data": {"dir": "data", **data}}, tmp_path)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if not p.is_symlink()
    }


class RecordingProgress:
    def __init__(self):
        self.events = []

    def start(self, description, total):
        self.events.append(("start", description, total))

    def advance(self, n=1, **fields):
        self.events.append(("advance", n, fields))

    def finish(self):
        self.events.append(("finish",))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """The corpus ingested once with 200-token chunks (chars/4)."""
    tmp = tmp_path_factory.mktemp("ingest")
    good, bad = build_corpus(tmp / "data")
    before = snapshot(tmp / "data")
    progress = RecordingProgress()
    summary = run(make_cfg(tmp, chunk_tokens=200, chunk_overlap=20), progress=progress)
    return tmp, good, bad, before, summary, progress


def test_every_good_file_is_chunked_and_every_bad_one_reported(ingested):
    tmp, good, bad, _, _, _ = ingested
    report = json.loads((tmp / "run" / "ingest_report.json").read_text(encoding="utf-8"))
    status = {f["path"]: f for f in report["files"]}
    assert set(status) == set(good) | set(bad)  # hidden files and folders are not listed
    for path, kind in good.items():
        assert status[path]["status"] == "ok", status[path]
        assert status[path]["type"] == kind
        assert status[path]["chunks"] >= 1
    for path, reason in bad.items():
        assert status[path]["status"] == "skipped"
        assert status[path]["reason"] == reason
    assert status["notes/latin1.txt"]["encoding"] == "cp1252"
    assert status["notes/utf16.txt"]["encoding"] == "utf-16"
    assert status["manuals/pump manual.pdf"]["pages"] == 6
    assert status["rejects/copy of guide.md"]["detail"] == "same content as guide.md"
    chunks = read_jsonl(tmp / "run" / "chunks.jsonl")
    assert {c["doc"] for c in chunks} == set(good)
    assert report["totals"]["chunks"] == len(chunks)
    assert report["totals"]["skipped_by_reason"]["corrupt PDF"] == 1


def test_chunks_carry_the_documented_fields_and_index_the_document_text(ingested):
    tmp, *_ = ingested
    chunks = read_jsonl(tmp / "run" / "chunks.jsonl")
    texts = {}
    for chunk in chunks:
        assert list(chunk) == FIELDS
        doc = texts.setdefault(chunk["doc"], document_text(tmp / "data" / chunk["doc"]))
        assert doc[chunk["char_start"] : chunk["char_end"]] == chunk["text"]
        assert 1 <= chunk["n_tokens"] <= 200
        assert chunk["n_tokens"] == (len(chunk["text"]) + 3) // 4
    assert len({c["chunk_id"] for c in chunks}) == len(chunks)
    guide = [c for c in chunks if c["doc"] == "guide.md"]
    assert guide[0]["doc_sha256"] == sha256_file(tmp / "data" / "guide.md")
    assert [c["chunk_id"] for c in guide] == [
        f"{guide[0]['doc_sha256'][:16]}-{i:05d}" for i in range(len(guide))
    ]
    joined = "".join(c["text"] for c in chunks)
    for kept in (NON_ASCII_LINE, "日本語の文章", "Kühlschrank", "Ça coûte", "naïve “quotes”"):
        assert kept in joined


def test_pdf_chunks_name_the_pages_they_come_from(ingested):
    tmp, *_ = ingested
    path = tmp / "data" / "manuals" / "pump manual.pdf"
    manual = [c for c in read_jsonl(tmp / "run" / "chunks.jsonl") if c["doc"] == "manuals/pump manual.pdf"]
    assert len(manual) >= 3
    spans, offset = [], 0  # (page, start, end) of each page's text in the document text
    for i, page in enumerate(document_text(path).split(PAGE_SEPARATOR), 1):
        spans.append((i, offset, offset + len(page)))
        offset += len(page) + len(PAGE_SEPARATOR)
    for chunk in manual:
        touched = [n for n, s, e in spans if s < chunk["char_end"] and e > chunk["char_start"]]
        assert chunk["pages"] == [touched[0], touched[-1]]
    assert manual[0]["pages"][0] == 1 and manual[-1]["pages"][1] == 6
    assert any(c["pages"][0] < c["pages"][1] for c in manual)  # 200-token chunks of ~100-token pages
    text_chunks = [
        c for c in read_jsonl(tmp / "run" / "chunks.jsonl") if not c["doc"].lower().endswith(".pdf")
    ]
    assert all(c["pages"] is None for c in text_chunks)


def test_nothing_is_written_into_the_data_folder(ingested):
    tmp, _, _, before, _, _ = ingested
    assert snapshot(tmp / "data") == before


def test_manifest_summary_and_progress(ingested):
    tmp, good, bad, _, summary, progress = ingested
    entry = json.loads((tmp / "run" / "manifest.json").read_text())["stages"]["ingest"]
    assert entry["notes"]["counter"] == "chars/4"
    assert set(entry["inputs"]) == set(good)
    assert entry["counts"]["documents"] == len(good)
    assert entry["config"]["data"]["chunk_tokens"] == 200
    rows = dict(summary.rows)
    assert rows["documents read"] == len(good)
    assert rows["files skipped"] == len(bad)
    assert rows["token counter"] == "chars/4"
    assert rows["  skipped: encrypted PDF"] == 1
    assert any("rejects/locked.pdf" in w and "encrypted PDF" in w for w in summary.warnings)
    assert summary.outputs == [str(tmp / "run" / "chunks.jsonl"), str(tmp / "run" / "ingest_report.json")]
    assert progress.events[0] == ("start", "ingest", len(good) + len(bad))
    advances = [e for e in progress.events if e[0] == "advance"]
    assert len(advances) == len(good) + len(bad)
    assert advances[-1][2] == {"chunks": rows["chunks"], "skipped": len(bad)}
    assert progress.events[-1] == ("finish",)


def test_ingesting_twice_gives_identical_chunks(tmp_path):
    build_corpus(tmp_path / "data")
    run(make_cfg(tmp_path, chunk_tokens=64, chunk_overlap=8))
    first = (tmp_path / "run" / "chunks.jsonl").read_bytes()
    report = (tmp_path / "run" / "ingest_report.json").read_bytes()
    run(make_cfg(tmp_path, chunk_tokens=64, chunk_overlap=8))
    assert (tmp_path / "run" / "chunks.jsonl").read_bytes() == first
    assert (tmp_path / "run" / "ingest_report.json").read_bytes() == report


def test_chunk_ids_follow_the_content_not_the_file_name(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.md").write_text("\n\n".join(paragraphs(5, seed=9)))
    run(make_cfg(tmp_path, chunk_tokens=64, chunk_overlap=0))
    ids = [c["chunk_id"] for c in read_jsonl(tmp_path / "run" / "chunks.jsonl")]
    (data / "a.md").rename(data / "renamed.md")
    run(make_cfg(tmp_path, chunk_tokens=64, chunk_overlap=0))
    assert [c["chunk_id"] for c in read_jsonl(tmp_path / "run" / "chunks.jsonl")] == ids


def test_tokens_are_counted_with_the_configured_tokenizer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = tmp_path / "data"
    write_pdf(data / "doc.pdf", [wrap(p) for p in paragraphs(4, seed=5)])
    (data / "doc.txt").write_text("\n\n".join(paragraphs(6, seed=6)))
    run(make_cfg(tmp_path, chunk_tokens=48, chunk_overlap=8, tokenizer=str(tiny_model_dir)))
    chunks = read_jsonl(tmp_path / "run" / "chunks.jsonl")
    assert len(chunks) > 10
    for chunk in chunks:
        assert chunk["n_tokens"] == len(tokenizer(chunk["text"], add_special_tokens=False)["input_ids"]) <= 48
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["ingest"]["notes"]["counter"] == f"tokenizer:{tiny_model_dir}"


def test_a_run_dir_inside_the_data_folder_is_not_read(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "doc.md").write_text("The only document.\n")
    (data / "run" / "eval").mkdir(parents=True)
    (data / "run" / "eval" / "report.md").write_text("A report from an earlier stage.\n")
    cfg = build_config({"run_dir": "data/run", "data": {"dir": "data"}}, tmp_path)
    run(cfg)
    report = json.loads((data / "run" / "ingest_report.json").read_text())
    assert [f["path"] for f in report["files"]] == ["doc.md"]


def test_a_folder_with_nothing_readable_is_an_input_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "scan.pdf").write_bytes(b"%PDF-1.4 garbage")
    (data / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(InputError, match=r"data: no document could be read \(2 file\(s\) skipped: ") as info:
        run(make_cfg(tmp_path))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "chunks.jsonl").exists()
    report = json.loads((tmp_path / "run" / "ingest_report.json").read_text())
    assert {f["reason"] for f in report["files"]} == {"corrupt PDF", "unsupported type"}


def test_an_empty_or_missing_folder_is_an_input_error(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match=r"no \.pdf, \.md, \.markdown or \.txt files found"):
        run(make_cfg(tmp_path))
    with pytest.raises(InputError, match=r"data\.dir: .*missing is not a folder"):
        run(build_config({"data": {"dir": "missing"}}, tmp_path))


def test_the_cli_exits_0_with_documents_and_3_without(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "doc.txt").write_text("Some text for the command line.\n")
    (tmp_path / "doctune.yaml").write_text("run_dir: run\ndata: {dir: data}\n")
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "doctune", "ingest", "-c", str(tmp_path / "doctune.yaml")]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "documents read" in ok.stdout and "chunks.jsonl" in ok.stdout
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.bin").write_bytes(b"\x00")
    empty = subprocess.run(
        [*cmd, "--data-dir", str(tmp_path / "junk")], capture_output=True, text=True, env=env
    )
    assert empty.returncode == 3
    assert "no document could be read" in empty.stderr


def test_pdf_worker_processes_give_the_same_chunks(tmp_path):
    build_corpus(tmp_path / "data")
    for i in range(3):
        write_pdf(tmp_path / "data" / f"long-{i}.pdf", [wrap(p) for p in paragraphs(40, seed=20 + i)])
    outputs = {}
    for workers in (1, 2):
        cfg = build_config(
            {"run_dir": f"run-{workers}", "data": {"dir": "data", "chunk_tokens": 100}}, tmp_path
        )
        run(cfg, pdf_workers=workers)
        manifest = json.loads((tmp_path / f"run-{workers}" / "manifest.json").read_text())
        assert manifest["stages"]["ingest"]["notes"]["pdf_workers"] == workers
        outputs[workers] = [
            (tmp_path / f"run-{workers}" / name).read_bytes()
            for name in ("chunks.jsonl", "ingest_report.json")
        ]
    assert outputs[1] == outputs[2]
