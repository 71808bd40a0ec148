import doctest

import pytest

from doctune.evaluate import facts, judge, metrics, report, stage, stats


@pytest.mark.parametrize("module", [facts, metrics, judge, stats, report, stage], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
