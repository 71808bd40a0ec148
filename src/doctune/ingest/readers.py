"""Readers: one function per format, chosen by suffix (`READERS`). Each opens a file and returns a `Document`
whose `blocks()` stream the document's text; a file that cannot be used raises `Unreadable` with a short reason.

The *document text* that chunk offsets (`char_start`, `char_end`) index into is `"".join(b.text for b in
doc.blocks())`, which `document_text(path)` returns:

- .txt / .md / .markdown: the file decoded with the detected encoding (UTF-8, UTF-16/32 with a BOM, else
  cp1252, else Latin-1), the BOM dropped, line ends as "\\n" (as Python's text mode reads it). Unicode is kept
  as it is (no normalisation).
- .pdf: each page's text as pdfium extracts it (line ends as "\\n"), less its running header and footer
  lines (boilerplate.py), pages joined by `PAGE_SEPARATOR` (a blank line). Pages are numbered from 1. Finding
  running lines needs every page, so a PDF's text is held whole while it is read (a 1,000-page manual is a
  few MB of text).

Text files are read in blocks of `TEXT_BLOCK_CHARS` characters, so a 100 MB file never sits in memory whole.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doctune.ingest.boilerplate import line_key, running_keys, strip_page

log = logging.getLogger(__name__)

PAGE_SEPARATOR = "\n\n"
TEXT_BLOCK_CHARS = 1 << 20
SNIFF_BYTES = 64 * 1024
_READ_BYTES = 1 << 20
MAX_RUNNING_EXAMPLES = 5  # running lines named in the report, per document

# Bytes that do not occur in text: C0 controls except \t \n \f \r (and \b, seen in old man pages), plus DEL.
_CONTROL_BYTES = bytes([*range(0, 8), 11, *range(14, 32), 127])
_TEXT_BYTES = bytes(b for b in range(256) if b not in _CONTROL_BYTES)
# Bytes that cp1252 leaves undefined: a file with them is decoded as Latin-1 instead.
_CP1252_UNDEFINED = b"\x81\x8d\x8f\x90\x9d"
# pdfium marks a hyphen at a line break with U+0002; NUL and non-characters never belong in the text.
_PDF_TEXT_FIXES = str.maketrans({"\x02": "-", "\x00": None, "\ufffe": None, "\uffff": None})


class Unreadable(Exception):
    """A file that cannot be used. `reason` is a short stable category (the report groups by it); `detail`
    says what exactly, for the person who will fix the file."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason} ({detail})" if detail else reason)


@dataclass(frozen=True, slots=True)
class Block:
    """A piece of document text, in order. `page` is set on the block that holds a PDF page's text."""

    text: str
    page: int | None = None


@dataclass
class Document:
    """An opened input file: what is known up front, and its text as a stream of blocks. Close it (or use it
    in a `with`) to release the file."""

    kind: str  # "pdf", "markdown" or "text"
    sha256: str
    size: int
    blocks: Callable[[], Iterator[Block]]
    encoding: str | None = None
    pages: int | None = None
    notes: dict[str, object] = field(default_factory=dict)
    _close: Callable[[], None] = lambda: None
    # the share of the file read so far, 0 to 1 (progress within a large document)
    fraction_read: Callable[[], float] = lambda: 0.0

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Document:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ helpers


def _os_reason(exc: OSError) -> Unreadable:
    return Unreadable("unreadable", exc.strerror or type(exc).__name__)


def _sha256_and_head(path: Path) -> tuple[str, int, bytes]:
    """One pass over the file: its sha256, its size and its first SNIFF_BYTES."""
    h = hashlib.sha256()
    size = 0
    head = b""
    try:
        with open(path, "rb") as f:
            while block := f.read(_READ_BYTES):
                if not head:
                    head = block[:SNIFF_BYTES]
                h.update(block)
                size += len(block)
    except OSError as exc:
        raise _os_reason(exc) from None
    if size == 0:
        raise Unreadable("empty file")
    return h.hexdigest(), size, head


# ------------------------------------------------------------------------------------------------ PDF


def read_pdf(path: Path, pool: PdfPagePool | None = None) -> Document:
    """A PDF through pdfium: one block per page (text layer only; scanned pages give no text). With a `pool`,
    page text comes from its worker processes; the file is still opened here, to check it and count pages."""
    import pypdfium2 as pdfium

    sha, size, head = _sha256_and_head(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - owned by the Document, closed by its close()
    except OSError as exc:
        raise _os_reason(exc) from None
    try:
        pdf = pdfium.PdfDocument(handle)
    except pdfium.PdfiumError as exc:
        handle.close()
        raise _pdf_load_error(exc, head, path) from None

    def close() -> None:
        pdf.close()
        handle.close()

    n_pages = len(pdf)
    failed: list[int] = []
    pages: list[str] = []
    notes: dict[str, object] = {"pages_failed": failed}

    def blocks() -> Iterator[Block]:
        texts = pool.pages(path, n_pages) if pool else (_page_text(pdf, i) for i in range(n_pages))
        pages.clear()
        for index, text in enumerate(texts):
            if text is None:
                log.warning("%s: page %d cannot be read; its text is left out", path, index + 1)
                failed.append(index + 1)
            pages.append(text or "")
        keys = running_keys(pages)
        dropped: dict[str, str] = {}  # key -> the first line dropped with it
        n_dropped = 0
        for index, text in enumerate(pages):
            clean, lines = strip_page(text, keys)
            n_dropped += len(lines)
            for line in lines:
                dropped.setdefault(line_key(line), line.strip())
            if index:
                yield Block(PAGE_SEPARATOR)
            yield Block(clean, page=index + 1)
        notes["running_lines_dropped"] = n_dropped
        notes["running_lines"] = list(dropped.values())[:MAX_RUNNING_EXAMPLES]
        if n_dropped:
            log.info("%s: %d running header/footer line(s) dropped", path, n_dropped)

    return Document(
        "pdf",
        sha,
        size,
        blocks,
        pages=n_pages,
        notes=notes,
        _close=close,
        fraction_read=lambda: len(pages) / n_pages if n_pages else 1.0,
    )


def _page_text(pdf: Any, index: int) -> str | None:
    """Text of one page (line ends as \\n), or None when pdfium cannot read the page."""
    import pypdfium2 as pdfium

    try:
        page = pdf[index]
    except pdfium.PdfiumError:
        return None
    try:
        textpage = page.get_textpage()
        try:
            text = textpage.get_text_range()
        finally:
            textpage.close()
    except pdfium.PdfiumError:
        return None
    finally:
        page.close()
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_PDF_TEXT_FIXES)


def extract_page_range(path: str, first: int, stop: int) -> list[str | None]:
    """Texts of pages [first, stop) of a PDF (fewer if it has fewer pages). What a PdfPagePool worker runs."""
    import pypdfium2 as pdfium

    with open(path, "rb") as f:
        pdf = pdfium.PdfDocument(f)
        try:
            return [_page_text(pdf, i) for i in range(first, min(stop, len(pdf)))]
        finally:
            pdf.close()


class PdfPagePool:
    """PDF text extraction in worker processes: pdfium's layout analysis is most of ingest's time, and pdfium
    is not thread-safe. Pages are extracted in ranges, ahead of the reader: `prefetch(path)` starts on a file
    that will soon be read, `pages(path, n)` yields its page texts in order.

    A worker that dies (a PDF that crashes pdfium) does not end the run: the pool restarts, and the ranges
    that were in flight are run again one at a time; a range that crashes a worker on its own is left out
    (its pages come back as None)."""

    def __init__(self, workers: int, pages_per_task: int = 16) -> None:
        self.workers = workers
        self.pages_per_task = pages_per_task
        self._executor = self._start()
        self._futures: dict[str, dict[int, Future[list[str | None]]]] = {}
        self._crashes: Counter[tuple[str, int]] = Counter()  # ranges in flight when a worker died

    def _start(self) -> ProcessPoolExecutor:
        # spawn, not fork: forking a process that holds a tokenizer's threads can deadlock
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def _task(self, path: str, first: int) -> tuple[Callable[..., list[str | None]], tuple[Any, ...]]:
        return extract_page_range, (path, first, first + self.pages_per_task)

    def _submit(self, path: str, first: int, alone: bool = False) -> None:
        """Start a range unless it is running or done. A range suspected of a crash starts only `alone`."""
        ranges = self._futures.setdefault(path, {})
        if first in ranges or (self._crashes[path, first] and not alone):
            return
        fn, args = self._task(path, first)
        try:
            ranges[first] = self._executor.submit(fn, *args)
        except BrokenProcessPool:
            self._restart()
            self._submit(path, first, alone)

    def _restart(self) -> None:
        """After a worker died: a new pool; every range that was in flight becomes a suspect."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        for path, ranges in self._futures.items():
            for first, future in list(ranges.items()):
                if future.cancelled() or isinstance(future.exception(), BrokenProcessPool):
                    del ranges[first]
                    self._crashes[path, first] += not future.cancelled()
        self._executor = self._start()

    def prefetch(self, path: Path) -> None:
        self._submit(str(path), 0)

    def pages(self, path: Path, n_pages: int) -> Iterator[str | None]:
        key = str(path)
        firsts = range(0, n_pages, self.pages_per_task)
        for k, first in enumerate(firsts):
            for ahead in firsts[k : k + 2 * self.workers]:
                self._submit(key, ahead)
            size = min(self.pages_per_task, n_pages - first)
            texts = self._result(key, first, size)
            yield from texts[:size]
            yield from [None] * (size - len(texts))  # the file changed under us: fewer pages now
        self.discard(path)

    def _result(self, key: str, first: int, size: int) -> list[str | None]:
        import pypdfium2 as pdfium

        pages = f"{key}: pages {first + 1}-{first + size}"
        while self._crashes[key, first] < 2:
            if self._crashes[key, first]:  # a suspect runs alone, so a crash now is its own
                in_flight = [f for ranges in self._futures.values() for f in ranges.values()]
                wait(in_flight)
                if any(not f.cancelled() and isinstance(f.exception(), BrokenProcessPool) for f in in_flight):
                    self._restart()
                    continue
            self._submit(key, first, alone=True)
            try:
                texts = self._futures[key][first].result()
            except BrokenProcessPool:
                log.warning("%s: a PDF worker crashed; restarting the pool", pages)
                self._restart()
                continue
            except (pdfium.PdfiumError, OSError) as exc:
                log.warning("%s: cannot be read (%s)", pages, exc)
                texts = [None] * size
            del self._futures[key][first]
            return texts
        log.warning("%s crash the PDF worker on their own; their text is left out", pages)
        return [None] * size

    def discard(self, path: Path) -> None:
        """Drop what was extracted ahead for a file that will not be read (skipped, duplicate)."""
        for future in self._futures.pop(str(path), {}).values():
            future.cancel()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()

    def __enter__(self) -> PdfPagePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pdf_load_error(exc: Exception, head: bytes, path: Path) -> Unreadable:
    import pypdfium2.raw as pdfium_c

    code = getattr(exc, "err_code", None)
    if code == pdfium_c.FPDF_ERR_PASSWORD:
        return Unreadable("encrypted PDF", "needs a password; save an unprotected copy")
    if code == pdfium_c.FPDF_ERR_SECURITY:
        return Unreadable("encrypted PDF", "unsupported security handler")
    if b"%PDF-" not in head[:1024]:
        return Unreadable("not a PDF", "no %PDF- header; the file is something else named .pdf")
    if code == pdfium_c.FPDF_ERR_SUCCESS:
        return Unreadable("corrupt PDF", "it has no pages")
    if not _has_eof_marker(path):
        return Unreadable("corrupt PDF", "truncated: no %EOF at the end; the download or copy was cut short")
    return Unreadable("corrupt PDF", str(exc))


def _has_eof_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, io.SEEK_END)
            f.seek(max(0, f.tell() - 2048))
            return b"%%EOF" in f.read()
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ text


def read_text(path: Path) -> Document:
    """Plain text, streamed in blocks. The encoding is detected in a first pass (see `detect_encoding`)."""
    return _read_text_file(path, "text")


def read_markdown(path: Path) -> Document:
    """Markdown, kept as its source (headings, lists and code help the teacher); streamed like text."""
    return _read_text_file(path, "markdown")


def _read_text_file(path: Path, kind: str) -> Document:
    encoding, sha, size, notes = detect_encoding(path)
    opened: list[io.TextIOWrapper] = []
    position = [0]  # bytes of the file decoded so far

    def blocks() -> Iterator[Block]:
        try:
            raw = open(path, "rb")  # noqa: SIM115 - wrapped and closed below
        except OSError as exc:
            raise _os_reason(exc) from None
        text = io.TextIOWrapper(raw, encoding=encoding, errors="replace", newline=None)
        opened.append(text)
        try:
            while True:
                try:
                    block = text.read(TEXT_BLOCK_CHARS)
                except OSError as exc:
                    raise _os_reason(exc) from None
                if not block:
                    return
                position[0] = raw.tell()
                yield Block(block)
        finally:
            text.close()

    def close() -> None:
        for text in opened:
            text.close()

    return Document(
        kind,
        sha,
        size,
        blocks,
        encoding=encoding,
        notes=notes,
        _close=close,
        fraction_read=lambda: min(position[0] / size, 1.0),
    )


def detect_encoding(path: Path) -> tuple[str, str, int, dict[str, object]]:
    """(codec, sha256, size, notes) of a text file, in one streaming pass. Raises Unreadable for an empty or
    binary file.

    A BOM decides first (UTF-8, UTF-16, UTF-32); then UTF-16 without a BOM (NUL every other byte); then NUL
    bytes or >10% control bytes in the first 64 KB mean binary. Otherwise UTF-8 if the file decodes as UTF-8
    (a few bad bytes among much valid UTF-8 are replaced and counted in notes), else cp1252, else Latin-1.
    """
    sha, size, head = _sha256_and_head(path)
    bom = _bom_codec(head)
    if bom:
        return bom, sha, size, {}
    utf16 = _utf16_without_bom(head)
    if utf16:
        return utf16, sha, size, {}
    if b"\x00" in head or len(head.translate(None, _TEXT_BYTES)) > 0.1 * len(head):
        raise Unreadable("binary content", "NUL or control bytes; not a text file")
    invalid, multibyte, cp1252_ok = _scan_utf8(path)
    if invalid == 0:
        return "utf-8", sha, size, {}
    if multibyte >= 10 * invalid:
        return "utf-8", sha, size, {"invalid_bytes_replaced": invalid}
    return ("cp1252" if cp1252_ok else "latin-1"), sha, size, {}


def _bom_codec(head: bytes) -> str | None:
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


def _utf16_without_bom(head: bytes) -> str | None:
    """UTF-16 of mostly Latin text has a NUL in every other byte and almost none in the others."""
    sample = head[: len(head) // 2 * 2]
    if len(sample) < 8:
        return None
    even, odd = sample[0::2], sample[1::2]
    n = len(even)
    if odd.count(0) > 0.4 * n and even.count(0) < 0.05 * n:
        return "utf-16-le"
    if even.count(0) > 0.4 * n and odd.count(0) < 0.05 * n:
        return "utf-16-be"
    return None


def _scan_utf8(path: Path) -> tuple[int, int, bool]:
    """(invalid UTF-8 sequences, valid non-ASCII characters, no byte undefined in cp1252), streaming."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    invalid = multibyte = 0
    cp1252_ok = True
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(_READ_BYTES)
                text = decoder.decode(block, final=not block)
                if not text.isascii():
                    genuine = block.count("\ufffd".encode())
                    bad = max(text.count("\ufffd") - genuine, 0)
                    invalid += bad
                    multibyte += len(text) - len(text.encode("ascii", "ignore")) - bad - genuine
                    cp1252_ok = cp1252_ok and not any(b in block for b in _CP1252_UNDEFINED)
                if not block:
                    break
    except OSError as exc:
        raise _os_reason(exc) from None
    return invalid, multibyte, cp1252_ok


# ------------------------------------------------------------------------------------------------ dispatch

READERS: dict[str, Callable[[Path], Document]] = {
    ".pdf": read_pdf,
    ".md": read_markdown,
    ".markdown": read_markdown,
    ".txt": read_text,
}


def reader_for(path: Path) -> Callable[[Path], Document] | None:
    """The reader for this file's suffix (case-insensitive), or None for an unsupported type."""
    return READERS.get(path.suffix.lower())


def document_text(path: str | Path) -> str:
    """The whole document text that chunk offsets index into (for checks and tools; holds it all in memory)."""
    path = Path(path)
    reader = reader_for(path)
    if reader is None:
        raise Unreadable("unsupported type", path.suffix or "no suffix")
    with reader(path) as doc:
        return "".join(block.text for block in doc.blocks())
