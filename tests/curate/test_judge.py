"""The judge: request shape, score and yesno verdicts, and every way a reply can be unusable."""

from __future__ import annotations

import asyncio

import pytest

from doctune.curate.judge import Judge, JudgeTally, judge_all, reply_schema
from doctune.curate.stage import run
from doctune.errors import FailureRateError
from doctune.llm.structured import validate
from doctune.prompts import load_prompts
from doctune.reporting import NullProgress
from doctune.runs import read_jsonl

from .helpers import TOPICS, FakeJudge, failing, field_of, make_config, pair, scored, write_raw

PAIR = pair(0, "How long are audit logs retained?", "Ninety days.", context="Audit logs are kept 90 days.")


def _judge(reply, mode="score", threshold=4, **kw):
    llm = FakeJudge(reply)
    return llm, Judge(llm, mode=mode, threshold=threshold, prompts=load_prompts("curate"), **kw)


def _verdict(judge, p=PAIR):
    return asyncio.run(judge.judge(p))


def test_the_judge_sees_context_question_and_answer_with_the_schema():
    llm, judge = _judge(lambda m: '{"reason": "ok", "score": 5}', language="French")
    _verdict(judge)
    (call,) = llm.calls
    system, user = call["messages"]
    assert user["role"] == "user"
    assert (
        system["role"] == "system" and "5-point scale" in system["content"] and "French" in system["content"]
    )
    assert "{language}" not in system["content"]
    assert field_of(call["messages"], "Question") == PAIR["question"]
    assert field_of(call["messages"], "Answer") == PAIR["answer"]
    assert field_of(call["messages"], "Context") == PAIR["context"]
    assert call["json_schema"] == reply_schema("score")
    assert validate({"reason": "fine", "score": 3}, call["json_schema"]) == []
    assert validate({"reason": "fine", "score": 6}, call["json_schema"])


@pytest.mark.parametrize(
    ("reply", "passed", "score"),
    [
        ('{"reason": "Fully grounded.", "score": 5}', True, 5),
        ('{"reason": "Grounded, a bit long.", "score": 4}', True, 4),
        ('{"reason": "Adds claims.", "score": 3}', False, 3),
        ('Here you go:\n```json\n{"Reason": "Made up.", "Score": "1",}\n```', False, 1),
        ('{"reason": "ok", "score": 4.0}', True, 4),
    ],
)
def test_score_mode_passes_at_the_threshold(reply, passed, score):
    _, judge = _judge(lambda m: reply)
    verdict = _verdict(judge)
    assert (verdict.passed, verdict.score, verdict.error) == (passed, score, None)
    assert verdict.reason


@pytest.mark.parametrize(
    ("reply", "passed"),
    [
        ('{"Reason": "Relevant to the context.", "Result": "YES"}', True),
        ('{"Reason": "Relevant.", "Result": "yes"}', True),
        ('{"Reason": "Relevant.", "Result": "Yes."}', True),
        ('{"Reason": "About Linux, not the domain.", "Result": "NO"}', False),
    ],
)
def test_yesno_mode_reads_the_seeds_reply(reply, passed):
    llm, judge = _judge(lambda m: reply, mode="yesno")
    verdict = _verdict(judge)
    assert verdict.passed is passed and verdict.score is None and verdict.reason
    system = llm.calls[0]["messages"][0]["content"]
    assert '"Result"' in system and "YES or NO" in system
    assert llm.calls[0]["json_schema"]["properties"]["Result"]["enum"] == ["YES", "NO"]


@pytest.mark.parametrize(
    ("mode", "reply"),
    [
        ("score", "I think this pair is quite good."),
        ("score", '{"reason": "great", "score": 7}'),
        ("score", '{"reason": "great", "score": 0}'),
        ("score", '{"reason": "great", "score": "high"}'),
        ("score", '{"reason": "no score given"}'),
        ("score", "[1, 2, 3]"),
        ("score", ""),
        ("yesno", '{"Reason": "unsure", "Result": "MAYBE"}'),
        ("yesno", '{"Reason": "no result"}'),
    ],
)
def test_unusable_replies_are_errors_that_keep_the_raw_reply(mode, reply):
    _, judge = _judge(lambda m: reply, mode=mode)
    verdict = _verdict(judge)
    assert verdict.passed is None and verdict.score is None
    assert verdict.raw == reply
    assert verdict.error.startswith("unusable reply")


def test_a_request_that_keeps_failing_is_an_error_not_a_crash():
    _, judge = _judge(failing("HTTP 503 after 6 retries"))
    verdict = _verdict(judge)
    assert verdict.passed is None
    assert "HTTP 503 after 6 retries" in verdict.error
    assert verdict.raw == "Server overloaded"


def test_judge_all_keeps_the_order_and_counts():
    replies = iter(['{"reason": "a", "score": 5}', "garbage", '{"reason": "c", "score": 2}'])
    _, judge = _judge(lambda m: next(replies))
    tally = JudgeTally()
    pairs = [pair(i, q) for i, q in enumerate(TOPICS[:3])]
    verdicts = asyncio.run(judge_all(judge, pairs, progress=NullProgress(), tally=tally))
    assert [v.passed for v in verdicts] == [True, None, False]
    assert (tally.requests, tally.passed, tally.errors, tally.prompt_tokens) == (3, 1, 1, 300)


def test_a_users_seed_yaml_replaces_the_yesno_prompt(tmp_path):
    seed = tmp_path / "generation_config.yaml"
    seed.write_text(
        "question_prompt_template: ignored here\n"
        "curation_prompt_template: >\n  Judge pairs about Llama models in {language}. Reply with Reason and Result.\n",
        encoding="utf-8",
    )
    cfg = make_config(tmp_path, mode="yesno", prompts=str(seed))
    write_raw(cfg, [pair(0, TOPICS[0])])
    llm = FakeJudge(lambda m: '{"Reason": "ok", "Result": "YES"}')
    run(cfg, llm=llm)
    assert llm.calls[0]["messages"][0]["content"].startswith("Judge pairs about Llama models in English.")


def test_garbage_for_some_pairs_leaves_them_in_rejected_with_judge_error(tmp_path):
    cfg = make_config(tmp_path, mode="score", max_failure_rate=0.5)
    pairs = [pair(i, q) for i, q in enumerate(TOPICS)]
    write_raw(cfg, pairs)
    garbage = {pairs[2]["answer"], pairs[7]["answer"]}

    def reply(messages):
        answer = field_of(messages, "Answer")
        return "Sorry, I cannot rate this." if answer in garbage else '{"reason": "grounded", "score": 5}'

    summary = run(cfg, llm=FakeJudge(reply))
    rejected = read_jsonl(cfg.run_path / "qa_rejected.jsonl")
    assert [(r["id"], r["rule"], r["raw"]) for r in rejected] == [
        ("p2", "judge_error", "Sorry, I cannot rate this."),
        ("p7", "judge_error", "Sorry, I cannot rate this."),
    ]
    assert all(r["error"] for r in rejected)
    kept = read_jsonl(cfg.run_path / "qa_curated.jsonl")
    assert len(kept) == len(pairs) - 2
    assert ("  rejected: judge_error", 2) in summary.rows
    assert any("judge_error" in w for w in summary.warnings)


def test_too_many_judge_errors_fail_the_stage_after_writing_everything(tmp_path):
    cfg = make_config(tmp_path, mode="score", max_failure_rate=0.1)
    write_raw(cfg, [pair(i, q) for i, q in enumerate(TOPICS)])
    answers = iter(range(100))

    def reply(messages):
        return "not json at all" if next(answers) % 3 == 0 else '{"reason": "fine", "score": 5}'

    with pytest.raises(FailureRateError, match=r"4 of 12 judge requests failed .*qa_rejected\.jsonl"):
        run(cfg, llm=FakeJudge(reply))
    rejected = read_jsonl(cfg.run_path / "qa_rejected.jsonl")
    assert [r["rule"] for r in rejected] == ["judge_error"] * 4
    assert len(read_jsonl(cfg.run_path / "train.jsonl")) + len(read_jsonl(cfg.run_path / "val.jsonl")) == 8
    assert (cfg.run_path / "curation_report.json").is_file()


def test_low_scores_and_no_answers_are_rejected_with_their_rule(tmp_path):
    cfg = make_config(tmp_path, mode="score", threshold=4)
    pairs = [pair(i, q) for i, q in enumerate(TOPICS[:4])]
    write_raw(cfg, pairs)
    run(cfg, llm=FakeJudge(scored({pairs[1]["answer"]: 3, pairs[2]["answer"]: 1})))
    rejected = read_jsonl(cfg.run_path / "qa_rejected.jsonl")
    assert [(r["id"], r["rule"], r["score"]) for r in rejected] == [
        ("p1", "low_score", 3),
        ("p2", "low_score", 1),
    ]
    assert all(r["reason"] == "checked against the context" for r in rejected)

    cfg = make_config(tmp_path / "yesno", mode="yesno")
    write_raw(cfg, pairs)
    no_for = pairs[3]["answer"]
    run(
        cfg,
        llm=FakeJudge(
            lambda m: '{"Reason": "r", "Result": "%s"}' % ("NO" if field_of(m, "Answer") == no_for else "YES")
        ),
    )
    assert [(r["id"], r["rule"]) for r in read_jsonl(cfg.run_path / "qa_rejected.jsonl")] == [
        ("p3", "judge_no")
    ]
