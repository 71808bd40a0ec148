"""How a stage tells the CLI about progress and results, without printing anything itself.

Stages take a `Progress` (the CLI passes one that draws a rich bar; library users get `NullProgress`) and
return a `Summary` (the CLI prints it as a table).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol


class Progress(Protocol):
    def start(self, description: str, total: int | None) -> None:
        """Begin a task of `total` steps (None: unknown)."""

    def advance(self, n: int = 1, **fields: Any) -> None:
        """`n` steps done; `fields` (e.g. pairs=12, failures=1) are shown beside the bar."""

    def finish(self) -> None:
        """The task is over (also after an error)."""


class NullProgress:
    """A Progress that shows nothing (library use, tests)."""

    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1, **fields: Any) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class Summary:
    """A stage's closing table: rows of (what, value), plus paths worth showing."""

    title: str
    rows: list[tuple[str, Any]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, what: str, value: Any) -> None:
        self.rows.append((what, value))


@contextmanager
def quiet_library_bars() -> Iterator[None]:
    """Library code does not draw: silence transformers' tqdm bars for the block, then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
