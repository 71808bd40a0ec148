"""The held-out eval set: the seed's `[{"question", "answer"}]` JSON, also JSONL and capitalised keys.

Read by curate (contamination guard) and eval; it is data, not a stage. A malformed file or item fails
before any request, naming the item.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from doctune.errors import InputError


@dataclass(frozen=True)
class EvalItem:
    index: int
    question: str
    answer: str


def _field(item: dict, name: str) -> object:
    for key in (name, name.capitalize(), name.upper()):
        if key in item:
            return item[key]
    return None


def parse_items(rows: list, source: str) -> list[EvalItem]:
    """Validate rows into EvalItems.

    >>> parse_items([{"Question": "What is X?", "Answer": "A thing."}], "eval.json")
    [EvalItem(index=0, question='What is X?', answer='A thing.')]
    """
    items = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(
                f"{source}: item {i} is {type(row).__name__}, expected an object with question/answer"
            )
        question, answer = _field(row, "question"), _field(row, "answer")
        for name, value in (("question", question), ("answer", answer)):
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"{source}: item {i} has no text under '{name}' (got {value!r})")
        items.append(EvalItem(index=i, question=question.strip(), answer=answer.strip()))
    if not items:
        raise InputError(f"{source}: the eval set is empty")
    return items


def load_eval_set(path: str | Path) -> list[EvalItem]:
    """Read a JSON list (or an object holding one list) or JSONL file of question/answer items."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: eval set not found (set eval.eval_set or pass --eval-set)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: neither a JSON list nor JSONL ({exc.msg})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(f"{path}: expected a list of question/answer items")
        data = lists[0]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of question/answer items, got {type(data).__name__}")
    return parse_items(data, str(path))
