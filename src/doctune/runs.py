"""The run directory: atomic writes, JSONL helpers, hashes and manifest.json.

Every file a stage writes goes through `atomic_write_*` (temp file in the same folder + fsync + rename), so a
killed run never leaves a truncated output behind. A process killed between the write and the rename leaves
its temporary file (`.NAME.XXXXXXXX.tmp`); `remove_stray_temporaries` removes those when a stage starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from doctune.errors import DoctuneError, InputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
OUTPUT_MARKER = ".doctune-output"  # in every folder doctune writes as a whole (model, adapter, export)
TRACKED_PACKAGES = ("doctune", "torch", "transformers", "peft", "trl", "accelerate", "openai", "xgrammar")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of the UTF-8 text.

    >>> sha256_text("")[:12]
    'e3b0c44298fc'
    """
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def sha256_json(value: Any) -> str:
    """Hash of a JSON value in canonical form (sorted keys, no spaces)."""
    return sha256_text(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def _read_umask() -> int:
    """The process umask (os.umask can only be read by setting it, so set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def make_dir(path: str | Path) -> Path:
    """`mkdir -p path`; a file in the way or a folder that may not be written is a one-line DoctuneError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise DoctuneError(
            f"{path}: cannot create this folder, {blocker} is a file (choose another path)"
        ) from None
    except PermissionError:
        raise DoctuneError(
            f"{path}: cannot create this folder (permission denied; choose another path)"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DoctuneError(
            f"{path}: this folder is not writable (fix its permissions or choose another path)"
        )
    return path


def check_writable_dir(path: str | Path, what: str) -> Path:
    """Check, without creating anything, that `path` is or can become a folder this process may write into:
    a one-line DoctuneError naming `what` (e.g. run_dir) when a file is in the way or the folder is read-only."""
    path = Path(path)
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None:
        return path
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise DoctuneError(f"{what} {path}: {where} (choose another path)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DoctuneError(
            f"{what} {path}: {existing} is not writable (fix its permissions or choose another path)"
        )
    return path


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`, on error remove it.
    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    if path.is_dir():
        raise DoctuneError(
            f"{path}: is a folder, cannot write a file there (move it away or choose another path)"
        )
    make_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    binary = "b" in mode
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode, **({} if binary else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# atomic_open's temporary files: "." + the file's name + "." + mkstemp's 8 random characters + TEMPORARY_SUFFIX
TEMPORARY_SUFFIX = ".tmp"
TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX))
_PROCESS_STARTED = time.time()


def is_stray_temporary(path: Path) -> bool:
    """Whether `path` is a temporary file atomic_open left behind: its name has atomic_open's pattern, it is a
    plain file, and it was last written before this process started (a write in progress is left alone).

    >>> TEMPORARY_NAME.fullmatch(".chunks.jsonl.k3_x9q0a.tmp")["name"]
    'chunks.jsonl'
    >>> TEMPORARY_NAME.fullmatch("chunks.jsonl.tmp") is None
    True
    """
    if not TEMPORARY_NAME.fullmatch(path.name) or path.is_symlink() or not path.is_file():
        return False
    return path.stat().st_mtime < _PROCESS_STARTED


def remove_stray_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files that atomic_open left in `folder` and below (a process killed between a
    write and its rename); nothing else is touched. Logs one line when it removes some; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stray = [
        Path(root) / name
        for root, _, names in os.walk(folder)
        for name in names
        if is_stray_temporary(Path(root) / name)
    ]
    for path in stray:
        path.unlink(missing_ok=True)
    # a warning: an earlier run was killed while writing (and the CLI shows it before its logging is set up)
    if stray:
        shown = ", ".join(str(p.relative_to(folder)) for p in stray[:3]) + (", ..." if len(stray) > 3 else "")
        log.warning(
            "%s: removed %d temporary file(s) a killed write left behind (%s)", folder, len(stray), shown
        )
    return stray


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(
    path: str | Path,
    option: str,
    *,
    keep: Iterable[str | Path] = (),
    not_inside: Iterable[str | Path] = (),
    ours: Iterable[str] = (),
) -> Path:
    """Check that doctune may write `path` as a whole output folder (create it, or replace it whole).

    Allowed: a missing path, an empty folder, or a folder doctune wrote (it holds OUTPUT_MARKER, or one of the
    file names in `ours` that only doctune writes). Refused with a one-line DoctuneError naming `option`: a file;
    the current folder or a folder above it; a path in `keep` (run dir, config file, adapter, ...) or a folder
    above one; a path inside a folder of `not_inside` (the data folder); a non-empty folder doctune did not write.
    """
    path = Path(path)
    where = path.resolve()
    if where == Path.cwd().resolve() or where in Path.cwd().resolve().parents:
        raise DoctuneError(
            f"{option} {path}: is the current folder or above it; give a new folder for the output"
        )
    for kept in map(Path, keep):
        if _is_within(kept.resolve(), where):
            raise DoctuneError(
                f"{option} {path}: would replace {kept}, which doctune must keep; give a new folder for the output"
            )
    for folder in map(Path, not_inside):
        if _is_within(where, folder.resolve()):
            raise DoctuneError(
                f"{option} {path}: is in {folder}, the documents folder (the next ingest would read it); "
                "give a folder outside it"
            )
    if path.exists() and not path.is_dir():
        raise DoctuneError(f"{option} {path}: is a file, not a folder; give a new folder for the output")
    if path.is_dir() and any(path.iterdir()) and not is_doctune_output(path, ours):
        raise DoctuneError(
            f"{option} {path}: is a folder doctune did not write and is not empty, so it is not replaced; "
            "give a new or empty folder"
        )
    return path


def is_doctune_output(path: str | Path, ours: Iterable[str] = ()) -> bool:
    """Whether `path` is a folder doctune wrote as a whole (it holds OUTPUT_MARKER or an entry named in `ours`)."""
    path = Path(path)
    return any((path / name).exists() for name in (OUTPUT_MARKER, *ours))


def mark_output_dir(path: str | Path, command: str) -> None:
    """Write OUTPUT_MARKER into `path`: doctune wrote this folder and may replace it."""
    atomic_write_text(
        Path(path) / OUTPUT_MARKER,
        f"written by `doctune {command}`; doctune may replace this whole folder when asked to write it again\n",
    )


def dumps_row(row: dict[str, Any]) -> str:
    """One JSONL line: UTF-8 kept as it is, no trailing spaces, deterministic for equal input."""
    return json.dumps(row, ensure_ascii=False, separators=(", ", ": "))


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(dumps_row(row) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file. A line that is not a JSON object raises InputError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found (run the stage that writes it first)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or delete the line"
                ) from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class StageRecord:
    """What one stage leaves in manifest.json. Build it while the stage runs; `finish()` writes it."""

    stage: str
    inputs: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    _t0: float = field(default_factory=time.perf_counter)

    def add_input(self, path: str | Path, label: str | None = None) -> str:
        digest = sha256_file(path)
        self.inputs[label or str(path)] = digest
        return digest

    def as_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "config": self.config,
            "counts": self.counts,
            "tokens": self.tokens,
            "notes": self.notes,
            "versions": package_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "wall_time_s": round(time.perf_counter() - self._t0, 3),
        }


class RunDir:
    """One run's folder, every file and folder of it as a named attribute (the table in DESIGN.md), in the order
    the stages write them. Never inside the data folder; created on first write."""

    def __init__(self, path: str | Path):
        from doctune.adapters import AdapterDir

        self.path = Path(path)
        self.manifest_file = self.path / MANIFEST
        self.cache = self.path / "cache.sqlite"  # LLM replies of generate, curate and eval
        # ingest
        self.chunks = self.path / "chunks.jsonl"
        self.ingest_report = self.path / "ingest_report.json"
        # generate
        self.qa_raw = self.path / "qa_raw.jsonl"
        self.generate_failures = self.path / "generate_failures.jsonl"
        # curate
        self.qa_curated = self.path / "qa_curated.jsonl"
        self.qa_rejected = self.path / "qa_rejected.jsonl"
        self.data_json = self.path / "data.json"  # the seed recipe's training set
        self.train = self.path / "train.jsonl"
        self.val = self.path / "val.jsonl"
        self.curation_report = self.path / "curation_report.json"
        # finetune
        self.adapter = AdapterDir(self.path / "adapter")
        # eval
        self.eval_dir = self.path / "eval"
        self.eval_results = self.eval_dir / "results.jsonl"
        self.eval_summary = self.eval_dir / "summary.json"
        self.eval_embeddings = self.eval_dir / "embeddings.sqlite"  # MiniLM vectors of texts eval has seen
        self.eval_report_md = self.eval_dir / "report.md"
        self.eval_report_html = self.eval_dir / "report.html"
        # merge and export (commands after the pipeline)
        self.merged = self.path / "merged"
        self.export_dir = self.path / "export"
        self.export_gguf = self.export_dir / "chatbot-{type}.gguf"  # export's default; {type}: q8_0, ...

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def ensure(self) -> Path:
        return make_dir(self.path)

    def remove_stray_temporaries(self) -> list[Path]:
        """Remove the temporary files a killed write left in the run folder (see remove_stray_temporaries)."""
        return remove_stray_temporaries(self.path)

    def manifest(self) -> dict[str, Any]:
        path = self.manifest_file
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {}
        return data if isinstance(data, dict) else {}

    def set_manifest(self, section: str, key: str, value: Any) -> None:
        """Write (replace) `manifest[section][key]`, atomically."""
        manifest = self.manifest()
        manifest.setdefault(section, {})[key] = value
        self.ensure()
        atomic_write_json(self.manifest_file, manifest)

    def record(self, rec: StageRecord) -> dict[str, Any]:
        """Write (replace) one stage's entry under `stages` in manifest.json."""
        entry = rec.as_dict()
        self.set_manifest("stages", rec.stage, entry)
        return entry
