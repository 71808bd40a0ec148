"""The batching engine: batched answers equal solo answers, adapters mix, sampling is per row, fairness, recovery."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import pytest

from doctune.serve.engine import remove_adapter_hooks
from doctune.serve.processors import RowSampler
from doctune.serve.requests import Delta, Done, Failed, RequestRejected, UnknownModel

from .helpers import LONG_ANSWER_FORMAT, wait_idle

QUESTIONS = [
    "What does ingest write?",
    "How are chunks split?",
    "Which teacher model is used?",
    "Why curate the pairs?",
    "Where is the adapter saved?",
    "When does eval run?",
]


def ask(engine, model, question, **params):
    """One request on its own: (text, Done)."""
    request = engine.prepare(model, [{"role": "user", "content": question}], **params)
    with engine.start_sync(request) as events:
        collected = list(events)
    assert not any(isinstance(e, Failed) for e in collected), collected
    return "".join(e.text for e in collected if isinstance(e, Delta)), collected[-1]


def ask_together(engine, jobs):
    """Submit every (model, question, params) at once; their (text, Done) in order."""

    async def one(model, question, params):
        request = engine.prepare(model, [{"role": "user", "content": question}], **params)
        async with engine.start(request) as events:
            collected = [e async for e in events]
        return "".join(e.text for e in collected if isinstance(e, Delta)), collected[-1]

    async def main():
        return await asyncio.gather(*(one(*job) for job in jobs))

    return asyncio.run(main())


def test_concurrent_requests_share_forward_passes_and_get_their_solo_answers(idle_engine):
    solo = [ask(idle_engine, "tiny", q, max_tokens=24) for q in QUESTIONS]
    batches_before = idle_engine.stats["batches"]

    together = ask_together(idle_engine, [("tiny", q, {"max_tokens": 24}) for q in QUESTIONS])

    assert [text for text, _ in together] == [text for text, _ in solo]
    assert idle_engine.stats["batches"] - batches_before < len(QUESTIONS)
    assert idle_engine.stats["largest_batch"] >= 3


def test_base_and_adapters_mix_in_one_batch(idle_engine):
    jobs = [(model, QUESTIONS[0], {"max_tokens": 20}) for model in ("tiny", "docs", "plain", "tiny", "plain")]
    solo = [ask(idle_engine, model, question, **params) for model, question, params in jobs]
    together = ask_together(idle_engine, jobs)

    assert [text for text, _ in together] == [text for text, _ in solo]
    base, docs, plain = (solo[i][0] for i in range(3))
    assert len({base, docs, plain}) == 3  # the adapters do change the answer


def test_sampling_is_per_request_and_seeded(idle_engine):
    jobs = [
        ("tiny", QUESTIONS[1], {"max_tokens": 24, "temperature": 1.0, "seed": 7}),
        ("tiny", QUESTIONS[1], {"max_tokens": 24, "temperature": 0.0}),
        ("tiny", QUESTIONS[1], {"max_tokens": 24, "temperature": 1.0, "seed": 7}),
        ("tiny", QUESTIONS[1], {"max_tokens": 24, "temperature": 1.0, "top_p": 0.5, "seed": 8}),
    ]
    sampled, greedy, same_seed, _ = ask_together(idle_engine, jobs)
    alone_sampled = ask(idle_engine, "tiny", QUESTIONS[1], max_tokens=24, temperature=1.0, seed=7)
    alone_greedy = ask(idle_engine, "tiny", QUESTIONS[1], max_tokens=24)
    other_seed = ask(idle_engine, "tiny", QUESTIONS[1], max_tokens=24, temperature=1.0, seed=123)

    assert sampled[0] == same_seed[0] == alone_sampled[0]
    assert greedy[0] == alone_greedy[0]
    assert sampled[0] != greedy[0]
    assert other_seed[0] != sampled[0]


def test_json_schema_rows_follow_their_schema_beside_free_rows(idle_engine):
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "pattern": "^[a-z ]{1,30}$"},
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["answer", "score"],
        "additionalProperties": False,
    }
    jobs = [
        ("tiny", QUESTIONS[2], {"max_tokens": 80, "json_schema": schema}),
        ("docs", QUESTIONS[3], {"max_tokens": 30}),
        ("plain", QUESTIONS[4], {"max_tokens": 80, "json_schema": schema, "temperature": 0.8, "seed": 3}),
    ]
    (first, first_done), (_, free_done), (third, _) = ask_together(idle_engine, jobs)

    for text in (first, third):
        value = json.loads(text)
        assert set(value) == {"answer", "score"} and 1 <= value["score"] <= 5
    assert first_done.finish_reason == "stop"
    assert free_done.completion_tokens > 0


def test_json_strings_hold_no_special_tokens_or_broken_characters(idle_engine):
    pattern = '^[^"\\\\\\x00-\\x1f]{1,120}$'
    schema = {
        "type": "object",
        "properties": {"text": {"type": "string", "pattern": pattern}},
        "required": ["text"],
        "additionalProperties": False,
    }
    jobs = [
        ("tiny", f"q{i}", {"max_tokens": 300, "temperature": 1.0, "seed": i, "json_schema": schema})
        for i in range(40)
    ]
    for text, done in ask_together(idle_engine, jobs):
        value = json.loads(text)["text"]
        assert done.finish_reason == "stop"
        assert "\ufffd" not in value and re.fullmatch(pattern, value), text


def test_a_new_request_does_not_wait_for_an_unrelated_long_one(idle_engine):
    long_request = idle_engine.prepare(
        "tiny",
        [{"role": "user", "content": QUESTIONS[0]}],
        max_tokens=400,
        json_schema=LONG_ANSWER_FORMAT["json_schema"]["schema"],
    )
    finished = {}
    long_events = idle_engine.start_sync(long_request)

    def run_long():
        with long_events:
            list(long_events)
        finished["long"] = time.monotonic()

    thread = threading.Thread(target=run_long)
    thread.start()
    while len(long_events.seq.generated) < 5:  # the long request is generating
        time.sleep(0.002)
    _, done = ask(idle_engine, "docs", QUESTIONS[1], max_tokens=8)
    finished["short"] = time.monotonic()
    thread.join(120)

    assert done.completion_tokens <= 8
    assert finished["short"] < finished["long"]


def test_cancelling_frees_the_slot_at_once(idle_engine):
    request = idle_engine.prepare(
        "plain",
        [{"role": "user", "content": QUESTIONS[2]}],
        max_tokens=3000,
        json_schema=LONG_ANSWER_FORMAT["json_schema"]["schema"],
    )
    cancelled_before = idle_engine.stats["cancelled"]
    events = idle_engine.start_sync(request)
    first = next(iter(events))
    assert isinstance(first, Delta)
    events.cancel()
    wait_idle(idle_engine, timeout=5)

    assert idle_engine.stats["cancelled"] == cancelled_before + 1
    assert len(events.seq.generated) < 60  # the grammar alone would have needed 2000 or more
    assert ask(idle_engine, "plain", QUESTIONS[2], max_tokens=5)[1].completion_tokens <= 5


def test_the_engine_recovers_after_a_forward_pass_raises(idle_engine, monkeypatch, caplog):
    from transformers.models.llama import modeling_llama

    calls = {"n": 0}
    original = modeling_llama.LlamaMLP.forward

    def failing_once(self, x):
        calls["n"] += 1
        if calls["n"] == 3:  # inside the model, while PEFT's per-row adapter hooks are installed
            raise RuntimeError("simulated failure inside the model")
        return original(self, x)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", failing_once)
    request = idle_engine.prepare(
        "docs", [{"role": "user", "content": QUESTIONS[0]}], max_tokens=20, temperature=1.0, seed=1
    )
    with idle_engine.start_sync(request) as events:
        collected = list(events)
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", original)

    assert isinstance(collected[-1], Failed)
    assert (
        "RuntimeError" in collected[-1].message and "simulated" not in collected[-1].message
    )  # no details out
    assert (
        "stale PEFT adapter hooks" in caplog.text
    )  # PEFT left its hooks behind, and the engine removed them
    assert remove_adapter_hooks(idle_engine.loaded.model) == 0
    expected = ask(idle_engine, "plain", QUESTIONS[1], max_tokens=12)
    together = ask_together(
        idle_engine, [("plain", QUESTIONS[1], {"max_tokens": 12}), ("tiny", "x", {"max_tokens": 12})]
    )
    assert together[0][0] == expected[0]


def test_a_newcomer_whose_prefill_fails_leaves_the_running_rows_alone(idle_engine, monkeypatch):
    from transformers.models.llama import modeling_llama

    long_params = {"max_tokens": 400, "json_schema": LONG_ANSWER_FORMAT["json_schema"]["schema"]}
    expected = ask(idle_engine, "plain", QUESTIONS[0], **long_params)[0]
    original = modeling_llama.LlamaMLP.forward

    def prefills_fail(self, x):
        if x.shape[1] > 1:  # a prompt, not a decode step
            raise RuntimeError("simulated failure in a prefill")
        return original(self, x)

    long_events = idle_engine.start_sync(
        idle_engine.prepare("plain", [{"role": "user", "content": QUESTIONS[0]}], **long_params)
    )
    while len(long_events.seq.generated) < 3:
        time.sleep(0.002)
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", prefills_fail)
    newcomer = idle_engine.prepare("docs", [{"role": "user", "content": QUESTIONS[1]}], max_tokens=8)
    with idle_engine.start_sync(newcomer) as events:
        failed = list(events)
    long_was_running = not long_events.seq.finished
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", original)
    with long_events:
        long_text = "".join(e.text for e in long_events if isinstance(e, Delta))

    assert isinstance(failed[-1], Failed) and long_was_running
    assert long_text == expected  # the running row went on, untouched
    assert remove_adapter_hooks(idle_engine.loaded.model) == 0


def test_a_failing_sampler_fails_its_step_and_the_engine_goes_on(idle_engine, monkeypatch):
    calls = {"n": 0}
    original = RowSampler.__call__

    def failing_once(self, input_ids, scores):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure in sampling")
        return original(self, input_ids, scores)

    monkeypatch.setattr(RowSampler, "__call__", failing_once)
    request = idle_engine.prepare(
        "tiny", [{"role": "user", "content": QUESTIONS[0]}], max_tokens=20, temperature=1.0, seed=1
    )
    with idle_engine.start_sync(request) as events:
        collected = list(events)
    monkeypatch.setattr(RowSampler, "__call__", original)

    assert isinstance(collected[-1], Failed)
    assert ask(idle_engine, "tiny", QUESTIONS[0], max_tokens=5)[1].completion_tokens <= 5


def test_a_request_joins_the_running_batch_and_keeps_its_solo_answer(idle_engine):
    """Continuous batching: a newcomer is prefilled and joins rows that are mid-answer; nobody's text changes."""
    long_params = {"max_tokens": 120, "json_schema": LONG_ANSWER_FORMAT["json_schema"]["schema"]}
    long_solo = ask(idle_engine, "tiny", QUESTIONS[0], **long_params)
    short_solo = [ask(idle_engine, "docs", q, max_tokens=10) for q in QUESTIONS[1:4]]
    long_request = idle_engine.prepare("tiny", [{"role": "user", "content": QUESTIONS[0]}], **long_params)
    largest_before = idle_engine.stats["largest_batch"]
    idle_engine.stats["largest_batch"] = 0
    with idle_engine.start_sync(long_request) as long_events:
        while len(long_events.seq.generated) < 5:
            time.sleep(0.002)
        shorts = [ask(idle_engine, "docs", q, max_tokens=10) for q in QUESTIONS[1:4]]
        running_when_short_ended = not long_events.seq.finished
        long_text = "".join(e.text for e in long_events if isinstance(e, Delta))
    joined = idle_engine.stats["largest_batch"]
    idle_engine.stats["largest_batch"] = max(largest_before, joined)

    assert long_text == long_solo[0] and long_solo[1].completion_tokens == 120
    assert [text for text, _ in shorts] == [text for text, _ in short_solo]
    assert running_when_short_ended and joined == 2  # each short one ran beside the long one


def test_bad_requests_are_rejected_before_queueing(idle_engine):
    with pytest.raises(UnknownModel, match="`nope` does not exist"):
        idle_engine.prepare("nope", [{"role": "user", "content": "hi"}])
    with pytest.raises(RequestRejected, match="maximum context length is 8192 tokens"):
        idle_engine.prepare("tiny", [{"role": "user", "content": "word " * 9000}], max_tokens=10)
    with pytest.raises(RequestRejected, match="more than this server allows"):
        idle_engine.prepare("tiny", [{"role": "user", "content": "hi"}], max_tokens=5000)
    with pytest.raises(RequestRejected, match="roles must be"):
        idle_engine.prepare("tiny", [{"role": "tool", "content": "hi"}])
    assert idle_engine.pending() == 0


def test_max_tokens_defaults_to_what_the_cap_and_context_leave(idle_engine):
    request = idle_engine.prepare("tiny", [{"role": "user", "content": "hi"}])
    assert request.params.max_tokens == 4096
    long = idle_engine.prepare("tiny", [{"role": "user", "content": "word " * 2500}])
    assert len(long.prompt_ids) > 8192 - 4096
    assert len(long.prompt_ids) + long.params.max_tokens == 8192


def test_adapter_uses_its_template_and_training_system_prompt(idle_engine):
    from .helpers import ADAPTER_SYSTEM_PROMPT

    tokenizer = idle_engine.loaded.tokenizer
    question = [{"role": "user", "content": "hi"}]
    docs = idle_engine.prepare("docs", question).prompt_ids
    plain = idle_engine.prepare("plain", question).prompt_ids
    with_system = [{"role": "system", "content": "Be brief."}, *question]

    assert tokenizer.decode(docs).startswith("DOCS ADAPTER TEMPLATE ")
    assert ADAPTER_SYSTEM_PROMPT in tokenizer.decode(docs)
    assert (
        plain == idle_engine.prepare("tiny", question).prompt_ids
    )  # no template, no system prompt of its own
    assert ADAPTER_SYSTEM_PROMPT not in tokenizer.decode(idle_engine.prepare("docs", with_system).prompt_ids)


def test_done_counts_tokens(idle_engine):
    _, done = ask(idle_engine, "tiny", QUESTIONS[5], max_tokens=10)
    assert isinstance(done, Done)
    assert done.prompt_tokens == len(
        idle_engine.prepare("tiny", [{"role": "user", "content": QUESTIONS[5]}]).prompt_ids
    )
    assert 1 <= done.completion_tokens <= 10
