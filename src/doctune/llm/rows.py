"""What every request row of the generation engine (llm/engine.py) does with the model's next token, before its
own stop checks: the hf backend's rows (whole completions) and serve's (streamed events) share it. Light on purpose:
no torch, so the modules that import it stay cheap to import."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def take_token(
    row: Any,
    token: int,
    eos_ids: frozenset[int] | set[int],
    token_bytes: Callable[[], list[bytes] | None],
    grammar: str,
) -> bool:
    """The steps every row's `push` starts with: ignore a finished row, finish a cancelled one, record the token,
    finish on an end-of-turn token, advance the grammar (a token it refuses fails the row; `grammar` names it in
    the message) and keep the last bytes written under it. True when the row goes on to its own stop checks.
    `row` has `generated`, `finish_reason`, `cancelled`, `matcher`, `grammar_tail`, `finished`, `fail` and
    `_finish(reason)`."""
    if row.finished:
        return False
    if row.cancelled:
        row.finish_reason = "cancelled"
        return False
    row.generated.append(token)
    if token in eos_ids:
        row._finish("stop")
        return False
    if row.matcher is not None:
        if not row.matcher.accept_token(token):
            row.fail(f"token {token} broke the {grammar} grammar")
            return False
        table = token_bytes()
        if table is not None and token < len(table):
            row.grammar_tail = (row.grammar_tail + table[token])[-4:]
    return True
