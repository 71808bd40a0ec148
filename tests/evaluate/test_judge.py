import asyncio
import json

import pytest
from tests.support.fake_llm import ScriptedLLM

from doctune.evaluate.judge import Judge, parse_score, reply_schema
from doctune.llm.base import LLM, RequestFailed
from doctune.llm.structured import validate
from doctune.prompts import load_prompts

PROMPTS = load_prompts("eval")


def grade(reply, mode="score", answer="Paris."):
    llm = ScriptedLLM(lambda messages: reply)
    verdict = asyncio.run(Judge(llm, PROMPTS, mode).grade("Capital of France?", "Paris", answer))
    return verdict, llm


def test_scripted_llm_implements_the_protocol():
    assert isinstance(ScriptedLLM(lambda m: ""), LLM)


def test_score_reply_sends_reference_question_answer_and_schema():
    verdict, llm = grade('{"reason": "Correct city.", "score": 9}')
    assert (verdict.score, verdict.reason, verdict.error) == (9.0, "Correct city.", None)
    call = llm.calls[0]
    assert call["json_schema"] == reply_schema("score")
    user = call["messages"][-1]["content"]
    assert "Capital of France?" in user and "Paris." in user and "Teacher answer (reference): Paris" in user
    assert call["messages"][0]["content"] == PROMPTS["judge_score_prompt_template"]


@pytest.mark.parametrize(
    "reply",
    [
        "I think it is good.",
        '{"reason": "ok", "score": 0}',
        '{"reason": "ok", "score": 11}',
        '{"reason": "ok"}',
        '{"reason": "ok", "score": "high"}',
        '["not", "an", "object"]',
        "",
    ],
)
def test_unusable_score_reply_is_an_error_not_a_zero(reply):
    verdict, _ = grade(reply)
    assert verdict.score is None
    assert verdict.error
    assert verdict.raw == reply


def test_repairable_reply_and_string_score_are_read():
    verdict, _ = grade("Sure:\n```json\n{'reason': 'Mostly right', 'score': '7',}\n```")
    assert verdict.score == 7.0 and verdict.reason == "Mostly right"
    assert parse_score('{"Reason": "x", "Score": 7.0}').score == 7.0


def test_request_failure_becomes_a_missing_judgement():
    verdict, _ = grade(RequestFailed("HTTP 500 after 6 retries", status=500))
    assert verdict.score is None and "HTTP 500" in verdict.error


def test_yesno_uses_the_seed_keys_and_template():
    verdict, llm = grade(json.dumps({"Reason": "Same city.", "Result": "YES"}), mode="yesno")
    assert verdict.score == 1.0
    assert llm.calls[0]["json_schema"] == reply_schema("yesno")
    assert llm.calls[0]["messages"][0]["content"] == PROMPTS["judge_prompt_template"]
    assert grade('{"Reason": "Wrong.", "Result": "NO."}', mode="yesno")[0].score == 0.0
    assert grade('{"Reason": "?", "Result": "MAYBE"}', mode="yesno")[0].error


def _pairwise(choose):
    """A judge that picks with `choose(first_answer, second_answer) -> "A"|"B"|"tie"`."""

    def reply(messages):
        user = messages[-1]["content"]
        first = user.split("Answer A: ")[1].split("\n")[0]
        second = user.split("Answer B: ")[1].split("\n")[0]
        return json.dumps({"reason": "because", "winner": choose(first, second)})

    llm = ScriptedLLM(reply)
    verdict = asyncio.run(Judge(llm, PROMPTS).compare("Q?", "ref", "good answer", "bad answer"))
    return verdict, llm


def test_pairwise_asks_both_orders():
    verdict, llm = _pairwise(lambda first, second: "A" if first == "good answer" else "B")
    assert verdict.outcome == "win"
    assert (verdict.forward, verdict.backward) == ("A", "A")
    shown_first = sorted(
        c["messages"][-1]["content"].split("Answer A: ")[1].split("\n")[0] for c in llm.calls
    )
    assert shown_first == ["bad answer", "good answer"]
    assert all(c["json_schema"] == reply_schema("pairwise") for c in llm.calls)


def test_position_bias_cancels_to_a_tie():
    verdict, _ = _pairwise(lambda first, second: "A")  # always prefers whatever is shown first
    assert verdict.outcome == "tie"


def test_consistent_loss_and_unreadable_pairwise():
    assert _pairwise(lambda first, second: "B" if first == "good answer" else "A")[0].outcome == "loss"
    llm = ScriptedLLM(lambda messages: "garbage")
    verdict = asyncio.run(Judge(llm, PROMPTS).compare("Q?", "ref", "x", "y"))
    assert verdict.outcome is None and verdict.error


@pytest.mark.parametrize("bounded", [False, True])
def test_schemas_accept_what_they_describe(bounded):
    score, yesno, pair = (reply_schema(k, bounded_strings=bounded) for k in ("score", "yesno", "pairwise"))
    assert validate({"reason": "fine", "score": 5}, score) == []
    assert validate({"reason": "fine", "score": 11}, score)
    assert validate({"Reason": "fine", "Result": "NO"}, yesno) == []
    assert validate({"reason": "fine", "winner": "tie"}, pair) == []
    assert bool(validate({"reason": 'say "hi"', "winner": "A"}, pair)) == bounded


@pytest.mark.slow
def test_an_in_process_judge_on_the_tiny_model_gives_readable_verdicts(tiny_model_dir):
    """The tiny model writes noise, but constrained decoding of the bounded schemas always yields a verdict
    (xgrammar 0.2.8 compiles them: no repetition bound above 128)."""
    from doctune.config import ModelConfig
    from doctune.llm.hf_backend import HFBackend

    async def judge_all():
        llm = HFBackend(ModelConfig(backend="hf", model=str(tiny_model_dir), max_concurrency=8))
        try:
            out = []
            for mode in ("score", "yesno"):
                judge = Judge(llm, PROMPTS, mode, bounded_strings=True)
                out += await asyncio.gather(
                    *(judge.grade(f"Q{k}?", "The reference.", f"answer {k}") for k in range(4))
                )
            judge = Judge(llm, PROMPTS, bounded_strings=True)
            pairs = await asyncio.gather(*(judge.compare(f"Q{k}?", "ref", "one", "two") for k in range(2)))
            return out, pairs
        finally:
            await llm.aclose()

    verdicts, pairs = asyncio.run(judge_all())
    assert [v.error for v in verdicts] == [None] * 8
    assert all(1 <= v.score <= 10 for v in verdicts[:4]) and all(v.score in (0.0, 1.0) for v in verdicts[4:])
    assert [p.error for p in pairs] == [None, None] and all(
        p.outcome in ("win", "tie", "loss") for p in pairs
    )


def test_usage_counts_the_tokens_of_every_answered_request_and_none_of_a_failed_one():
    replies = iter(['{"reason": "ok", "score": 8}', RequestFailed("HTTP 500", status=500)])
    llm = ScriptedLLM(lambda m: next(replies, '{"reason": "same", "winner": "tie"}'), prompt_tokens=40)
    judge = Judge(llm, PROMPTS)

    async def main():
        await judge.grade("Q?", "ref", "a")
        await judge.grade("Q?", "ref", "b")
        return await judge.compare("Q?", "ref", "a", "b")

    assert asyncio.run(main()).outcome == "tie"
    assert len(llm.calls) == 4
    assert (judge.usage.prompt_tokens, judge.usage.completion_tokens) == (3 * 40, 3 * 5)
