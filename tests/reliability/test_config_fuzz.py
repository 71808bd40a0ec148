"""Random YAML and values fed to the config loader: always a clean ConfigError naming the key, never a traceback."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from doctune.config import Config, build_config, load_config, parse_overrides
from doctune.errors import ConfigError

SECTIONS = list(Config.model_fields)
LEAF_KEYS = [
    "run_dir",
    "data.dir",
    "data.chunk_tokens",
    "data.chunk_overlap",
    "data.tokenizer",
    "generate.total_questions",
    "generate.temperature",
    "curate.mode",
    "curate.threshold",
    "curate.dedup.near",
    "curate.val_fraction",
    "finetune.lora.r",
    "finetune.epochs",
    "finetune.quantization",
    "eval.candidates",
    "eval.pairwise",
    "models.teacher.backend",
    "models.teacher.base_url",
    "serve.port",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def _accepts_or_names_a_key(raw, overrides=None) -> None:
    try:
        build_config(raw, base_dir=__import__("pathlib").Path("."), overrides=overrides)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError must list at least one problem"
        for line in exc.problems:
            assert ":" in line and "\n" not in line, f"not a one-line, keyed message: {line!r}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([*SECTIONS, "bogus", ""]), values, max_size=5))
def test_random_documents_give_clean_errors(raw):
    _accepts_or_names_a_key(raw)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(LEAF_KEYS), values)
def test_random_values_for_real_keys_give_clean_errors(key, value):
    _accepts_or_names_a_key({}, overrides={key: value})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=4))
def test_random_command_line_overrides_give_clean_errors(items):
    try:
        overrides = parse_overrides(items)
    except ConfigError as exc:
        assert all("--set" in p for p in exc.problems)
        return
    _accepts_or_names_a_key({}, overrides=overrides)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_file_text_gives_clean_errors(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "doctune.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        assert all("\n" not in p for p in exc.problems)


def test_a_valid_document_round_trips():
    raw = yaml.safe_load("data: {chunk_tokens: 300}\nserve: {port: 9000}\n")
    cfg = build_config(raw, base_dir=__import__("pathlib").Path("."))
    assert (cfg.data.chunk_tokens, cfg.serve.port) == (300, 9000)
