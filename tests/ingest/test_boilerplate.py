"""Clean text in: running headers and footers of PDF pages are dropped (and counted), body lines that repeat
are not, and chunks whose text repeats another chunk's are reported."""

from __future__ import annotations

import json
import re
from pathlib import Path

from doctune.config import build_config
from doctune.ingest.readers import document_text
from doctune.ingest.stage import run
from doctune.runs import read_jsonl

from .pdfs import paragraphs, wrap, write_pdf

REPORT = "ingest_report.json"
N_PAGES = 10
ASIDE = "See also the appendix about valves and gauges."  # at the top of 2 of the 10 pages


def header(page: int) -> str:  # a browser's print header: date and time, then the page title
    return f"11/8/23, 2:{page:02d} PM Getting started with the Pump - ACME Docs"


def footer(page: int) -> str:
    return f"https://docs.acme.example/pump/get-started/ {page}/{N_PAGES}"


def printed_pages() -> list[list[str]]:
    bodies = [wrap(p) for p in paragraphs(N_PAGES, seed=7, sentences=6)]
    pages = []
    for n, body in enumerate(bodies, 1):
        top = [ASIDE] if n in (2, 7) else []
        pages.append([header(n), *top, *body, footer(n)])
    return pages


def make_cfg(tmp_path: Path, **data):
    return build_config({"run_dir": "run", "data": {"dir": "data", **data}}, tmp_path)


def _words(text: str) -> str:
    return " ".join(text.split())


def test_running_headers_and_footers_are_dropped_and_counted(tmp_path):
    pages = printed_pages()
    path = write_pdf(tmp_path / "data" / "guide.pdf", pages)
    summary = run(make_cfg(tmp_path, chunk_tokens=120, chunk_overlap=10))

    chunks = read_jsonl(tmp_path / "run" / "chunks.jsonl")
    joined = "\n".join(c["text"] for c in chunks)
    assert "PM Getting started" not in joined and "docs.acme.example" not in joined
    assert not re.search(r"\b\d+/10\b", joined)
    # every body line is still there, in order, and the aside on 2 of 10 pages is kept (both times)
    body = _words(" ".join(line for page in pages for line in page[1:-1]))
    assert _words(document_text(path)) == body
    assert joined.count(ASIDE) >= 2
    # offsets index the cleaned document text; pages stay in the provenance
    text = document_text(path)
    assert all(text[c["char_start"] : c["char_end"]] == c["text"] for c in chunks)
    assert chunks[0]["pages"][0] == 1 and chunks[-1]["pages"][1] == N_PAGES

    report = json.loads((tmp_path / "run" / REPORT).read_text())
    (row,) = report["files"]
    assert row["running_lines_dropped"] == 2 * N_PAGES
    assert row["running_lines"] == [header(1), footer(1)]
    assert report["totals"]["running_lines_dropped"] == 2 * N_PAGES
    assert dict(summary.rows)["running header/footer lines dropped"] == 2 * N_PAGES


def test_lines_that_repeat_in_the_body_are_kept(tmp_path):
    row = "| valve | 0 | 0 | open |"
    note = "Note: wear gloves when you open the pump housing."
    pages = []
    for n, par in enumerate(paragraphs(6, seed=11), 1):
        lines = wrap(par)
        middle = len(lines) // 2
        table = [row] * 5 if n == 3 else []  # one page with a table whose rows repeat
        pages.append([f"Section {n}: {lines[0]}", *lines[1:middle], note, *table, *lines[middle:], "End."])
    path = write_pdf(tmp_path / "data" / "manual.pdf", pages)
    run(make_cfg(tmp_path, chunk_tokens=150, chunk_overlap=0))

    text = document_text(path)
    assert text.count(row) == 5 and text.count(note) == len(pages)
    report = json.loads((tmp_path / "run" / REPORT).read_text())
    # "End." closes every page: a running footer; the note and the table rows in the body are not
    assert report["files"][0]["running_lines_dropped"] == len(pages)
    assert report["files"][0]["running_lines"] == ["End."]
    assert _words(text) == _words(" ".join(line for page in pages for line in page[:-1]))


def test_a_short_document_keeps_its_lines(tmp_path):
    pages = printed_pages()[:2]  # two pages: too few to tell a running line from a coincidence
    path = write_pdf(tmp_path / "data" / "short.pdf", pages)
    run(make_cfg(tmp_path))
    assert header(1) in document_text(path)
    report = json.loads((tmp_path / "run" / REPORT).read_text())
    assert report["files"][0]["running_lines_dropped"] == 0


CODE = "```\nlumen-relay --data /var/lib/lumen --port 7300 --public-url https://notes.example.org\n```"


def test_chunks_with_identical_text_are_reported_with_their_documents(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, intro in [("a.md", 1), ("b.md", 2), ("c.md", 3)]:
        (data / name).write_text(f"{paragraphs(1, seed=intro)[0]}\n\n{CODE}\n", encoding="utf-8")
    (data / "d.md").write_text(paragraphs(1, seed=9)[0] + "\n", encoding="utf-8")
    summary = run(make_cfg(tmp_path, chunk_tokens=40, chunk_overlap=0))

    chunks = read_jsonl(tmp_path / "run" / "chunks.jsonl")
    same = [c for c in chunks if c["text"] == CODE]
    assert len(same) == 3
    report = json.loads((tmp_path / "run" / REPORT).read_text())
    assert report["totals"]["identical_chunks"] == 2
    assert report["identical_chunks"] == [
        {"count": 3, "chunk_ids": [c["chunk_id"] for c in same], "docs": ["a.md", "b.md", "c.md"]}
    ]
    assert dict(summary.rows)["chunks identical to another"] == 2
    (warning,) = [w for w in summary.warnings if "identical_chunks" in w]
    assert "2 chunk(s)" in warning and "a.md, b.md, c.md" in warning
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["ingest"]
    assert entry["counts"]["identical_chunks"] == 2


def test_docstring_examples():
    import doctest

    from doctune.ingest import boilerplate

    result = doctest.testmod(boilerplate)
    assert result.attempted >= 4 and result.failed == 0
