"""`doctune generate`: question allocation, reply repair, the stage against a protocol-level LLM, a real
OpenAI-compatible server on loopback (faults, kill and resume, unreachable), and the in-process hf backend."""

from __future__ import annotations

import asyncio
import doctest
import itertools
import json
import math
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.support.fake_openai import FakeOpenAIServer, FaultPlan, prompt_key, unused_port

from doctune import generate
from doctune.config import ModelConfig, build_config, load_config
from doctune.errors import FailureRateError, InputError, LLMError
from doctune.generate import allocate_questions, parse_pairs, reply_schema, run, text_bound
from doctune.llm.base import Completion, RequestFailed
from doctune.llm.structured import ReplyParseError, text_pattern, validate
from doctune.prompts import load_prompts
from doctune.runs import read_jsonl, sha256_text

# ------------------------------------------------------------------------------------------ allocation


def test_allocation_is_proportional_to_tokens():
    assert allocate_questions([100, 300, 600], 10) == [1, 3, 6]
    assert allocate_questions([1, 1, 1], 7) == [3, 2, 2]
    assert allocate_questions([500, 500], 3) in ([2, 1], [1, 2])


def test_every_chunk_asks_at_least_one_when_there_are_enough_questions():
    counts = allocate_questions([10_000, 5, 5, 5], 6)
    assert counts == [3, 1, 1, 1]


def test_fewer_questions_than_chunks_go_to_the_largest():
    assert allocate_questions([10, 500, 20, 400], 2) == [0, 1, 0, 1]


def test_no_chunks_and_zero_token_chunks():
    assert allocate_questions([], 5) == []
    assert allocate_questions([0, 0], 4) == [2, 2]
    assert allocate_questions([0, 100], 3) == [1, 2]


@settings(max_examples=300, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=0, max_value=100_000), min_size=1, max_size=60),
    total=st.integers(min_value=0, max_value=5_000),
)
def test_allocation_properties(weights, total):
    counts = allocate_questions(weights, total)
    assert len(counts) == len(weights)
    assert sum(counts) == total
    assert all(c >= 0 for c in counts)
    if total >= len(weights):
        assert all(c >= 1 for c in counts)
    # more tokens never means fewer questions
    for i in range(len(weights)):
        for j in range(len(weights)):
            if weights[i] > weights[j]:
                assert counts[i] >= counts[j]
    # proportional: no chunk gets more than its share rounded up (or the one every chunk is owed), and when
    # every share is at least one, each count is its exact share rounded up or down (Hamilton's quota rule)
    w_total = sum(weights)
    if w_total == 0:
        return
    shares = [Fraction(total * w, w_total) for w in weights]
    floor_one = total >= len(weights)
    for count, share in zip(counts, shares, strict=True):
        assert count <= max(math.ceil(share), 1 if floor_one else 0)
    if total < len(weights) or all(s >= 1 for s in shares):
        for count, share in zip(counts, shares, strict=True):
            assert math.floor(share) <= count <= math.ceil(share)


# ------------------------------------------------------------------------------------------ replies


@pytest.mark.parametrize(
    "reply",
    [
        '{"pairs": [{"question": "What is X?", "answer": "A thing."}]}',
        'Here you are:\n```json\n{"pairs": [{"question": "What is X?", "answer": "A thing."}]}\n```',
        '{"pairs": [{"question": "What is X?", "answer": "A thing.",},],}',
        '[{"Question": "What is X?", "Answer": "A thing."}]',
        'Sure!\n[\n  {"QUESTION": "What is X?", "ANSWER": "A thing."},\n]\nLet me know if you need more.',
        '```\n[{"Question": "What is X?", "Answer": "A thing.", "Context": "X is a thing."}]\n```',
        '{"question": "What is X?", "answer": "A thing."}',
    ],
    ids=[
        "pure",
        "fenced-with-preamble",
        "trailing-commas",
        "seed-capitalised-list",
        "upper-keys",
        "context",
        "one",
    ],
)
def test_messy_replies_are_repaired(reply):
    assert parse_pairs(reply, limit=5) == [("What is X?", "A thing.")]


def test_non_ascii_passes_through_unchanged():
    reply = (
        '```json\n[{"Question": "Qu\'est-ce qu\'un café ☕ à Zürich?", "Answer": "Ein Getränk — 咖啡."}]\n```'
    )
    assert parse_pairs(reply, limit=1) == [("Qu'est-ce qu'un café ☕ à Zürich?", "Ein Getränk — 咖啡.")]


def test_pairs_are_capped_and_incomplete_items_dropped():
    reply = json.dumps(
        {"pairs": [{"question": "A?", "answer": "a"}, {"question": "B?"}, {"question": " ", "answer": "c"}]}
        | {"more": [{"question": "D?", "answer": "d"}, {"question": "E?", "answer": "e"}]}
    )
    assert parse_pairs(reply, limit=2) == [("A?", "a"), ("D?", "d")]


def test_a_reply_cut_at_max_tokens_loses_its_last_pair():
    cut = '{"pairs": [{"question": "A?", "answer": "a"}, {"question": "B?", "answer": "the answer is ba'
    assert parse_pairs(cut, limit=5, truncated=True) == [("A?", "a")]


@pytest.mark.parametrize("reply", ["", "I cannot help with that.", "   "])
def test_replies_without_json_are_refused(reply):
    with pytest.raises(ReplyParseError):
        parse_pairs(reply, limit=3)


def test_reply_schema_bounds_the_pairs():
    schema = reply_schema(3)
    pairs = schema["properties"]["pairs"]
    assert pairs["maxItems"] == 3
    assert pairs["items"]["required"] == ["question", "answer"]
    assert (
        validate({"pairs": [{"question": "Was kostet es?", "answer": 'Es kostet "nichts".'}]}, schema) == []
    )
    assert validate({"pairs": [{"question": "Q?", "answer": "A"}] * 4}, schema) != []
    assert validate([{"Question": "Q?", "Answer": "A"}], schema) != []  # accepted only through repair


def test_in_process_replies_fit_max_tokens():
    for max_tokens, n in [(2048, 1), (2048, 7), (512, 3), (256, 1), (128, 1)]:
        bound = text_bound(max_tokens, n)
        worst = 16 + n * (32 + 2 * bound)  # one token per character
        assert worst <= max_tokens or bound == 16
        assert 16 <= bound <= 400
    bounded = reply_schema(2, max_chars=250)
    ok = {"pairs": [{"question": "é" * 199 + "?", "answer": "Ünïcödé, fine."}]}
    assert validate(ok, bounded) == []
    for bad in ["", "?", "x" * 201 + "?", 'say "hi"?', "back\\slash?", "new\nline?", "no question mark"]:
        assert validate({"pairs": [{"question": bad, "answer": "a"}]}, bounded) != [], bad
    assert text_pattern(64).endswith("{1,64}$")
    longest = reply_schema(1, max_chars=400)
    for length, fits in [(1, True), (100, True), (101, True), (399, True), (400, True), (401, False)]:
        assert (validate({"pairs": [{"question": "Q?", "answer": "x" * length}]}, longest) == []) is fits, (
            length
        )


def test_docstring_examples():
    assert doctest.testmod(generate).failed == 0


def test_packaged_prompt_keeps_the_seed_keys():
    template = load_prompts("generate")["question_prompt_template"]
    assert "{num_questions}" in template and "{language}" in template
    assert "JSON" in template and "solely" in template


# ------------------------------------------------------------------- the stage, with an LLM of the protocol


class ScriptedLLM:
    """An LLM (doctune.llm.base protocol) whose reply to each request is `reply(messages, json_schema)`:
    a string, a Completion, or a RequestFailed to raise."""

    def __init__(self, reply, name: str = "scripted"):
        self.reply = reply
        self.name = name
        self.calls: list[dict[str, Any]] = []
        self.preflighted = self.closed = False

    async def preflight(self) -> None:
        self.preflighted = True

    async def aclose(self) -> None:
        self.closed = True

    async def chat(self, messages, *, max_tokens, temperature=0.0, json_schema=None, stop=None) -> Completion:
        self.calls.append({"messages": messages, "max_tokens": max_tokens, "json_schema": json_schema})
        await asyncio.sleep(0.001)
        out = self.reply(messages, json_schema)
        if isinstance(out, Exception):
            raise out
        if isinstance(out, Completion):
            return out
        return Completion(text=out, prompt_tokens=len(messages[1]["content"]), completion_tokens=len(out))


def make_run(tmp_path: Path, texts: list[str], **generate: Any):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [
        {
            "chunk_id": f"doc{i % 2}.md#{i:04d}",
            "doc": f"doc{i % 2}.md",
            "doc_sha256": "0" * 64,
            "pages": None,
            "char_start": 0,
            "char_end": len(text),
            "n_tokens": max(1, len(text) // 4),
            "text": text,
        }
        for i, text in enumerate(texts)
    ]
    (run_dir / "chunks.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    cfg = build_config(
        {"run_dir": str(run_dir), "generate": {"total_questions": 2 * len(texts), **generate}}, tmp_path
    )
    return cfg, run_dir


def echo_pairs(messages, schema) -> str:
    """A well-behaved teacher: as many pairs as the schema allows, quoting the chunk."""
    n = schema["properties"]["pairs"]["maxItems"]
    chunk = messages[1]["content"]
    return json.dumps(
        {"pairs": [{"question": f"Q{k} about {chunk}?", "answer": f"A{k}: {chunk}"} for k in range(n)]}
    )


def test_stage_writes_pairs_with_provenance(tmp_path):
    texts = [
        "Erste Seite über Käse.",
        "Second chunk about bread and butter, a bit longer than the first one.",
    ]
    cfg, run_dir = make_run(tmp_path, texts, total_questions=5)
    llm = ScriptedLLM(echo_pairs)
    summary = run(cfg, llm=llm)

    rows = read_jsonl(run_dir / "qa_raw.jsonl")
    assert len(rows) == 5
    # 5 and 17 tokens share 5 questions as 1 and 4; rows in chunk order
    assert [r["chunk_id"] for r in rows] == ["doc0.md#0000"] + ["doc1.md#0001"] * 4
    assert len({r["id"] for r in rows}) == 5
    template = load_prompts("generate")["question_prompt_template"]
    first = rows[0]
    assert first["question"] == "Q0 about Erste Seite über Käse.?"  # non-ASCII unchanged
    assert first["context"] == texts[0]
    assert first["doc"] == "doc0.md"
    assert first["teacher"] == cfg.models["teacher"].model
    assert first["prompt_sha256"] == sha256_text(template)
    assert first["prompt_tokens"] == len(texts[0]) and first["completion_tokens"] > 0
    assert read_jsonl(run_dir / "generate_failures.jsonl") == []
    assert llm.preflighted and llm.closed

    # the request: the seed's shape (filled template as system, chunk as user) and the reply schema
    call = llm.calls[0]
    assert (
        "{num_questions}" not in call["messages"][0]["content"]
        and "English" in call["messages"][0]["content"]
    )
    assert call["json_schema"]["properties"]["pairs"]["maxItems"] == 1
    assert call["max_tokens"] == cfg.generate.max_tokens

    stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]
    assert stage["counts"]["pairs"] == 5 and stage["counts"]["requests"] == 2
    assert stage["tokens"]["prompt"] == sum(len(t) for t in texts)
    assert stage["tokens"]["prompt_sent"] == stage["tokens"]["prompt"]
    assert dict(summary.rows)["pairs"] == 5


def test_bad_replies_and_failed_requests_go_to_the_failures_file(tmp_path):
    texts = [f"chunk number {i}" for i in range(6)]
    replies = {
        "chunk number 0": '```json\n[{"Question": "Q?", "Answer": "A.",},]\n```',
        "chunk number 1": "Sorry, I can't do that.",
        "chunk number 2": RequestFailed("HTTP 500 after 6 retries", status=500, raw="upstream exploded"),
        "chunk number 3": '{"pairs": []}',
        "chunk number 4": Completion(
            text='{"pairs": [{"question": "Q?", "answer": "A long ans', finish_reason="length"
        ),
        "chunk number 5": '{"pairs": [{"question": "Q?", "answer": "A."}]}',
    }
    cfg, run_dir = make_run(tmp_path, texts, total_questions=6, max_failure_rate=1.0)
    run(cfg, llm=ScriptedLLM(lambda m, s: replies[m[1]["content"]]))

    pairs = read_jsonl(run_dir / "qa_raw.jsonl")
    failures = {f["chunk_id"]: f for f in read_jsonl(run_dir / "generate_failures.jsonl")}
    assert {p["chunk_id"] for p in pairs} == {"doc0.md#0000", "doc1.md#0005"}
    assert {f["kind"] for f in failures.values()} == {"parse", "request", "empty"}
    assert failures["doc1.md#0001"]["raw"] == "Sorry, I can't do that."
    assert (
        failures["doc0.md#0002"]["status"] == 500 and failures["doc0.md#0002"]["raw"] == "upstream exploded"
    )
    assert failures["doc1.md#0003"]["raw"] == '{"pairs": []}'
    assert "max_tokens" in failures["doc0.md#0004"]["reason"]
    # every chunk ends with pairs or a failure row
    assert {p["chunk_id"] for p in pairs} | set(failures) == {f"doc{i % 2}.md#{i:04d}" for i in range(6)}


def test_in_process_teachers_get_bounded_strings_and_pairs_outside_them_are_dropped(tmp_path):
    cfg, run_dir = make_run(tmp_path, ["a chunk"], total_questions=3)
    cfg.models["teacher"] = ModelConfig(backend="hf", model="some/model")
    reply = json.dumps(
        {
            "pairs": [
                {"question": "Is it fine?", "answer": "Yes."},
                {"question": 'Is "this" fine?', "answer": "No: quotes need escapes."},
                {"question": "Long?", "answer": "x" * 401},
            ]
        }
    )
    llm = ScriptedLLM(lambda m, s: reply)
    run(cfg, llm=llm)
    assert llm.calls[0]["json_schema"] == reply_schema(3, max_chars=text_bound(cfg.generate.max_tokens, 3))
    assert [r["question"] for r in read_jsonl(run_dir / "qa_raw.jsonl")] == ["Is it fine?"]


def test_too_many_failures_raise_after_writing(tmp_path):
    cfg, run_dir = make_run(tmp_path, [f"c{i}" for i in range(4)], total_questions=4, max_failure_rate=0.25)
    fail_half = ScriptedLLM(
        lambda m, s: RequestFailed("HTTP 503") if m[1]["content"] in ("c0", "c1") else echo_pairs(m, s)
    )
    with pytest.raises(FailureRateError, match=r"2 of 4 requests failed.*generate_failures\.jsonl"):
        run(cfg, llm=fail_half)
    assert len(read_jsonl(run_dir / "qa_raw.jsonl")) == 2
    assert len(read_jsonl(run_dir / "generate_failures.jsonl")) == 2
    counts = json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]["counts"]
    assert counts["failed"] == counts["failures"] == 2


def test_a_users_seed_template_replaces_the_packaged_one(tmp_path):
    seed = tmp_path / "generation_config.yaml"
    seed.write_text(
        "question_prompt_template: >\n  Write {num_questions} pairs in {language} as JSON.\nnum_questions: 2\n",
        encoding="utf-8",
    )
    cfg, run_dir = make_run(tmp_path, ["un texte"], total_questions=2, prompts=str(seed), language="French")
    llm = ScriptedLLM(echo_pairs)
    run(cfg, llm=llm)
    assert llm.calls[0]["messages"][0]["content"].strip() == "Write 2 pairs in French as JSON."
    rows = read_jsonl(run_dir / "qa_raw.jsonl")
    assert rows[0]["prompt_sha256"] == sha256_text("Write {num_questions} pairs in {language} as JSON.\n")


def test_chunks_without_a_question_send_no_request(tmp_path):
    cfg, _ = make_run(tmp_path, ["short", "a much longer chunk of text " * 20], total_questions=1)
    llm = ScriptedLLM(echo_pairs)
    summary = run(cfg, llm=llm)
    assert len(llm.calls) == 1 and llm.calls[0]["messages"][1]["content"].startswith("a much longer")
    assert any("got no question" in w for w in summary.warnings)


def test_missing_or_bad_chunks_fail_before_any_request(tmp_path):
    cfg = build_config({"run_dir": str(tmp_path / "run")}, tmp_path)
    llm = ScriptedLLM(echo_pairs)
    with pytest.raises(InputError, match=r"chunks\.jsonl: not found"):
        run(cfg, llm=llm)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "chunks.jsonl").write_text('{"chunk_id": "a", "text": "x"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"row 1 lacks"):
        run(cfg, llm=llm)
    assert llm.calls == [] and not llm.preflighted


# ------------------------------------------------------------------------------------------ a real server on loopback


def teacher_reply(request: dict[str, Any]) -> str:
    """The fake server's teacher: as many pairs as the schema allows, about the chunk; prose for chunks that
    ask for it, and the seed's fenced, capitalised list for every third chunk."""
    chunk = request["messages"][-1]["content"]
    n = request["response_format"]["json_schema"]["schema"]["properties"]["pairs"]["maxItems"]
    if "[prose]" in chunk:
        return "I am sorry, but this passage does not contain anything I can ask about."
    pairs = [
        {"question": f"What does part {k} of «{chunk}» say?", "answer": f"It says {chunk}."} for k in range(n)
    ]
    if chunk.endswith("0") or chunk.endswith("3") or chunk.endswith("6"):
        seed_style = [{"Question": p["question"], "Answer": p["answer"]} for p in pairs]
        return "Here you go:\n```json\n" + json.dumps(seed_style, ensure_ascii=False, indent=1) + "\n```"
    return json.dumps({"pairs": pairs}, ensure_ascii=False)


def server_config(
    tmp_path: Path, base_url: str, texts: list[str], *, name: str = "run", **teacher: Any
) -> Path:
    """A run dir with chunks of `texts` and a doctune.yaml whose teacher is the server at `base_url`."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    rows = [
        {"chunk_id": f"notes.md#{i:04d}", "doc": "notes.md", "doc_sha256": "0" * 64, "pages": None}
        | {"char_start": 0, "char_end": len(t), "n_tokens": len(t) // 4 + 1, "text": t}
        for i, t in enumerate(texts)
    ]
    (run_dir / "chunks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model = {"backend": "openai", "base_url": base_url, "model": "fake-model", "api_key_env": None, **teacher}
    cfg = {
        "run_dir": str(run_dir),
        "models": {"teacher": model, "judge": model, "student": {"backend": "hf", "model": "unused"}},
        "generate": {"total_questions": 2 * len(texts), "max_failure_rate": 1.0, "max_tokens": 512},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def chunk_ids(run_dir: Path) -> set[str]:
    return {row["chunk_id"] for row in read_jsonl(run_dir / "chunks.jsonl")}


def assert_schema_valid(run_dir: Path, requests: list[dict[str, Any]]) -> None:
    """The pairs of each chunk, put back in the reply shape, satisfy the schema that chunk was asked with."""
    schemas = {r["messages"][-1]["content"]: r["response_format"]["json_schema"]["schema"] for r in requests}
    by_context: dict[str, list[dict[str, str]]] = {}
    for row in read_jsonl(run_dir / "qa_raw.jsonl"):
        by_context.setdefault(row["context"], []).append(
            {"question": row["question"], "answer": row["answer"]}
        )
    assert by_context
    for context, pairs in by_context.items():
        assert validate({"pairs": pairs}, schemas[context]) == []


def test_server_with_20_percent_faults_every_chunk_ends_with_pairs_or_a_failure(tmp_path):
    texts = [
        f"Der Absatz über Größe und Gewicht, Nummer {i}" + (" [prose]" if i % 9 == 4 else "")
        for i in range(40)
    ]
    faults = FaultPlan(
        rate_429=0.04,
        rate_500=0.04,
        rate_drop=0.04,
        rate_truncated=0.04,
        rate_invalid_json=0.02,
        rate_empty_choices=0.02,
    )
    with FakeOpenAIServer(teacher_reply, faults=faults, seed=3) as srv:
        path = server_config(tmp_path, srv.base_url, texts, max_concurrency=16, max_retries=1, timeout=5)
        run_dir = tmp_path / "run"
        summary = run(load_config(path))

    pairs = read_jsonl(run_dir / "qa_raw.jsonl")
    failures = read_jsonl(run_dir / "generate_failures.jsonl")
    assert {p["chunk_id"] for p in pairs} | {f["chunk_id"] for f in failures} == chunk_ids(run_dir)
    assert not {p["chunk_id"] for p in pairs} & {f["chunk_id"] for f in failures}
    assert sum(n for kind, n in srv.outcomes.items() if kind != "ok") >= 4  # faults did happen
    # a chunk failed at the request level exactly when the server never answered its prompt
    by_text = {r["messages"][-1]["content"]: prompt_key(r["messages"]) for r in srv.received}
    text_of = {row["chunk_id"]: row["text"] for row in read_jsonl(run_dir / "chunks.jsonl")}
    never_answered = {cid for cid, t in text_of.items() if srv.answered_per_prompt[by_text[t]] == 0}
    assert {f["chunk_id"] for f in failures if f["kind"] == "request"} == never_answered
    # prose replies are kept raw; every other answered chunk has pairs, non-ASCII intact
    parse_failures = [f for f in failures if f["kind"] == "parse"]
    assert {f["chunk_id"] for f in parse_failures} == {
        cid for cid, t in text_of.items() if "[prose]" in t and cid not in never_answered
    }
    assert all(f["raw"].startswith("I am sorry") for f in parse_failures)
    assert all("Größe" in p["question"] and p["teacher"] == "fake-model" for p in pairs)
    assert_schema_valid(run_dir, srv.received)
    rows = dict(summary.rows)
    assert rows["failed: no answer"] == len(never_answered)
    assert rows["failed: reply not JSON"] == len(parse_failures)
    assert rows["failed: no answer"] + rows["failed: reply not JSON"] == len(failures)


def _run_cli(args: list[str], **kw: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "doctune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_a_killed_run_started_again_sends_no_answered_request_twice(tmp_path):
    texts = [f"Paragraph {i}: the pump runs at {i * 10} rpm when the valve is open." for i in range(24)]
    reference = tmp_path / "reference"
    reference.mkdir()
    with FakeOpenAIServer(teacher_reply) as srv:
        path = server_config(reference, srv.base_url, texts, max_concurrency=4)
        run(load_config(path, {"generate.total_questions": 30}))

    answered_before_kill: set[str] = set()
    blocked, release = threading.Event(), threading.Event()
    replies = itertools.count()

    def reply_then_hang(request: dict[str, Any]) -> str:
        # after 8 answers, note which prompts were answered and freeze the server until the client is killed
        if next(replies) >= 8 and not release.is_set():
            answered_before_kill.update(k for k, n in srv.answered_per_prompt.items() if n)
            blocked.set()
            release.wait(60)
        return teacher_reply(request)

    with FakeOpenAIServer(reply_then_hang, latency=0.05) as srv:
        path = server_config(tmp_path, srv.base_url, texts, max_concurrency=4)
        proc = _run_cli(["generate", "-c", str(path), "-t", "30"])  # the file says 48
        try:
            assert blocked.wait(60), proc.stderr.read() if proc.poll() is not None else "server never blocked"
            time.sleep(2.0)  # the client stores the answers it got (the cache commits within milliseconds)
        finally:
            proc.kill()
            proc.wait(10)
            release.set()
        assert proc.returncode == -signal.SIGKILL
        assert not (tmp_path / "run" / "qa_raw.jsonl").exists()
        assert len(answered_before_kill) >= 4

        summary = run(load_config(path, {"generate.total_questions": 30}))

    assert all(srv.requests_per_prompt[key] == 1 for key in answered_before_kill)
    assert dict(summary.rows)["  answered from cache"] >= len(answered_before_kill)
    assert (tmp_path / "run" / "qa_raw.jsonl").read_text() == (reference / "run" / "qa_raw.jsonl").read_text()


def test_an_unreachable_server_fails_at_once_naming_it_and_writes_nothing(tmp_path):
    base_url = f"http://127.0.0.1:{unused_port()}/v1"
    path = server_config(tmp_path, base_url, ["some text", "more text"])
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    started = time.monotonic()
    proc = _run_cli(["generate", "-c", str(path)])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == LLMError.exit_code
    assert time.monotonic() - started < 20  # interpreter start-up included, on a loaded 2-core machine
    assert base_url in err and "cannot connect" in err
    assert err.count("error:") == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before == ["chunks.jsonl"]


# ------------------------------------------------------------------------------------------ the in-process hf backend


@pytest.mark.slow
def test_hf_backend_with_the_tiny_model_gives_schema_valid_pairs(tmp_path, tiny_model_dir):
    cfg, run_dir = make_run(tmp_path, ["The valve opens at 3 bar.", "Pumps need oil every 200 hours."])
    cfg.models["teacher"] = ModelConfig(backend="hf", model=str(tiny_model_dir), max_concurrency=4)
    cfg.generate.total_questions = 2
    cfg.generate.max_tokens = 128
    cfg.generate.max_failure_rate = 1.0
    summary = run(cfg)

    pairs = read_jsonl(run_dir / "qa_raw.jsonl")
    failures = read_jsonl(run_dir / "generate_failures.jsonl")
    assert {p["chunk_id"] for p in pairs} | {f["chunk_id"] for f in failures} == chunk_ids(run_dir)
    # strings are bounded at the tokenizer's measured characters per token of the documents (about 2); this
    # random model writes rare multi-byte characters at about 1, so its one roomy pair may run past max_tokens
    from doctune.llm.hf_backend import HFBackend

    texts = [c["text"] for c in read_jsonl(run_dir / "chunks.jsonl")]
    costs = asyncio.run(generate.measure_reply_costs(HFBackend(cfg.models["teacher"]), texts))
    notes = json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]["notes"]
    assert notes["teacher_chars_per_token"] == round(costs.chars_per_token, 3) and costs.chars_per_token > 1
    assert all(f["kind"] == "empty" and "max_tokens" in f["reason"] for f in failures), failures
    schema = reply_schema(1, max_chars=text_bound(128, 1, costs))
    for p in pairs:
        assert validate({"pairs": [{"question": p["question"], "answer": p["answer"]}]}, schema) == [], p
    assert all(p["teacher"] == str(tiny_model_dir) for p in pairs)
    assert dict(summary.rows)["pairs"] == len(pairs)
