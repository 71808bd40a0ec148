"""Users' own QA pairs (`curate.extra_pairs`): an FAQ or support answers that join the generated pairs.

Formats, chosen by suffix:

- `.json`: the seed's data.json, a list of `{"Question", "Answer", "Context"}` objects (Context optional);
- `.jsonl`: one object per line with `question` and `answer` (and optionally `context`);
- `.csv`: a header row with `question` and `answer` columns (and optionally `context`), comma-, semicolon- or
  tab-separated, UTF-8 (a BOM, as Excel writes it, is fine).

Keys and column names are matched case-insensitively. A row that cannot be used (not an object, no question
or answer key, a value that is not text, a CSV row with too few columns, a JSONL line that is not JSON) is
skipped with a one-line problem naming `file:line` (JSON lists: `file: item N`); a file that is missing, of
another type, not UTF-8, or not readable as its format at all fails the stage before any work starts.

Each pair becomes a row like qa_raw.jsonl's, with provenance: `source: "user"`, `file` (as the config names
it), `line` (or `item`), id `user:{file}:{line}`, and `chunk_id` `user:{file}` — a stable pseudo-chunk, since
the pair comes from no chunk of the documents.

Where user pairs go: **train only**, never val. They are the most trusted data a user has and usually few;
holding a tenth of them out for validation costs facts the model could then never learn. Val's job is to
track over-fitting on the generated distribution and to pick the adapter; the eval set (guarded by the
contamination check, which user pairs also pass through) is the held-out test.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doctune.errors import InputError

SOURCE = "user"
SUFFIXES = (".json", ".jsonl", ".csv")
_FIELDS = ("question", "answer", "context")
_CSV_DELIMITERS = (",", ";", "\t")


@dataclass
class UserPairs:
    """Pairs read from one file, and the rows that were skipped (one line each)."""

    path: Path
    name: str
    pairs: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def configured(value: str | list[str] | None) -> list[str]:
    """`curate.extra_pairs` as a list of the paths the config gives.

    >>> configured(None), configured("faq.csv"), configured(["a.json", "b.jsonl"])
    ([], ['faq.csv'], ['a.json', 'b.jsonl'])
    """
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def check_files(files: list[tuple[str, Path]]) -> None:
    """Fail before any work when a configured file is missing or of a type this module cannot read."""
    for name, path in files:
        if not path.is_file():
            raise InputError(
                f"curate.extra_pairs: {name}: file not found ({path}); fix the path or remove it"
            )
        if path.suffix.lower() not in SUFFIXES:
            raise InputError(
                f"curate.extra_pairs: {name}: unsupported type {path.suffix or '(no suffix)'!r}; "
                f"use {', '.join(SUFFIXES)}"
            )


def read(name: str, path: Path) -> UserPairs:
    """The pairs of one file (see the module doc); InputError when the file as a whole is unusable."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"curate.extra_pairs: {name}: not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"curate.extra_pairs: {name}: cannot be read ({exc.strerror})") from None
    out = UserPairs(path, name)
    suffix = path.suffix.lower()
    if suffix == ".json":
        rows = _json_items(name, text)
    elif suffix == ".jsonl":
        rows = _jsonl_rows(text)
    else:
        rows = _csv_rows(name, text)
    for unit, n, row in rows:
        where = f"{name}: item {n}" if unit == "item" else f"{name}:{n}"
        pair = _pair(row)
        if isinstance(pair, str):
            out.problems.append(f"{where}: {pair}; row skipped")
            continue
        out.pairs.append(
            {
                "id": f"{SOURCE}:{name}:{n}",
                **pair,
                "chunk_id": f"{SOURCE}:{name}",
                "doc": None,
                "source": SOURCE,
                "file": name,
                unit: n,
            }
        )
    return out


class _Bad(str):
    """A row that could not be parsed, as what is wrong with it."""


def _pair(row: Any) -> dict[str, str] | str:
    """question/answer/context of one row, or what is wrong with it."""
    if isinstance(row, _Bad):
        return str(row)
    if not isinstance(row, dict):
        return f"expected an object with question and answer, got {type(row).__name__}"
    by_key = {str(k).strip().casefold(): v for k, v in row.items() if k is not None}
    pair: dict[str, str] = {}
    for key in _FIELDS:
        value = by_key.get(key)
        if value is None:
            if key == "context":
                pair[key] = ""
                continue
            return f"no {key}" + (" (keys: " + ", ".join(map(str, row)) + ")" if row else "")
        if not isinstance(value, str):
            return f"{key} is {type(value).__name__}, not text"
        pair[key] = value
    return pair


def _json_items(name: str, text: str) -> Iterator[tuple[str, int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"curate.extra_pairs: {name}:{exc.lineno}: not valid JSON ({exc.msg}); a .json file holds one "
            "list of {Question, Answer, Context} objects (use .jsonl for one object per line)"
        ) from None
    if not isinstance(data, list):
        raise InputError(
            f"curate.extra_pairs: {name}: expected a list of {{Question, Answer, Context}} objects, "
            f"got {type(data).__name__}"
        )
    for n, item in enumerate(data, 1):
        yield "item", n, item


def _jsonl_rows(text: str) -> Iterator[tuple[str, int, Any]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield "line", n, json.loads(line)
        except json.JSONDecodeError as exc:
            yield "line", n, _Bad(f"not valid JSON ({exc.msg})")


def _csv_rows(name: str, text: str) -> Iterator[tuple[str, int, Any]]:
    """Rows of a CSV as dicts, each with the line it starts on. The delimiter is the one whose header row
    names both a question and an answer column."""
    header = text.split("\n", 1)[0]
    for delimiter in _CSV_DELIMITERS:
        names = {h.strip().casefold() for h in next(csv.reader([header], delimiter=delimiter), [])}
        if {"question", "answer"} <= names:
            break
    else:
        raise InputError(
            f"curate.extra_pairs: {name}:1: the header row needs a question and an answer column "
            f"(found: {header.strip()[:80]!r})"
        )
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    start = 2  # the line a row starts on (a quoted field may span lines)
    try:
        for row in reader:
            if None in row.values():
                found = sum(v is not None for v in row.values())
                yield "line", start, _Bad(f"{found} of {len(row)} columns")
            elif any((v or "").strip() for v in row.values() if isinstance(v, str)):
                yield "line", start, row
            start = reader.line_num + 1
    except csv.Error as exc:
        raise InputError(f"curate.extra_pairs: {name}:{reader.line_num}: not valid CSV ({exc})") from None
