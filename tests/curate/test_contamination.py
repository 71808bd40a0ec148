"""Contamination guard: eval questions planted in the generated pairs, reworded slightly, never reach training."""

from __future__ import annotations

import json

import pytest

from doctune.curate.contamination import find_overlaps
from doctune.curate.stage import run
from doctune.evalset import EvalItem
from doctune.runs import read_jsonl

from .helpers import TOPICS, FakeJudge, make_config, pair, scored, write_raw

EVAL = [
    {"question": "What is the context length of Llama 3?", "answer": "8192 tokens."},
    {"question": "Under which license is Llama 2 released?", "answer": "The Llama 2 Community License."},
    {"question": "What is the capital of France?", "answer": "Paris."},
    {"question": "How do I request access to the model weights?", "answer": "Fill in the form."},
]
PLANTED = [
    "what is the context length of llama 3",  # case and punctuation
    "What license is Llama 2 released under?",  # reordered
    "Which city is the capital of France?",  # a word swapped for two
    "Can you tell me how I request access to the model weights?",  # a polite prefix
    "How do I request access to model weights?",  # a word dropped
    "We are writing a report on Europe. What is the capital of France?",  # added context
]


def _training_questions(cfg):
    rows = read_jsonl(cfg.run_path / "train.jsonl") + read_jsonl(cfg.run_path / "val.jsonl")
    return [r["messages"][-2]["content"] for r in rows]


def _setup(tmp_path, eval_name="eval_set.json", content=None, **curate):
    eval_path = tmp_path / eval_name
    eval_path.write_text(content or json.dumps(EVAL), encoding="utf-8")
    cfg = make_config(tmp_path, eval_set=eval_name, val_fraction=0.3, **curate)
    pairs = [pair(i, t) for i, t in enumerate(TOPICS)]
    pairs += [pair(100 + k, q, chunk=f"doc.md#{k % 3}") for k, q in enumerate(PLANTED)]
    write_raw(cfg, pairs)
    return cfg, pairs


def test_planted_eval_questions_never_reach_train_or_val(tmp_path):
    cfg, _ = _setup(tmp_path, mode="score")
    judge = FakeJudge(scored({}))
    run(cfg, llm=judge)
    training = _training_questions(cfg)
    assert len(training) == len(TOPICS)
    assert not set(PLANTED) & set(training)
    # the judge spent no tokens on them
    assert not set(PLANTED) & set(judge.questions())
    rejected = read_jsonl(cfg.run_path / "qa_rejected.jsonl")
    assert [r["rule"] for r in rejected] == ["eval_overlap"] * len(PLANTED)
    report = json.loads((cfg.run_path / "curation_report.json").read_text())
    matched = {o["question"]: o["eval_question"] for o in report["contamination"]["overlaps"]}
    assert matched == {
        PLANTED[0]: EVAL[0]["question"],
        PLANTED[1]: EVAL[1]["question"],
        PLANTED[2]: EVAL[2]["question"],
        PLANTED[3]: EVAL[3]["question"],
        PLANTED[4]: EVAL[3]["question"],
        PLANTED[5]: EVAL[2]["question"],
    }
    assert all(
        {"eval_index", "similarity", "method", "id"} <= set(o) for o in report["contamination"]["overlaps"]
    )


def test_seed_jsonl_and_capitalised_eval_sets_are_read(tmp_path):
    content = "\n".join(json.dumps({"Question": e["question"], "Answer": e["answer"]}) for e in EVAL)
    cfg, _ = _setup(tmp_path, eval_name="eval.jsonl", content=content, mode="off")
    run(cfg)
    assert not set(PLANTED) & set(_training_questions(cfg))


def test_related_but_different_questions_are_not_overlaps():
    items = [EvalItem(i, e["question"], e["answer"]) for i, e in enumerate(EVAL)]
    others = [
        "What is the vocabulary size of Llama 3?",
        "How many parameters does the largest Llama 2 model have?",
        "What is the population of France?",
        "How do I cite the model in a paper?",
        "What is the context length of Llama 2?",  # another model: numbers must agree
    ]
    assert find_overlaps(others, items) == {}
    found = find_overlaps([*others, PLANTED[1]], items)
    assert list(found) == [5] and found[5].eval_index == 1 and found[5].method == "near"


def test_what_the_default_guard_gets_wrong():
    """Word overlap (stemmed, in any order, requests like questions) is all the default guard sees; its precision
    and recall on a labelled set are measured by bench/curate.py. A paraphrase in other words passes it, and a
    different question in nearly the same words is rejected."""
    items = [EvalItem(i, e["question"], e["answer"]) for i, e in enumerate(EVAL)]
    caught = ["Context length of Llama 3: what is it?", "Explain how I request access to the model weights."]
    found = find_overlaps(caught, items)
    assert {i: m.eval_index for i, m in found.items()} == {0: 0, 1: 3}
    assert find_overlaps(["How big is the context window of Llama 3?"], items) == {}
    different = find_overlaps(["How do I change the context length of Llama 3?"], items)
    assert [m.eval_index for m in different.values()] == [0]


@pytest.mark.slow
def test_semantic_overlaps_are_caught_when_semantic_checks_are_on(tmp_path):
    paraphrase = "How big is the context window of Llama 3?"  # few shared words, same meaning
    items = [EvalItem(i, e["question"], e["answer"]) for i, e in enumerate(EVAL)]
    assert find_overlaps([paraphrase], items) == {}  # semantic checks are off by default (bench/curate.py)
    cfg, _ = _setup(tmp_path, mode="off", dedup={"semantic": 0.8})
    raw = read_jsonl(cfg.run_path / "qa_raw.jsonl")
    write_raw(cfg, [*raw, pair(200, paraphrase)])
    run(cfg)
    report = json.loads((cfg.run_path / "curation_report.json").read_text())
    semantic = [o for o in report["contamination"]["overlaps"] if o["method"] == "semantic"]
    assert [(o["question"], o["eval_index"]) for o in semantic] == [(paraphrase, 0)]
    assert paraphrase not in _training_questions(cfg)
