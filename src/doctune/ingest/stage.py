"""`doctune ingest`: cfg.data.dir → {run_dir}/chunks.jsonl + ingest_report.json (+ manifest entry).

Files are read in sorted order of their path (depth first, names compared as text), so the same folder gives
byte-identical chunks.jsonl. Hidden files and folders, and the run directory when it lies inside the data
folder, are ignored. A file that cannot be used (unsupported type, empty, binary, corrupt / encrypted / fake /
text-less PDF, unreadable, a link leading out of the data folder or in a loop, a duplicate of a file already
read) is skipped: its reason goes into ingest_report.json and one warning line into the log, and the run goes
on. Nothing is ever written into the data folder.

chunks.jsonl rows: {chunk_id, doc, doc_sha256, pages, char_start, char_end, n_tokens, text}, where `doc` is the
path relative to the data folder (posix), `text == document_text[char_start:char_end]` (see
`readers.document_text`), `pages` is [first, last] (1-based) for PDFs and null otherwise, and `chunk_id` is
`{doc_sha256[:16]}-{index:05d}`.

PDF pages lose their running headers and footers (boilerplate.py); ingest_report.json counts the lines
dropped per document. Chunks whose text is identical to an earlier chunk's (the same code block in three
documents) are kept, and listed under `identical_chunks` in the report, with the documents they come from.
A large document reports progress within itself every PROGRESS_CHARS characters.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from doctune.config import Config
from doctune.errors import ConfigError, InputError
from doctune.ingest.chunking import Chunker, counter_for
from doctune.ingest.readers import PAGE_SEPARATOR, Document, PdfPagePool, Unreadable, read_pdf, reader_for
from doctune.reporting import NullProgress, Progress, Summary
from doctune.runs import RunDir, StageRecord, atomic_open, atomic_write_json, dumps_row

log = logging.getLogger(__name__)

MAX_SUMMARY_WARNINGS = 20
# Skips that are a choice, not a problem with the file: logged at INFO, not WARNING.
_QUIET_REASONS = {"unsupported type", "duplicate"}
# Worker processes for PDF text pay off when there are spare cores and enough PDF to amortise their start
# (~0.5 CPU-s each: a fresh interpreter and pdfium); below that, one process.
PARALLEL_PDF_BYTES = 8 << 20
PARALLEL_MIN_CPUS = 4
MAX_PDF_WORKERS = 8
PROGRESS_CHARS = 1 << 20
MAX_IDENTICAL_GROUPS = 50  # groups of identical chunks listed in the report (the count covers all)


def run(cfg: Config, *, progress: Progress = NullProgress(), pdf_workers: int | None = None) -> Summary:
    """Read every document under cfg.data.dir into token-counted chunks; see the module doc.

    `pdf_workers`: processes that extract PDF text ahead of the chunker; None: one per CPU (up to 8) when there
    are at least 4 CPUs and 8 MB of PDFs, else none; 0 or 1: extract in this process.
    """
    # ---- setup
    data_dir = cfg.path(cfg.data.dir)
    run_dir = cfg.run_folder
    if not data_dir.is_dir():
        raise InputError(f"data.dir: {data_dir} is not a folder (set data.dir or pass --data-dir)")
    if run_dir.path.resolve() == data_dir.resolve():
        raise ConfigError([f"run_dir: {run_dir.path} is the data folder; give the run its own folder"])
    record = StageRecord("ingest", config={"data": cfg.data.model_dump(), "run_dir": str(run_dir.path)})
    counter = counter_for(cfg)
    chunker = Chunker(counter, cfg.data.chunk_tokens, cfg.data.chunk_overlap)
    entries = walk(data_dir, exclude=run_dir.path)
    pdfs = [e.path for e in entries if e.skip is None and reader_for(e.path) is read_pdf]
    workers = _pdf_workers(pdf_workers, pdfs)
    record.notes = {"counter": counter.name, "page_separator": PAGE_SEPARATOR, "pdf_workers": workers}
    log.info("ingest: %d file(s) under %s, tokens counted with %s", len(entries), data_dir, counter.name)

    # ---- run
    report: list[dict[str, Any]] = []
    seen: dict[str, str] = {}  # sha256 -> first file with that content
    texts = ChunkTexts()
    n_chunks = n_skipped = 0

    def reading(rel: str, fraction: float, doc_chunks: int) -> None:
        progress.advance(0, chunks=n_chunks + doc_chunks, reading=f"{rel} {fraction:.0%}")

    progress.start("ingest", total=len(entries))
    try:
        with (
            PdfPagePool(workers) if workers > 1 else nullcontext() as pool,
            atomic_open(run_dir.chunks) as out,
        ):
            pdf_index = {path: i for i, path in enumerate(pdfs)}
            for entry in entries:
                if pool is not None and entry.path in pdf_index:
                    i = pdf_index[entry.path]  # while this PDF is read, the workers start on the next ones
                    for upcoming in pdfs[i : i + 1 + workers]:
                        pool.prefetch(upcoming)
                digests: list[tuple[bytes, str]] = []
                row = _ingest_file(entry, chunker, out, seen, pool, digests, partial(reading, entry.rel))
                if pool is not None:
                    pool.discard(entry.path)
                report.append(row)
                if row["status"] == "ok":
                    texts.add(row["path"], digests)
                    record.inputs[row["path"]] = row["sha256"]
                    n_chunks += row["chunks"]
                else:
                    _log_skip(row)
                    n_skipped += 1
                progress.advance(1, chunks=n_chunks, skipped=n_skipped)
            totals = _totals(report)
            identical = texts.identical()
            totals["identical_chunks"] = sum(g["count"] - 1 for g in identical)
            # ---- write
            atomic_write_json(
                run_dir.ingest_report,
                {
                    "data_dir": str(data_dir),
                    "counter": counter.name,
                    "totals": totals,
                    "files": report,
                    "identical_chunks": identical[:MAX_IDENTICAL_GROUPS],
                },
            )
            if totals["documents"] == 0:
                raise InputError(_nothing_read(data_dir, totals, run_dir.ingest_report))
    finally:
        progress.finish()

    record.counts = {k: v for k, v in totals.items() if k != "tokens"}
    record.tokens = {"chunks": totals["tokens"]}
    run_dir.record(record)
    return _summary(totals, counter.name, report, run_dir, identical)


def _pdf_workers(requested: int | None, pdfs: list[Path]) -> int:
    if requested is not None:
        return max(requested, 1) if pdfs else 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cpus < PARALLEL_MIN_CPUS:
        return 1
    pdf_bytes = 0
    for path in pdfs:
        with suppress(OSError):  # an unreadable file is reported when it is read
            pdf_bytes += path.stat().st_size
    return min(cpus, MAX_PDF_WORKERS) if pdf_bytes >= PARALLEL_PDF_BYTES else 1


# ------------------------------------------------------------------------------------------------ one file


def _ingest_file(
    entry: Entry,
    chunker: Chunker,
    out: IO[str],
    seen: dict[str, str],
    pool: PdfPagePool | None,
    digests: list[tuple[bytes, str]],
    reading: Callable[[float, int], None],
) -> dict[str, Any]:
    """Read and chunk one file into `out`; its report row. A file that fails halfway leaves nothing in out.
    `digests` gets (digest of the text, chunk_id) of each chunk written; `reading` is told how far a large
    document has got."""
    if entry.skip is not None:
        return _skipped(entry.rel, *entry.skip)
    reader = reader_for(entry.path)
    if reader is None:
        return _skipped(entry.rel, "unsupported type", entry.path.suffix.lower() or "no suffix")
    if reader is read_pdf and pool is not None:
        reader = partial(read_pdf, pool=pool)
    out.flush()
    mark = out.tell()
    try:
        with reader(entry.path) as doc:
            if doc.sha256 in seen:
                return _skipped(entry.rel, "duplicate", f"same content as {seen[doc.sha256]}")
            chars, n_chunks, n_tokens = _write_chunks(entry.rel, doc, chunker, out, digests, reading)
    except Unreadable as exc:
        _rollback(out, mark)
        return _skipped(entry.rel, exc.reason, exc.detail)
    except OSError as exc:  # the file vanished or failed while being read
        _rollback(out, mark)
        return _skipped(entry.rel, "unreadable", exc.strerror or type(exc).__name__)
    if n_chunks == 0:
        _rollback(out, mark)
        if doc.kind == "pdf":
            return _skipped(
                entry.rel, "no text layer", f"{doc.pages} page(s) without text; scanned? OCR it first"
            )
        return _skipped(entry.rel, "no text", "only whitespace")
    seen[doc.sha256] = entry.rel
    row: dict[str, Any] = {"path": entry.rel, "status": "ok", "type": doc.kind, "sha256": doc.sha256}
    row |= {"bytes": doc.size, "chars": chars, "chunks": n_chunks, "tokens": n_tokens}
    if doc.kind == "pdf":
        row["pages"] = doc.pages
        row["running_lines_dropped"] = doc.notes.get("running_lines_dropped", 0)
    else:
        row["encoding"] = doc.encoding
    row |= {k: v for k, v in doc.notes.items() if v}
    return row


def _write_chunks(
    rel: str,
    doc: Document,
    chunker: Chunker,
    out: IO[str],
    digests: list[tuple[bytes, str]],
    reading: Callable[[float, int], None],
) -> tuple[int, int, int]:
    """Stream the document through the chunker into `out`: (characters, chunks, tokens)."""
    page_starts: list[int] = []
    page_numbers: list[int] = []
    chars = 0
    n_chunks = n_tokens = 0

    def texts() -> Iterator[str]:
        nonlocal chars
        told = 0
        for block in doc.blocks():
            if block.page is not None:
                page_starts.append(chars)
                page_numbers.append(block.page)
            chars += len(block.text)
            if chars - told >= PROGRESS_CHARS:
                told = chars
                reading(doc.fraction_read(), n_chunks)
            yield block.text

    def page_at(offset: int) -> int:
        return page_numbers[bisect_right(page_starts, offset) - 1]

    for chunk in chunker.chunks(texts()):
        pages = [page_at(chunk.start), page_at(chunk.end - 1)] if page_starts else None
        row = {
            "chunk_id": f"{doc.sha256[:16]}-{n_chunks:05d}",
            "doc": rel,
            "doc_sha256": doc.sha256,
            "pages": pages,
            "char_start": chunk.start,
            "char_end": chunk.end,
            "n_tokens": chunk.n_tokens,
            "text": chunk.text,
        }
        out.write(dumps_row(row) + "\n")
        digests.append((_digest(chunk.text), row["chunk_id"]))
        n_chunks += 1
        n_tokens += chunk.n_tokens
    return chars, n_chunks, n_tokens


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ChunkTexts:
    """Which chunks have the same text as another, by a 128-bit digest of each chunk's text."""

    def __init__(self) -> None:
        self._first: dict[bytes, tuple[str, str]] = {}  # digest -> (chunk_id, doc) of its first chunk
        self._copies: dict[bytes, list[tuple[str, str]]] = {}  # digest -> later chunks with that text

    def add(self, doc: str, digests: list[tuple[bytes, str]]) -> None:
        for digest, chunk_id in digests:
            first = self._first.setdefault(digest, (chunk_id, doc))
            if first[0] != chunk_id:
                self._copies.setdefault(digest, []).append((chunk_id, doc))

    def identical(self) -> list[dict[str, Any]]:
        """Groups of chunks with one text, most copies first: count, chunk ids and documents."""
        groups = []
        for digest, copies in self._copies.items():
            chunks = [self._first[digest], *copies]
            groups.append(
                {
                    "count": len(chunks),
                    "chunk_ids": [c for c, _ in chunks],
                    "docs": sorted({d for _, d in chunks}),
                }
            )
        return sorted(groups, key=lambda g: (-g["count"], g["chunk_ids"][0]))


def _rollback(out: IO[str], mark: int) -> None:
    out.flush()
    out.seek(mark)
    out.truncate()


def _skipped(rel: str, reason: str, detail: str = "") -> dict[str, Any]:
    row = {"path": rel, "status": "skipped", "reason": reason}
    if detail:
        row["detail"] = detail
    return row


def _log_skip(row: dict[str, Any]) -> None:
    level = logging.INFO if row["reason"] in _QUIET_REASONS else logging.WARNING
    detail = f" ({row['detail']})" if "detail" in row else ""
    log.log(level, "%s: skipped, %s%s", row["path"], row["reason"], detail)


# ------------------------------------------------------------------------------------------------ totals


def _totals(report: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in report if r["status"] == "ok"]
    by_reason = Counter(r["reason"] for r in report if r["status"] == "skipped")
    return {
        "documents": len(ok),
        "skipped": sum(by_reason.values()),
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "pages": sum(r.get("pages", 0) for r in ok),
        "chunks": sum(r["chunks"] for r in ok),
        "tokens": sum(r["tokens"] for r in ok),
        "running_lines_dropped": sum(r.get("running_lines_dropped", 0) for r in ok),
    }


def _nothing_read(data_dir: Path, totals: dict[str, Any], report_path: Path) -> str:
    if totals["skipped"] == 0:
        return (
            f"{data_dir}: no .pdf, .md, .markdown or .txt files found (put documents there or set data.dir)"
        )
    reasons = ", ".join(f"{n} {reason}" for reason, n in totals["skipped_by_reason"].items())
    return (
        f"{data_dir}: no document could be read ({totals['skipped']} file(s) skipped: {reasons}); "
        f"see {report_path}"
    )


def _summary(
    totals: dict[str, Any],
    counter: str,
    report: list[dict[str, Any]],
    run_dir: RunDir,
    identical: list[dict[str, Any]],
) -> Summary:
    summary = Summary("ingest")
    summary.add("documents read", totals["documents"])
    summary.add("files skipped", totals["skipped"])
    for reason, n in totals["skipped_by_reason"].items():
        summary.add(f"  skipped: {reason}", n)
    summary.add("pdf pages", totals["pages"])
    summary.add("running header/footer lines dropped", totals["running_lines_dropped"])
    summary.add("chunks", totals["chunks"])
    summary.add("chunks identical to another", totals["identical_chunks"])
    summary.add("tokens in chunks", totals["tokens"])
    summary.add("token counter", counter)
    summary.outputs = [str(run_dir.chunks), str(run_dir.ingest_report)]
    if identical:
        docs = sorted({d for g in identical for d in g["docs"]})
        named = ", ".join(docs[:3]) + (f" and {len(docs) - 3} more" if len(docs) > 3 else "")
        summary.warnings.append(
            f"{totals['identical_chunks']} chunk(s) repeat the text of another chunk word for word ({named}); "
            f"they are listed under identical_chunks in {run_dir.ingest_report}"
        )
    skipped = [r for r in report if r["status"] == "skipped"]
    for r in skipped[:MAX_SUMMARY_WARNINGS]:
        detail = f" ({r['detail']})" if "detail" in r else ""
        summary.warnings.append(f"skipped {r['path']}: {r['reason']}{detail}")
    if len(skipped) > MAX_SUMMARY_WARNINGS:
        summary.warnings.append(
            f"... and {len(skipped) - MAX_SUMMARY_WARNINGS} more skipped file(s): see {run_dir.ingest_report}"
        )
    return summary


# ------------------------------------------------------------------------------------------------ walking


@dataclass(frozen=True, slots=True)
class Entry:
    """A file found under the data folder: its path relative to it (posix), where to read it, and why it is
    skipped if it is (reason, detail)."""

    rel: str
    path: Path
    skip: tuple[str, str] | None = None


def walk(root: Path, exclude: Path | None = None) -> list[Entry]:
    """Every non-hidden file under `root`, depth first in sorted order, without following links out of `root`
    or around a loop (those become skipped entries). `exclude` (the run directory) is left out."""
    root_real = root.resolve()
    excluded = exclude.resolve() if exclude is not None else None
    entries: list[Entry] = []
    stack = [_listing(root, "", frozenset({root_real}), entries)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        child, prefix, ancestors = item
        path = Path(child.path)
        rel = prefix + child.name
        found = _classify(child, path, rel, root_real, excluded, ancestors)
        if isinstance(found, Entry):
            entries.append(found)
        elif found is not None:
            stack.append(_listing(path, rel + "/", ancestors | {found}, entries))
    return entries


def _listing(
    folder: Path, prefix: str, ancestors: frozenset[Path], entries: list[Entry]
) -> Iterator[tuple[os.DirEntry[str], str, frozenset[Path]]]:
    """A folder's non-hidden children, sorted by name; a folder that cannot be listed becomes a skipped entry."""
    try:
        with os.scandir(folder) as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        entries.append(
            Entry(_display_name(prefix or "./"), folder, ("unreadable", f"folder: {exc.strerror}"))
        )
        return
    for child in children:
        if not child.name.startswith("."):
            yield child, prefix, ancestors


def _classify(
    child: os.DirEntry[str],
    path: Path,
    rel: str,
    root_real: Path,
    excluded: Path | None,
    ancestors: frozenset[Path],
) -> Entry | Path | None:
    """An Entry for a file (or for something skipped), the real path of a folder to walk, or None to ignore."""
    if _undecodable(child.name):
        return Entry(_display_name(rel), path, ("bad file name", "not valid UTF-8; rename it"))
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        return Entry(rel, path, ("broken link", f"points to {os.readlink(path)}"))
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        return Entry(rel, path, ("symlink loop", "the link leads back to itself"))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Entry(rel, path, ("symlink loop", "the link leads back to itself"))
        return Entry(rel, path, ("unreadable", exc.strerror or type(exc).__name__))
    if child.is_symlink() and not real.is_relative_to(root_real):
        return Entry(rel, path, ("link outside data folder", f"points to {real}; copy the file in instead"))
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        return Entry(rel, path, ("unreadable", exc.strerror or type(exc).__name__))
    if stat.S_ISDIR(mode):
        if real == excluded:
            return None  # the run directory, inside the data folder
        if real in ancestors:
            return Entry(rel + "/", path, ("symlink loop", f"points to {real}, a folder that contains it"))
        return real
    if not stat.S_ISREG(mode):
        return Entry(rel, path, ("not a regular file", "a pipe, socket or device"))
    return Entry(rel, path)


def _undecodable(name: str) -> bool:
    """A name with bytes that are not UTF-8 (Python holds them as surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _display_name(rel: str) -> str:
    """A relative path that JSON can hold: bytes that are not UTF-8 become U+FFFD."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
