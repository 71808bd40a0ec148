"""Bring your own pairs (`curate.extra_pairs`): an FAQ as data.json, JSONL or CSV joins the generated pairs,
through the same rules, dedup and contamination guard, with provenance, into train only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from doctune.config import load_config
from doctune.curate.stage import run
from doctune.errors import InputError
from doctune.pipeline import STAGES
from doctune.runs import read_jsonl

from .helpers import TOPICS, FakeJudge, make_config, pair, scored, write_raw

FAQ_JSON = [
    {
        "Question": "How do I reset my vault password?",
        "Answer": "Open Settings, Security, Reset password; you need the recovery key.",
        "Context": "Passwords are reset under Settings > Security with the recovery key.",
    },
    {"question": "Does the relay need a database?", "answer": "No, it stores vaults as files."},  # lower case
]
FAQ_JSONL = (
    '{"QUESTION": "Which port does Lumen Relay use?", "Answer": "7300 by default."}\n'
    "\n"
    '{"Question": "What does the Team edition cost?", "Answer": "6 euros per user per month."}\n'
)
# Excel-style: BOM, semicolons, a quoted answer over two lines, capitalised headers, an extra column
FAQ_CSV = (
    "\ufeffQuestion;Answer;Owner\n"
    'How do I move a vault to another disk?;"Quit the app, move the folder,\nthen open it again.";docs\n'
    "Can I use Lumen Notes offline?;Yes: notes are plain files on your disk.;docs\n"
)


def write_faqs(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "faq.json": json.dumps(FAQ_JSON),
        "faq.jsonl": FAQ_JSONL,
        "faq.csv": FAQ_CSV,
    }
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return {name: folder / name for name in files}


def test_pairs_from_json_jsonl_and_csv_join_training_with_provenance(tmp_path):
    write_faqs(tmp_path)
    cfg = make_config(tmp_path, extra_pairs=["faq.json", "faq.jsonl", "faq.csv"], val_fraction=0.5)
    write_raw(cfg, [pair(i, t) for i, t in enumerate(TOPICS)])
    summary = run(cfg)

    curated = {p["question"]: p for p in read_jsonl(cfg.run_path / "qa_curated.jsonl")}
    user = [p for p in curated.values() if p.get("source") == "user"]
    assert len(user) == 6
    reset = curated["How do I reset my vault password?"]
    assert (reset["file"], reset["item"], reset["id"]) == ("faq.json", 1, "user:faq.json:1")
    assert reset["context"] == FAQ_JSON[0]["Context"]
    port = curated["Which port does Lumen Relay use?"]
    assert (port["file"], port["line"], port["answer"]) == ("faq.jsonl", 1, "7300 by default.")
    assert curated["What does the Team edition cost?"]["line"] == 3
    move = curated["How do I move a vault to another disk?"]
    assert (move["file"], move["line"]) == ("faq.csv", 2)
    assert move["answer"] == "Quit the app, move the folder,\nthen open it again."
    assert curated["Can I use Lumen Notes offline?"]["line"] == 4  # after the two-line row

    # user pairs are trained on, never held out; generated pairs are still split
    assert all(p["split"] == "train" for p in user)
    val_questions = {r["messages"][-2]["content"] for r in read_jsonl(cfg.run_path / "val.jsonl")}
    assert val_questions and not val_questions & {p["question"] for p in user}
    data = json.loads((cfg.run_path / "data.json").read_text())
    assert {"Question": move["question"], "Answer": move["answer"], "Context": ""} in data

    report = json.loads((cfg.run_path / "curation_report.json").read_text())
    assert report["sources"]["user"]["pairs"] == 6 and report["sources"]["user"]["kept"] == 6
    assert report["sources"]["generated"] == {
        "pairs": len(TOPICS),
        "kept": len(TOPICS),
        "kept_share": 1.0,
        "rejected": {},
    }
    entry = json.loads((cfg.run_path / "manifest.json").read_text())["stages"]["curate"]
    assert entry["inputs"]["extra_pairs:faq.csv"] == _sha256(tmp_path / "faq.csv")
    assert set(entry["inputs"]) == {
        "qa_raw.jsonl",
        *(f"extra_pairs:faq.{s}" for s in ("json", "jsonl", "csv")),
    }
    rows = dict(summary.rows)
    assert rows["your own pairs kept"] == "6 of 6 (100%)"
    assert rows["generated pairs kept"] == f"{len(TOPICS)} of {len(TOPICS)} (100%)"


def test_user_pairs_pass_the_same_rules_dedup_and_contamination_guard_but_not_the_judge(tmp_path):
    faq = [
        {"Question": "What is the default port of Lumen Relay?", "Answer": "7300."},  # an eval question
        {"Question": "How do I rotate the keys?", "Answer": "its answer"},  # placeholder
        {"Question": TOPICS[0], "Answer": "With `billing keys rotate`, monthly."},  # generated has it too
        {"Question": "How do I rotate the signing keys of billing?", "Answer": "Run billing keys rotate."},
    ]
    (tmp_path / "faq.json").write_text(json.dumps(faq), encoding="utf-8")
    (tmp_path / "eval.json").write_text(
        json.dumps([{"question": "Which is the default port of Lumen Relay?", "answer": "7300"}])
    )
    cfg = make_config(tmp_path, extra_pairs="faq.json", mode="score", eval_set="eval.json")
    write_raw(cfg, [pair(i, t) for i, t in enumerate(TOPICS[:4])])
    judge = FakeJudge(scored({}, default=5))
    run(cfg, llm=judge)

    rejected = {r["id"]: r for r in read_jsonl(cfg.run_path / "qa_rejected.jsonl")}
    assert rejected["user:faq.json:1"]["rule"] == "eval_overlap"
    assert rejected["user:faq.json:2"]["rule"] == "placeholder"
    # the generated pair scored 5 loses to the user's unjudged pair with the same question
    assert rejected["p0"]["rule"] == "duplicate_exact"
    assert rejected["p0"]["matched"]["id"] == "user:faq.json:3"
    # a user's near-duplicate of a user's pair is still a duplicate
    assert rejected["user:faq.json:4"]["rule"] == "duplicate_near"
    # the judge saw generated pairs only
    assert sorted(judge.questions()) == sorted(TOPICS[:4])
    report = json.loads((cfg.run_path / "curation_report.json").read_text())
    assert report["sources"]["user"]["rejected"] == {"placeholder": 1, "eval_overlap": 1, "duplicate_near": 1}
    assert report["sources"]["generated"]["rejected"] == {"duplicate_exact": 1}
    assert report["sources"]["generated"]["kept_share"] == 0.75


def test_bad_rows_are_named_and_skipped_the_rest_is_used(tmp_path):
    (tmp_path / "faq.jsonl").write_text(
        '{"question": "Which port does Lumen Relay use?", "answer": "7300."}\n'
        "{not json\n"
        '{"question": "What does the Team edition cost?"}\n'
        '["a list", "not an object"]\n'
        '{"question": "Is there a mobile app?", "answer": 42}\n',
        encoding="utf-8",
    )
    (tmp_path / "faq.csv").write_text(
        "question,answer\nCan I use it offline?,Yes.\nA row with one column only\n", encoding="utf-8"
    )
    (tmp_path / "faq.json").write_text(json.dumps(["just text", FAQ_JSON[0]]), encoding="utf-8")
    cfg = make_config(tmp_path, extra_pairs=["faq.jsonl", "faq.csv", "faq.json"])
    write_raw(cfg, [pair(0, TOPICS[0])])
    summary = run(cfg)

    problems = [w for w in summary.warnings if w.startswith("curate.extra_pairs:")]
    assert [p.split(": ", 1)[1].split(" (")[0].split(";")[0] for p in problems] == [
        "faq.jsonl:2: not valid JSON",
        "faq.jsonl:3: no answer",
        "faq.jsonl:4: expected an object with question and answer, got list",
        "faq.jsonl:5: answer is int, not text",
        "faq.csv:3: 1 of 2 columns",
        "faq.json: item 1: expected an object with question and answer, got str",
    ]
    assert all(p.endswith("row skipped") and "\n" not in p for p in problems)
    kept = {p["id"] for p in read_jsonl(cfg.run_path / "qa_curated.jsonl")}
    assert kept == {"p0", "user:faq.jsonl:1", "user:faq.csv:2", "user:faq.json:2"}
    report = json.loads((cfg.run_path / "curation_report.json").read_text())
    files = {f["file"]: f for f in report["sources"]["user"]["files"]}
    assert len(files["faq.jsonl"]["problems"]) == 4 and files["faq.jsonl"]["pairs"] == 1


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.csv", None, r"curate\.extra_pairs: missing\.csv: file not found"),
        ("faq.xlsx", "PK", r"faq\.xlsx: unsupported type '\.xlsx'; use \.json, \.jsonl, \.csv"),
        ("faq.csv", "q,a\nx,y\n", r"faq\.csv:1: the header row needs a question and an answer column"),
        ("faq.json", '{"Question": "x"', r"faq\.json:1: not valid JSON"),
        ("faq.json", '{"Question": "x"}', r"faq\.json: expected a list"),
    ],
)
def test_an_unusable_file_fails_before_any_judge_request_or_output(tmp_path, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text, encoding="utf-8")
    cfg = make_config(tmp_path, extra_pairs=[name], mode="score")
    write_raw(cfg, [pair(0, TOPICS[0])])
    judge = FakeJudge(scored({}))
    with pytest.raises(InputError, match=message) as caught:
        run(cfg, llm=judge)
    assert "\n" not in str(caught.value)
    assert judge.calls == [] and not (cfg.run_path / "train.jsonl").exists()


def test_paths_are_relative_to_the_config_and_a_changed_file_reruns_curate(tmp_path):
    project = tmp_path / "project"
    files = write_faqs(project / "support")
    (project / "doctune.yaml").write_text(
        "run_dir: run\ncurate: {mode: 'off', extra_pairs: support/faq.csv}\n", encoding="utf-8"
    )
    cfg = load_config(project / "doctune.yaml", stages=["curate"])
    write_raw(cfg, [pair(i, t) for i, t in enumerate(TOPICS[:3])])
    run(cfg)
    assert len(read_jsonl(cfg.run_path / "train.jsonl")) + len(read_jsonl(cfg.run_path / "val.jsonl")) == 5

    (curate,) = [s for s in STAGES if s.name == "curate"]
    before = curate.fingerprint(cfg)
    files["faq.csv"].write_text(FAQ_CSV + "Is there a dark theme?;Yes, under View.;docs\n", encoding="utf-8")
    assert curate.fingerprint(cfg) != before


def test_generated_pairs_keep_their_split_when_user_pairs_are_added(tmp_path):
    generated = [pair(i, t) for i, t in enumerate(TOPICS)]
    without = make_config(tmp_path / "a", val_fraction=0.3)
    write_raw(without, generated)
    run(without)
    write_faqs(tmp_path / "b")
    with_faq = make_config(tmp_path / "b", val_fraction=0.3, extra_pairs=["faq.json", "faq.csv"])
    write_raw(with_faq, generated)
    run(with_faq)

    def splits(cfg):
        return {p["id"]: p["split"] for p in read_jsonl(cfg.run_path / "qa_curated.jsonl")}

    a, b = splits(without), splits(with_faq)
    assert "val" in a.values()
    assert {k: v for k, v in b.items() if not k.startswith("user:")} == a


def _sha256(path: Path) -> str:
    from doctune.runs import sha256_file

    return sha256_file(path)
