"""doctune run: skip what is unchanged, re-run from the first changed stage, --from/--only/--force.

The stage table is replaced by stand-in stages that copy their input, so these tests check the orchestration
alone; tests/test_stage_contracts.py runs the real stages.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import pytest

from doctune import pipeline
from doctune.config import build_config
from doctune.errors import ConfigError
from doctune.reporting import Summary
from doctune.runs import atomic_write_text
from doctune.stages import StageContract, documents

CALLS: list[str] = []


def _stage_fn(name: str, src: str | None, dst: str):
    def run(cfg, *, progress):
        CALLS.append(name)
        text = (cfg.run_path / src).read_text() if src else "".join(p.read_text() for p in documents(cfg))
        atomic_write_text(cfg.run_path / dst, f"{name}({text})")
        return Summary(title=name, rows=[("wrote", dst)])

    return run


@pytest.fixture
def fake_stages(monkeypatch):
    module = types.ModuleType("fake_stages")
    chain = [("ingest", None, "a"), ("generate", "a", "b"), ("curate", "b", "c")]
    stages = []
    for name, src, dst in chain:
        setattr(module, name, _stage_fn(name, src, dst))
        contract = StageContract(
            name,
            f"fake_stages:{name}",
            reads=lambda run, s=src: [run.path / s] if s else [],
            sections=("data",) if src is None else (),
            external=documents if src is None else lambda cfg: [],
            writes=lambda run, d=dst: [run.path / d],
        )
        stages.append(pipeline.Stage(contract))
    monkeypatch.setitem(sys.modules, "fake_stages", module)
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "STAGE_NAMES", [s.name for s in stages])
    CALLS.clear()
    return stages


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "doc.md").write_text("hello")
    return build_config({"run_dir": "run", "data": {"dir": "data"}}, tmp_path)


def statuses(outcomes):
    return [(o.name, o.status) for o in outcomes]


def test_second_run_skips_every_stage(fake_stages, cfg):
    assert statuses(pipeline.run(cfg)) == [("ingest", "ran"), ("generate", "ran"), ("curate", "ran")]
    assert (cfg.run_path / "c").read_text() == "curate(generate(ingest(hello)))"
    CALLS.clear()
    assert [o.status for o in pipeline.run(cfg)] == ["skipped"] * 3
    assert CALLS == []


def test_a_changed_document_reruns_from_ingest(fake_stages, cfg):
    pipeline.run(cfg)
    (cfg.path("data") / "doc.md").write_text("hello again")
    CALLS.clear()
    pipeline.run(cfg)
    assert CALLS == ["ingest", "generate", "curate"]
    assert (cfg.run_path / "c").read_text() == "curate(generate(ingest(hello again)))"


def test_a_changed_config_section_reruns_that_stage_and_the_rest(fake_stages, cfg, tmp_path):
    pipeline.run(cfg)
    CALLS.clear()
    changed = build_config({"run_dir": "run", "data": {"dir": "data", "chunk_tokens": 99}}, tmp_path)
    pipeline.run(changed)
    assert CALLS == ["ingest", "generate", "curate"]


def test_a_deleted_output_reruns_its_stage_and_the_rest(fake_stages, cfg):
    pipeline.run(cfg)
    (cfg.run_path / "b").unlink()
    CALLS.clear()
    pipeline.run(cfg)
    assert CALLS == ["generate", "curate"]


def test_a_stage_that_crashed_runs_again(fake_stages, cfg, monkeypatch):
    def boom(cfg, *, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["fake_stages"], "generate", boom)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg)
    monkeypatch.setattr(sys.modules["fake_stages"], "generate", _stage_fn("generate", "a", "b"))
    CALLS.clear()
    assert statuses(pipeline.run(cfg))[0] == ("ingest", "skipped")
    assert CALLS == ["generate", "curate"]


def test_from_only_and_force(fake_stages, cfg):
    pipeline.run(cfg)
    CALLS.clear()
    pipeline.run(cfg, from_stage="generate")
    assert CALLS == ["generate", "curate"]
    CALLS.clear()
    pipeline.run(cfg, only="curate")
    assert CALLS == []  # unchanged: --only still skips a stage with nothing to do
    pipeline.run(cfg, only="curate", force=True)
    assert CALLS == ["curate"]
    with pytest.raises(ConfigError, match="'tune' is not a stage"):
        pipeline.run(cfg, from_stage="tune")


def test_overview_lists_every_stage_and_the_report(fake_stages, cfg):
    outcomes = pipeline.run(cfg)
    table = dict(pipeline.overview(cfg, outcomes).rows)
    assert {"wall time: ingest", "wall time: generate", "wall time: curate"} <= set(table)


def test_overview_shows_key_facts_first_and_the_style_flag(fake_stages, cfg):
    outcomes = pipeline.run(cfg)
    est = {"mean": 0.5, "ci": [0.25, 0.75], "n": 8}
    flag = "finetuned writes more like the references (ROUGE-L +0.15) but ...: it learnt the style, not the facts."
    summary = {
        "metric_names": ["key_fact_recall", "rouge1", "rougeL"],
        "metrics": {
            c: {m: est for m in ("rouge1", "rougeL", "key_fact_recall")} for c in ("finetuned", "base")
        },
        "comparison": {
            "a": "finetuned",
            "b": "base",
            "metrics": {m: est for m in ("rouge1", "rougeL", "key_fact_recall")},
            "style_without_facts": flag,
        },
    }
    (cfg.run_path / "eval").mkdir()
    (cfg.run_path / "eval" / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    result = pipeline.overview(cfg, outcomes)
    eval_rows = [what for what, _ in result.rows if ": " in what and not what.startswith("wall time")]
    assert eval_rows[:4] == [
        "key_fact_recall: finetuned",
        "key_fact_recall: base",
        "key_fact_recall: finetuned − base",
        "rouge1: finetuned",
    ]
    assert dict(result.rows)["key_fact_recall: finetuned"] == "0.500 [0.250, 0.750]"
    assert result.warnings == [flag]


def test_an_interrupted_stage_is_told_to_resume_and_new_inputs_start_over(fake_stages, cfg, monkeypatch):
    seen: list[dict] = []

    def training(cfg, *, progress, **options):
        seen.append(options)
        if len(seen) == 1:
            raise KeyboardInterrupt  # killed mid-training
        return _stage_fn("curate", "b", "c")(cfg, progress=progress)

    monkeypatch.setattr(sys.modules["fake_stages"], "curate", training)
    resumable = pipeline.Stage(
        dataclasses.replace(
            fake_stages[-1].contract,
            options=lambda resuming: {"resume": True} if resuming else {"overwrite": True},
        )
    )
    monkeypatch.setattr(pipeline, "STAGES", [*fake_stages[:-1], resumable])
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg)
    pipeline.run(cfg)
    (cfg.path("data") / "doc.md").write_text("new facts")
    pipeline.run(cfg)
    assert seen == [{"overwrite": True}, {"resume": True}, {"overwrite": True}]


def test_a_gguf_model_is_known_by_its_content_not_its_file_time(fake_stages, cfg, monkeypatch):
    import os

    gguf = cfg.base_dir / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    raw = {
        "run_dir": "run",
        "data": {"dir": "data"},
        "models": {"student": {"backend": "hf", "model": gguf.name}},
    }
    cfg = build_config(raw, cfg.base_dir, stages=())  # only a model to load, no teacher or judge
    loads_it = pipeline.Stage(dataclasses.replace(fake_stages[1].contract, models=lambda c: ["student"]))
    monkeypatch.setattr(pipeline, "STAGES", [fake_stages[0], loads_it, fake_stages[2]])
    pipeline.run(cfg)
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched (copied back), same bytes
    CALLS.clear()
    pipeline.run(cfg)
    assert CALLS == []
    gguf.write_bytes(b"GGUF" + bytes(63) + b"\x01")  # another model of the same size
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    pipeline.run(cfg)
    assert CALLS == ["generate", "curate"]


def test_a_missing_outside_file_of_a_later_stage_stops_the_run_before_any_stage(tmp_path):
    """A wrong eval-set path is reported before ingest starts, not after generation and training; every missing
    file is named with the stage that reads it."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Lumen\n\nLumen Notes syncs every five minutes.\n")
    cfg = build_config(
        {
            "run_dir": "run",
            "data": {"dir": "docs"},
            "models": {
                "teacher": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "teacher"},
                "student": {"backend": "hf", "model": "no-such-model"},
            },
            "generate": {"model": "teacher", "prompts": "my-prompts.yaml"},
            "curate": {"model": "teacher"},
            "finetune": {"model": "student"},
            "eval": {"eval_set": "eval_set.jsn", "judge": None, "candidates": {"base": {"model": "student"}}},
        },
        tmp_path,
    )
    with pytest.raises(ConfigError) as caught:
        pipeline.run(cfg)
    problems = caught.value.problems
    assert problems == [
        f"{tmp_path / 'my-prompts.yaml'}: not found, and generate reads it; fix the path in the config",
        f"{tmp_path / 'eval_set.jsn'}: not found, and eval reads it; fix the path in the config",
    ]
    assert not cfg.run_folder.chunks.exists()
    # only the selected stages' files count: --only ingest needs neither
    assert [o.name for o in pipeline.run(cfg, only="ingest")] == ["ingest"]
