"""Every config shipped in examples/ loads and validates, and its eval set parses."""

from pathlib import Path

import pytest

from doctune.config import load_config
from doctune.evalset import load_eval_set

EXAMPLES = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*/doctune*.yaml"))
QUICKSTART = Path(__file__).parent.parent / "examples" / "quickstart"


def test_examples_exist():
    assert {p.parent.name for p in EXAMPLES} >= {"quickstart", "llama-chatbot"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_config_is_valid(path):
    cfg = load_config(path)
    assert load_eval_set(cfg.path(cfg.eval.eval_set))
    if cfg.curate.eval_set:
        assert load_eval_set(cfg.path(cfg.curate.eval_set))
    extra = cfg.curate.extra_pairs
    for name in [extra] if isinstance(extra, str) else extra or []:
        assert cfg.path(name).is_file(), name


@pytest.mark.parametrize("name", ["doctune.yaml", "doctune.tiny.yaml"])
def test_quickstart_runs_offline(name):
    cfg = load_config(QUICKSTART / name)
    assert {m.backend for m in cfg.models.values()} == {"hf"}
    assert cfg.path(cfg.data.dir).is_dir()
