"""Running headers and footers: lines that repeat at the top or bottom of most pages of a document.

A PDF printed from a browser carries the date, the page title, the URL and "6/37" on every page; left in the
chunks, they make the teacher ask about dates and page counters. A line is *running* when, with every run of
digits read as one symbol (so "6/37" and "7/37" are the same line), it is among the first or last EDGE_LINES
non-blank lines (a third of a short page's) of at least MIN_SHARE of the pages, and of MIN_PAGES pages at
least; pages of fewer than MIN_VOTING_LINES lines do not count. Running lines are dropped from the top and
bottom of every page; the same text in the body of a page (a table row, a repeated note) stays. Page numbers
live on in the chunks' `pages` provenance.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

EDGE_LINES = 3
MIN_SHARE = 0.5
MIN_PAGES = 3
MIN_VOTING_LINES = 3  # a page of fewer lines has no body to tell its edges from: it does not count

_DIGITS = re.compile(r"\d+")


def line_key(line: str) -> str:
    """What two running lines have in common: whitespace collapsed, each run of digits as "#".

    >>> line_key("11/8/23, 2:00 PM Getting started"), line_key("https://ai.meta.com/llama/  6/37")
    ('#/#/#, #:# PM Getting started', 'https://ai.meta.com/llama/ #/#')
    """
    return _DIGITS.sub("#", " ".join(line.split()))


def _edges(lines: list[str]) -> list[int]:
    """Indices of the first and last EDGE_LINES non-blank lines (fewer on a short page: a third of its lines
    at each end, at least one)."""
    filled = [i for i, line in enumerate(lines) if line.strip()]
    k = min(EDGE_LINES, max(1, len(filled) // 3))
    return sorted(set(filled[:k] + filled[-k:]))


def running_keys(pages: Sequence[str]) -> set[str]:
    """Keys (`line_key`) of the lines that run along the top or bottom of most `pages`.

    >>> pages = [f"Acme manual p.{n}\\nBody text {n * 7}.\\nMore body about {w}." for n, w in enumerate("abcd")]
    >>> sorted(running_keys(pages))
    ['Acme manual p.#']
    """
    needed = max(MIN_PAGES, math.ceil(MIN_SHARE * len(pages)))
    if len(pages) < needed:
        return set()
    seen: Counter[str] = Counter()
    for page in pages:
        lines = page.split("\n")
        if sum(1 for line in lines if line.strip()) >= MIN_VOTING_LINES:
            seen.update({line_key(lines[i]) for i in _edges(lines)})
    return {key for key, n in seen.items() if n >= needed}


def strip_page(page: str, keys: set[str]) -> tuple[str, list[str]]:
    """The page without its running lines at the top and bottom, and the lines dropped.

    >>> strip_page("Acme manual p.3\\nBody text.\\n", {"Acme manual p.#"})
    ('Body text.\\n', ['Acme manual p.3'])
    """
    if not keys:
        return page, []
    lines = page.split("\n")
    drop = {i for i in _edges(lines) if line_key(lines[i]) in keys}
    if not drop:
        return page, []
    return "\n".join(line for i, line in enumerate(lines) if i not in drop), [lines[i] for i in sorted(drop)]
