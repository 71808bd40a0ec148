"""The examples in the curate modules' docstrings are true."""

from __future__ import annotations

import doctest

import pytest

from doctune.curate import dedup, judge, rules, split


@pytest.mark.parametrize("module", [rules, dedup, split, judge], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
