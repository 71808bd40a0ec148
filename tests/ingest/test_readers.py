"""Readers: what text comes out of real PDFs and text files in various encodings, and why bad files are refused."""

from __future__ import annotations

import codecs
import os
import random

import pytest

from doctune.ingest import readers
from doctune.ingest.readers import (
    PAGE_SEPARATOR,
    PdfPagePool,
    Unreadable,
    document_text,
    read_pdf,
    read_text,
    reader_for,
)

from .pdfs import (
    CJK_LINE,
    NON_ASCII_LINE,
    write_drawing_only_pdf,
    write_encrypted_pdf,
    write_pdf,
    write_truncated_pdf,
)


def _read(path):
    with reader_for(path)(path) as doc:
        return doc, list(doc.blocks())


def test_pdf_pages_keep_their_numbers_and_unicode(tmp_path):
    path = write_pdf(
        tmp_path / "manual.pdf",
        [["Page one, first line.", NON_ASCII_LINE], [CJK_LINE], [], ["Last page."]],
    )
    doc, blocks = _read(path)
    assert doc.kind == "pdf" and doc.pages == 4
    pages = [b for b in blocks if b.page is not None]
    assert [b.page for b in pages] == [1, 2, 3, 4]
    assert pages[0].text == f"Page one, first line.\n{NON_ASCII_LINE}"
    assert pages[1].text == CJK_LINE
    assert pages[2].text == ""
    assert document_text(path) == PAGE_SEPARATOR.join(b.text for b in pages)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p, good: write_truncated_pdf(p, good), "corrupt PDF"),
        (lambda p, good: p.write_text("Just some notes, saved with the wrong name.\n"), "not a PDF"),
        (lambda p, good: write_encrypted_pdf(p, good), "encrypted PDF"),
        (lambda p, good: p.write_bytes(b""), "empty file"),
    ],
    ids=["truncated", "fake", "encrypted", "empty"],
)
def test_unusable_pdfs_are_refused_with_their_reason(tmp_path, make, reason):
    good = write_pdf(tmp_path / "good.pdf", [["Some text."]] * 3)
    bad = tmp_path / "bad.pdf"
    make(bad, good)
    with pytest.raises(Unreadable) as info:
        read_pdf(bad)
    assert info.value.reason == reason


def test_pdf_without_a_text_layer_gives_no_text(tmp_path):
    doc, blocks = _read(write_drawing_only_pdf(tmp_path / "scan.pdf", pages=2))
    assert doc.pages == 2
    assert "".join(b.text for b in blocks).strip() == ""


@pytest.mark.parametrize(
    ("data", "encoding", "text"),
    [
        (b"plain ASCII\n", "utf-8", "plain ASCII\n"),
        ("naïve café 日本語\n".encode(), "utf-8", "naïve café 日本語\n"),
        (codecs.BOM_UTF8 + "with BOM é\n".encode(), "utf-8-sig", "with BOM é\n"),
        ("UTF-16 ©é 日本\n".encode("utf-16"), "utf-16", "UTF-16 ©é 日本\n"),
        (codecs.BOM_UTF16_BE + "big endian é\n".encode("utf-16-be"), "utf-16", "big endian é\n"),
        ("no BOM, utf-16 é\n".encode("utf-16-le"), "utf-16-le", "no BOM, utf-16 é\n"),
        ("Latin-1 café, Ærø\n".encode("latin-1"), "cp1252", "Latin-1 café, Ærø\n"),
        ("cp1252 “curly” – dash\n".encode("cp1252"), "cp1252", "cp1252 “curly” – dash\n"),
        (b"undefined in cp1252: \x81 caf\xe9\n", "latin-1", "undefined in cp1252: \x81 café\n"),
        (b"windows\r\nline ends\r\n", "utf-8", "windows\nline ends\n"),
    ],
    ids=["ascii", "utf8", "utf8-bom", "utf16-le-bom", "utf16-be-bom", "utf16-no-bom", "latin1", "cp1252",
         "latin1-not-cp1252", "crlf"],
)  # fmt: skip
def test_text_encodings_are_detected_and_reported(tmp_path, data, encoding, text):
    path = tmp_path / "doc.txt"
    path.write_bytes(data)
    doc, blocks = _read(path)
    assert doc.encoding == encoding
    assert "".join(b.text for b in blocks) == text


def test_a_few_bad_bytes_in_utf8_do_not_turn_the_file_into_latin1(tmp_path):
    path = tmp_path / "mostly.md"
    path.write_bytes(("Größe und Übermaß. " * 50).encode() + b"\xff\xfe broken \xc3 here\n")
    doc, blocks = _read(path)
    assert doc.encoding == "utf-8"
    assert doc.notes["invalid_bytes_replaced"] == 3
    assert "".join(b.text for b in blocks).startswith("Größe und Übermaß. ")


@pytest.mark.parametrize(
    "data",
    [random.Random(0).randbytes(5000), b"text\x00with\x00nuls\x00" * 20,
     bytes(range(1, 9)) * 100 + b"few letters"],
    ids=["random", "nul", "controls"],
)  # fmt: skip
def test_binary_content_named_txt_is_refused(tmp_path, data):
    path = tmp_path / "notes.txt"
    path.write_bytes(data)
    with pytest.raises(Unreadable) as info:
        read_text(path)
    assert info.value.reason == "binary content"


def test_text_is_streamed_in_blocks_without_splitting_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "TEXT_BLOCK_CHARS", 7)
    text = "日本語と “quotes”\r\nand CRLF\r\n" * 20
    path = tmp_path / "stream.txt"
    path.write_bytes(text.encode("utf-8"))
    _, blocks = _read(path)
    assert len(blocks) > 20
    assert all(len(b.text) <= 7 for b in blocks)
    assert "".join(b.text for b in blocks) == text.replace("\r\n", "\n")


def test_unsupported_suffixes_have_no_reader(tmp_path):
    assert reader_for(tmp_path / "a.docx") is None
    assert reader_for(tmp_path / "A.PDF") is read_pdf
    assert reader_for(tmp_path / "notes.markdown") is readers.read_markdown


class CrashingPool(PdfPagePool):
    """A pool whose worker dies (like pdfium on a PDF that crashes it) on the range starting at `crash_at`."""

    crash_at = 16

    def _task(self, path, first):
        return (os._exit, (1,)) if first == self.crash_at else super()._task(path, first)


def test_worker_pool_pages_equal_in_process_pages_and_survive_a_crash(tmp_path, caplog):
    path = write_pdf(tmp_path / "long.pdf", [[f"Page {i} text."] for i in range(1, 41)])
    with read_pdf(path) as doc:
        expected = [b.text for b in doc.blocks() if b.page is not None]
    with PdfPagePool(2, pages_per_task=8) as pool:
        assert list(pool.pages(path, 40)) == expected
    with CrashingPool(2, pages_per_task=8) as pool, read_pdf(path, pool=pool) as doc:
        got = [b.text for b in doc.blocks() if b.page is not None]
    assert got[16:24] == [""] * 8  # the pages the dying worker was on are left out...
    assert got[:16] == expected[:16] and got[24:] == expected[24:]  # ... the others come through
    assert doc.notes["pages_failed"] == list(range(17, 25))
    assert "long.pdf: pages 17-24 crash the PDF worker on their own; their text is left out" in caplog.text
