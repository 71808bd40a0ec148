"""The curate stage as a user runs it: the six files and their formats, the manifest, bad input, the CLI, and
the whole way from `generate` (teacher on loopback) through `curate` (judge on loopback)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from tests.support.fake_openai import FakeOpenAIServer
from typer.testing import CliRunner

from doctune.cli import app
from doctune.curate.stage import run
from doctune.errors import InputError
from doctune.runs import atomic_write_jsonl, read_jsonl

from .helpers import TOPICS, FakeJudge, field_of, make_config, pair, scored, write_raw

SYSTEM = "You answer questions about the ACME operations handbook."


def test_the_five_files_and_the_report_have_the_documented_formats(tmp_path):
    cfg = make_config(tmp_path, mode="score", val_fraction=0.25, system_prompt=SYSTEM)
    pairs = [pair(i, t) for i, t in enumerate(TOPICS)] + [pair(99, "Why?")]
    write_raw(cfg, pairs)
    summary = run(cfg, llm=FakeJudge(scored({pairs[0]["answer"]: 2})))
    run_dir = cfg.run_path

    data = json.loads((run_dir / "data.json").read_text(encoding="utf-8"))
    assert isinstance(data, list) and len(data) == len(TOPICS) - 1
    assert all(set(item) == {"Question", "Answer", "Context"} for item in data)
    assert data[0] == {
        "Question": pairs[1]["question"],
        "Answer": pairs[1]["answer"],
        "Context": pairs[1]["context"],
    }

    train, val = read_jsonl(run_dir / "train.jsonl"), read_jsonl(run_dir / "val.jsonl")
    assert len(train) + len(val) == len(data) and val
    for row in train + val:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == SYSTEM
    by_question = {p["question"]: p for p in pairs}
    for row in train + val:
        source = by_question[row["messages"][1]["content"]]
        assert row["messages"][2]["content"] == source["answer"] and row["id"] == source["id"]

    curated = read_jsonl(run_dir / "qa_curated.jsonl")
    assert {r["id"] for r in curated} == {r["id"] for r in train + val}
    assert all(r["score"] == 5 and r["reason"] and r["split"] in ("train", "val") for r in curated)
    assert all(r["teacher"] == "teacher-m" and r["chunk_id"] for r in curated)  # the pair's own fields stay
    rejected = read_jsonl(run_dir / "qa_rejected.jsonl")
    assert [(r["id"], r["rule"], r["score"]) for r in rejected] == [
        ("p0", "low_score", 2),
        ("p99", "too_short", None),
    ]

    report = json.loads((run_dir / "curation_report.json").read_text(encoding="utf-8"))
    assert report["pairs_in"] == len(pairs) and report["kept"] == len(data)
    assert report["rejected"] == {"too_short": 1, "low_score": 1}
    assert report["judge"]["histogram"] == {"1": 0, "2": 1, "3": 0, "4": 0, "5": len(TOPICS) - 1}
    assert report["judge"]["requests"] == len(TOPICS)
    assert report["tokens"]["prompt"] == 100 * len(TOPICS)
    assert report["train"]["pairs"] == len(train) and report["val"]["pairs"] == len(val)

    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["curate"]
    assert set(entry["inputs"]) == {"qa_raw.jsonl"}
    assert entry["counts"]["kept"] == len(data) and entry["tokens"]["completion"] == 20 * len(TOPICS)
    rows = dict(summary.rows)
    assert rows["pairs in"] == len(pairs) and rows["kept"] == len(data) and rows["  score 2"] == 1
    assert rows["prompt tokens"] == 100 * len(TOPICS)
    assert {p.rsplit("/", 1)[-1] for p in summary.outputs} == {
        "qa_curated.jsonl",
        "qa_rejected.jsonl",
        "data.json",
        "train.jsonl",
        "val.jsonl",
        "curation_report.json",
    }


def test_rows_with_missing_or_odd_fields_are_rejected_not_fatal(tmp_path):
    cfg = make_config(tmp_path)
    rows = [
        {"id": "a", "question": 42, "answer": "A number.", "chunk_id": "c1"},
        {"question": "How do I rotate the keys?", "chunk_id": "c1"},
        {"answer": "No question here.", "chunk_id": "c2"},
        pair(3, TOPICS[3]),
    ]
    atomic_write_jsonl(cfg.run_path / "qa_raw.jsonl", rows)
    run(cfg)
    rejected = read_jsonl(cfg.run_path / "qa_rejected.jsonl")
    assert [(r["id"], r["rule"]) for r in rejected] == [
        ("a", "empty"),
        ("qa_raw.jsonl:2", "empty"),
        ("qa_raw.jsonl:3", "empty"),
    ]
    assert [r["id"] for r in read_jsonl(cfg.run_path / "qa_curated.jsonl")] == ["p3"]


def test_missing_or_empty_input_fails_before_any_request(tmp_path):
    cfg = make_config(tmp_path, mode="score")
    judge = FakeJudge(scored({}))
    with pytest.raises(InputError, match=r"qa_raw\.jsonl: not found"):
        run(cfg, llm=judge)
    write_raw(cfg, [])
    with pytest.raises(InputError, match=r"qa_raw\.jsonl: no pairs to curate"):
        run(cfg, llm=judge)
    write_raw(cfg, [pair(0, TOPICS[0])])
    cfg = make_config(tmp_path, mode="score", eval_set="missing_eval.json")
    with pytest.raises(InputError, match=r"missing_eval\.json: eval set not found"):
        run(cfg, llm=judge)
    assert judge.calls == []


def test_the_cli_command_prints_the_table_and_writes_the_files(tmp_path):
    cfg = make_config(tmp_path)
    write_raw(cfg, [pair(i, t) for i, t in enumerate(TOPICS)])
    (tmp_path / "doctune.yaml").write_text(
        "run_dir: run\n"
        "models:\n"
        "  teacher: {backend: openai, base_url: 'http://127.0.0.1:9/v1', model: t}\n"
        "  judge: {backend: openai, base_url: 'http://127.0.0.1:9/v1', model: j}\n"
        "  student: {backend: hf, model: s}\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["curate", "-c", str(tmp_path / "doctune.yaml"), "--mode", "off"])
    assert result.exit_code == 0, result.output
    assert "pairs in" in result.output and "kept" in result.output
    assert len(read_jsonl(cfg.run_path / "train.jsonl")) + len(read_jsonl(cfg.run_path / "val.jsonl")) == 12


# ---------------------------------------------------------------------------------- generate → curate


CHUNKS = [
    ("handbook.md#0", "Audit logs are retained for ninety days and then deleted by the archiver."),
    ("handbook.md#1", "The metrics exporter listens on port 9464 unless METRICS_PORT is set."),
    ("handbook.md#2", "Nightly database snapshots are copied to cold storage at 02:00 UTC."),
    ("handbook.md#3", "Firmware updates fail with E4012 when the battery is below twenty percent."),
    ("handbook.md#4", "Tenants export invoices as a spreadsheet from Billing > Export."),
    ("handbook.md#5", "The proxy configuration lives in the registry under HKCU\\Software\\Acme\\Proxy."),
]
# What the teacher writes for each chunk: a good pair, and for some chunks a near copy of another chunk's
# question or an eval question in other words.
TEACHER = {
    "handbook.md#0": [("How long are audit logs retained?", "Ninety days, then the archiver deletes them.")],
    "handbook.md#1": [
        ("Which port does the metrics exporter listen on?", "Port 9464, unless METRICS_PORT is set."),
        ("What port does the metrics exporter listen on by default?", "9464."),
    ],
    "handbook.md#2": [
        ("When are nightly database snapshots copied to cold storage?", "At 02:00 UTC."),
        ("How long are the audit logs retained?", "Ninety days."),
    ],
    "handbook.md#3": [("What does error E4012 mean during a firmware update?", "The battery is below 20%.")],
    "handbook.md#4": [
        ("How can a tenant export its invoices?", "From Billing > Export, as a spreadsheet."),
        ("How do tenants download their invoices as a spreadsheet?", "Billing > Export."),
    ],
    "handbook.md#5": [
        ("Where is the proxy configuration stored on Windows?", "In HKCU\\Software\\Acme\\Proxy.")
    ],
}
EVAL_SET = [
    {"question": "How do tenants download invoices as a spreadsheet?", "answer": "Billing > Export."},
    {"question": "What is the default port of the metrics exporter?", "answer": "9464."},
]


def _teacher_reply(request):
    chunk = request["messages"][1]["content"]
    (chunk_id,) = [cid for cid, text in CHUNKS if text == chunk]
    return {"pairs": [{"question": q, "answer": a} for q, a in TEACHER[chunk_id]]}


def _judge_reply(request):
    messages = request["messages"]
    question = field_of(messages, "Question")
    assert field_of(messages, "Context") in [text for _, text in CHUNKS]
    if "firmware" in question:
        return "As an AI I cannot grade this pair."  # garbage: no JSON at all
    if "proxy" in question:
        return {"reason": "partly made up", "score": 9}  # out of range
    return {"reason": "Supported by the context.", "score": 5 if "the audit" not in question else 4}


def test_generate_then_curate_with_a_judge_on_loopback(tmp_path):
    from doctune.config import build_config
    from doctune.generate import run as generate

    run_dir = tmp_path / "run"
    chunk_rows = [
        {
            "chunk_id": cid,
            "doc": "handbook.md",
            "doc_sha256": "0" * 64,
            "pages": None,
            "char_start": 0,
            "char_end": len(text),
            "n_tokens": 20,
            "text": text,
        }
        for cid, text in CHUNKS
    ]
    atomic_write_jsonl(run_dir / "chunks.jsonl", chunk_rows)
    (tmp_path / "eval_set.json").write_text(json.dumps(EVAL_SET), encoding="utf-8")
    with (
        FakeOpenAIServer(reply=_teacher_reply, models=["teacher-m"]) as teacher,
        FakeOpenAIServer(reply=_judge_reply, models=["judge-m"], latency=0.01) as judge,
    ):
        raw = {
            "run_dir": "run",
            "models": {
                "teacher": {"backend": "openai", "base_url": teacher.base_url, "model": "teacher-m"},
                "judge": {"backend": "openai", "base_url": judge.base_url, "model": "judge-m"},
                "student": {"backend": "hf", "model": "student-m"},
            },
            "generate": {"total_questions": 12},
            "curate": {"eval_set": "eval_set.json", "val_fraction": 0.34, "max_failure_rate": 0.5},
        }
        cfg = build_config(raw, tmp_path)
        generate(cfg)
        generated = read_jsonl(run_dir / "qa_raw.jsonl")
        assert len(generated) == sum(len(v) for v in TEACHER.values())
        summary = run(cfg)
        judged = judge.total_requests()
        # a second run answers every judge request from the cache
        run(cfg)
        assert judge.total_requests() == judged

    names = {"qa_curated.jsonl", "qa_rejected.jsonl", "data.json", "train.jsonl", "val.jsonl"}
    assert names <= {p.name for p in run_dir.iterdir()}
    rejected = {r["question"]: r for r in read_jsonl(run_dir / "qa_rejected.jsonl")}
    assert {q: r["rule"] for q, r in rejected.items()} == {
        "What does error E4012 mean during a firmware update?": "judge_error",
        "Where is the proxy configuration stored on Windows?": "judge_error",
        "How do tenants download their invoices as a spreadsheet?": "eval_overlap",
        "What port does the metrics exporter listen on by default?": "eval_overlap",
        "Which port does the metrics exporter listen on?": "eval_overlap",
        "How long are the audit logs retained?": "duplicate_near",
    }
    assert rejected["What does error E4012 mean during a firmware update?"]["raw"] == (
        "As an AI I cannot grade this pair."
    )
    assert '"score": 9' in rejected["Where is the proxy configuration stored on Windows?"]["raw"]
    # the near copy scored 4, the pair it repeats 5: the better one stays
    assert rejected["How long are the audit logs retained?"]["matched"]["question"] == (
        "How long are audit logs retained?"
    )
    # eval questions never reach training, and no chunk is on both sides
    training = read_jsonl(run_dir / "train.jsonl") + read_jsonl(run_dir / "val.jsonl")
    questions = {r["messages"][1]["content"] for r in training}
    assert questions == {
        "How long are audit logs retained?",
        "When are nightly database snapshots copied to cold storage?",
        "How can a tenant export its invoices?",
    }
    sides = defaultdict(set)
    for name in ("train", "val"):
        for row in read_jsonl(run_dir / f"{name}.jsonl"):
            sides[row["chunk_id"]].add(name)
    assert all(len(s) == 1 for s in sides.values()) and {"val"} in sides.values()
    assert dict(summary.rows)["  rejected: judge_error"] == 2
