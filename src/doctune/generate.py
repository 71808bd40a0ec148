"""QA generation: the teacher writes question/answer pairs from each chunk.

chunks.jsonl → qa_raw.jsonl (one row per pair, with provenance) and generate_failures.jsonl (one row per chunk
that gave no pairs, with the raw reply and why). One request per chunk, all in flight through the LLM, which
bounds concurrency itself; every answer lands in the run's cache, so a killed run started again sends only the
requests that never got an answer. Outputs are written at the end, atomically, in chunk order.

```python
from doctune.config import load_config
from doctune.generate import run
summary = run(load_config("doctune.yaml"))
```
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doctune.config import Config
from doctune.errors import FailureRateError, InputError
from doctune.llm import gather
from doctune.llm.base import LLM, Completion, RequestFailed, Usage
from doctune.llm.cache import CachedLLM
from doctune.llm.structured import ReplyParseError, parse_json_reply, text_pattern, validate
from doctune.prompts import fill, load_prompts
from doctune.reporting import NullProgress, Progress, Summary
from doctune.runs import RunDir, StageRecord, atomic_write_jsonl, read_jsonl, sha256_text

log = logging.getLogger(__name__)

STAGE = "generate"
PROMPT_KEY = "question_prompt_template"
# Strings under in-process decoding (see text_bound): at most this many characters, at least this few.
MAX_TEXT_CHARS = 400
MIN_TEXT_CHARS = 16


# ------------------------------------------------------------------------------------------ allocation


def allocate_questions(weights: Sequence[int], total: int) -> list[int]:
    """Spread `total` questions over chunks in proportion to `weights` (their tokens), largest remainder.

    The counts sum to exactly `total`. When `total >= len(weights)` every chunk gets at least one: chunks whose
    share is below one get exactly one, and the rest is shared among the others in proportion.

    >>> allocate_questions([100, 300, 600], 10)
    [1, 3, 6]
    >>> allocate_questions([1, 1000], 4)
    [1, 3]
    """
    if total < 0 or any(w < 0 for w in weights):
        raise ValueError("total and weights must not be negative")
    n = len(weights)
    if n == 0:
        return []
    weights = list(weights) if sum(weights) > 0 else [1] * n
    counts = [0] * n
    free = list(range(n))
    budget = total
    if total >= n:
        while True:
            pool = sum(weights[i] for i in free)
            small = [i for i in free if budget * weights[i] < pool]
            if not small:
                break
            for i in small:
                counts[i] = 1
            budget -= len(small)
            free = [i for i in free if counts[i] == 0]
    pool = sum(weights[i] for i in free)
    if not free or pool == 0:
        return counts
    for i in free:
        counts[i] = budget * weights[i] // pool
    left = budget - sum(counts[i] for i in free)
    by_remainder = sorted(free, key=lambda i: (-(budget * weights[i] % pool), i))
    for i in by_remainder[:left]:
        counts[i] += 1
    return counts


# ------------------------------------------------------------------------------------------ replies


@dataclass(frozen=True)
class ReplyCosts:
    """What a reply costs in the teacher's tokens: characters per token of the documents' text, and the
    tokens of the JSON around the strings. The defaults assume the worst: one token per character."""

    chars_per_token: float = 1.0
    envelope_tokens: int = 16  # {"pairs":[]}
    pair_tokens: int = 32  # {"question":"","answer":""},


ENVELOPE = '{"pairs":[]}'
PAIR_SKELETON = '{"question":"","answer":""},'
SAMPLE_CHARS = 20_000  # of chunk text, to measure characters per token


def text_bound(max_tokens: int, num_questions: int, costs: ReplyCosts = ReplyCosts()) -> int:
    """Longest question or answer (characters) for in-process decoding, where a weak model may never close a
    string on its own: small enough that `num_questions` pairs fit in `max_tokens` at the teacher's measured
    `costs` (see measure_reply_costs), at most MAX_TEXT_CHARS (the prompt asks for answers of <= 60 words).

    >>> text_bound(2048, 2), text_bound(2048, 10), text_bound(256, 1)  # one token per character
    (400, 85, 104)
    >>> text_bound(512, 11, ReplyCosts(chars_per_token=4.0, envelope_tokens=5, pair_tokens=9))
    72
    """
    per_pair = (max_tokens - costs.envelope_tokens) // max(1, num_questions)
    text_tokens = (per_pair - costs.pair_tokens) // 2
    return max(MIN_TEXT_CHARS, min(MAX_TEXT_CHARS, int(text_tokens * costs.chars_per_token)))


async def measure_reply_costs(llm: LLM, texts: Sequence[str]) -> ReplyCosts:
    """The teacher tokenizer's characters per token on (up to SAMPLE_CHARS of) `texts`, and its tokens for the
    reply's JSON skeleton. An LLM that cannot count tokens here (a server) gets the one-per-character worst case.
    """
    count = getattr(llm, "count_tokens", None)
    sample = "\n\n".join(texts)[:SAMPLE_CHARS]
    tokens = await count(sample) if count is not None and sample.strip() else None
    if not tokens:
        return ReplyCosts()
    return ReplyCosts(
        chars_per_token=len(sample) / tokens,
        envelope_tokens=await count(ENVELOPE),
        pair_tokens=await count(PAIR_SKELETON),
    )


def reply_schema(num_questions: int, *, max_chars: int | None = None) -> dict[str, Any]:
    """JSON schema of a teacher's reply: `{"pairs": [{"question", "answer"}, ...]}`, at most `num_questions`.

    `max_chars` (in-process decoding) bounds every string with structured.text_pattern and makes questions end
    with a question mark (a model that follows the prompt poorly still writes questions); servers get plain
    non-empty strings, so answers may quote.
    """
    text: dict[str, Any] = {"type": "string", "minLength": 1}
    question = text
    if max_chars is not None:
        text = {"type": "string", "pattern": text_pattern(max_chars)}
        question = {"type": "string", "pattern": text_pattern(max_chars, suffix=r"\?")}
    pair = {
        "type": "object",
        "properties": {"question": question, "answer": text},
        "required": ["question", "answer"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"pairs": {"type": "array", "items": pair, "maxItems": num_questions}},
        "required": ["pairs"],
        "additionalProperties": False,
    }


def _pair_items(value: Any, depth: int = 0) -> list[dict[str, Any]]:
    """Objects with a question or answer key, wherever the reply put them (a list, {"pairs": [...]}, ...)."""
    if depth > 4:
        return []
    if isinstance(value, dict):
        lowered = {k.strip().lower(): v for k, v in value.items() if isinstance(k, str)}
        if "question" in lowered or "answer" in lowered:
            return [lowered]
        value = list(value.values())
    if isinstance(value, list):
        return [item for v in value for item in _pair_items(v, depth + 1)]
    return []


def parse_pairs(text: str, limit: int, *, truncated: bool = False) -> list[tuple[str, str]]:
    """Question/answer pairs of a reply, repaired if it is not pure JSON (fences, preamble, trailing commas,
    the seed's capitalised keys, a bare list). At most `limit`; a reply cut at max_tokens (`truncated`) loses
    its last pair, which may be cut short. Raises ReplyParseError when nothing can be parsed.

    >>> parse_pairs('Sure!```json\\n[{"Question": "What is X?", "Answer": "A thing.",},]\\n```', limit=3)
    [('What is X?', 'A thing.')]
    """
    items = _pair_items(parse_json_reply(text))
    pairs = []
    for item in items:
        question, answer = item.get("question"), item.get("answer")
        if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip():
            pairs.append((question.strip(), answer.strip()))
    if truncated:
        pairs = pairs[:-1]
    return pairs[:limit]


# ------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class Request:
    """One chunk's request: the chunk, how many questions it asks for, the messages and the reply schema."""

    chunk: dict[str, Any]
    num_questions: int
    messages: list[dict[str, str]]
    schema: dict[str, Any]


@dataclass
class Outcome:
    """What one request gave: pair rows, or a failure row (with the raw reply when there was one)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failure: dict[str, Any] | None = None
    completion: Completion | None = None


def build_requests(
    chunks: list[dict[str, Any]],
    counts: list[int],
    template: str,
    *,
    language: str,
    bound_strings_to: int | None = None,
    costs: ReplyCosts = ReplyCosts(),
) -> list[Request]:
    """The seed's request shape: the filled template as the system message, the chunk's text as the user's.
    Chunks allotted no question get no request. `bound_strings_to` (max_tokens; in-process decoding) bounds
    the schema's strings so that a whole reply fits in it at the teacher's `costs` (text_bound)."""
    sizes = set(counts) - {0}
    systems = {n: fill(template, num_questions=n, language=language) for n in sizes}
    schemas = {
        n: reply_schema(n, max_chars=text_bound(bound_strings_to, n, costs) if bound_strings_to else None)
        for n in sizes
    }
    return [
        Request(
            chunk=chunk,
            num_questions=n,
            messages=[{"role": "system", "content": systems[n]}, {"role": "user", "content": chunk["text"]}],
            schema=schemas[n],
        )
        for chunk, n in zip(chunks, counts, strict=True)
        if n > 0
    ]


def _failure(
    req: Request, kind: str, reason: str, raw: str | None, status: int | None = None
) -> dict[str, Any]:
    return {
        "chunk_id": req.chunk["chunk_id"],
        "doc": req.chunk.get("doc"),
        "num_questions": req.num_questions,
        "kind": kind,
        "reason": reason,
        "status": status,
        "raw": raw,
    }


def _pair_rows(
    req: Request, pairs: list[tuple[str, str]], reply: Completion, provenance: dict[str, Any]
) -> list[dict[str, Any]]:
    chunk = req.chunk
    return [
        {
            "id": f"{chunk['chunk_id']}:q{i}",
            "question": question,
            "answer": answer,
            "context": chunk["text"],
            "chunk_id": chunk["chunk_id"],
            "doc": chunk.get("doc"),
            **provenance,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
        }
        for i, (question, answer) in enumerate(pairs)
    ]


def _fits(req: Request, pair: tuple[str, str]) -> bool:
    """The pair satisfies the request's schema (a reply repaired from broken JSON may not)."""
    item_schema = req.schema["properties"]["pairs"]["items"]
    return not validate({"question": pair[0], "answer": pair[1]}, item_schema)


async def ask(
    llm: LLM, req: Request, *, max_tokens: int, temperature: float, provenance: dict[str, Any]
) -> Outcome:
    """Send one request and turn its reply into pair rows, or into a failure row: `request` (no answer after
    the backend's retries), `parse` (no JSON even after repair; dropped from the cache so that the next run
    asks again) or `empty` (JSON, but no usable pair: kept, the teacher found nothing to ask)."""
    try:
        reply = await llm.chat(
            req.messages, max_tokens=max_tokens, temperature=temperature, json_schema=req.schema
        )
    except RequestFailed as exc:
        return Outcome(failure=_failure(req, "request", exc.reason, exc.raw, exc.status))
    truncated = reply.finish_reason == "length"
    try:
        pairs = [p for p in parse_pairs(reply.text, req.num_questions, truncated=truncated) if _fits(req, p)]
    except ReplyParseError as exc:
        if isinstance(llm, CachedLLM):  # not an answer worth keeping: the next run asks again
            llm.forget(req.messages, max_tokens=max_tokens, temperature=temperature, json_schema=req.schema)
        return Outcome(failure=_failure(req, "parse", str(exc), reply.text), completion=reply)
    if not pairs:
        reason = "reply cut at max_tokens before one whole pair" if truncated else "reply holds no valid pair"
        return Outcome(failure=_failure(req, "empty", reason, reply.text), completion=reply)
    return Outcome(rows=_pair_rows(req, pairs, reply, provenance), completion=reply)


@dataclass
class Tally(Usage):
    """Running totals, shown on the progress bar and kept in the manifest."""

    pairs: int = 0
    coalesced: int = 0  # of `cached`: answered by an identical request in flight, not from the cache file
    no_answer: int = 0
    unparseable: int = 0
    empty: int = 0

    def add(self, outcome: Outcome) -> None:
        self.pairs += len(outcome.rows)
        kind = outcome.failure["kind"] if outcome.failure else None
        self.no_answer += kind == "request"
        self.unparseable += kind == "parse"
        self.empty += kind == "empty"
        self.add_reply(outcome.completion)

    @property
    def failed(self) -> int:
        """Requests that count against generate.max_failure_rate."""
        return self.no_answer + self.unparseable

    def bar_fields(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "tok_in": self.prompt_tokens,
            "tok_out": self.completion_tokens,
            "failed": self.failed,
        }


async def ask_all(
    llm: LLM,
    requests: list[Request],
    *,
    max_tokens: int,
    temperature: float,
    provenance: dict[str, Any],
    progress: Progress,
    tally: Tally,
) -> list[Outcome]:
    """Every request in flight at once (the LLM bounds concurrency); outcomes in request order. A fatal
    LLMError cancels the rest: what was answered is already in the cache."""

    async def one(req: Request) -> Outcome:
        return await ask(llm, req, max_tokens=max_tokens, temperature=temperature, provenance=provenance)

    def count(outcome: Outcome) -> None:
        tally.add(outcome)
        progress.advance(1, **tally.bar_fields())

    return await gather.ordered(one, requests, on_result=count)


# ------------------------------------------------------------------------------------------ the stage


def load_chunks(path: Path) -> list[dict[str, Any]]:
    """chunks.jsonl rows, checked for what generation needs (chunk_id, text, n_tokens), before any request."""
    rows = read_jsonl(path)
    if not rows:
        raise InputError(f"{path}: no chunks (put documents in data.dir and run `doctune ingest`)")
    seen: set[str] = set()
    for i, row in enumerate(rows, 1):
        ok = isinstance(row.get("chunk_id"), str) and isinstance(row.get("text"), str)
        n_tokens = row.get("n_tokens")
        if not ok or not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 0:
            raise InputError(
                f"{path}: row {i} lacks chunk_id, text or n_tokens (re-run `doctune ingest` to rewrite it)"
            )
        if row["chunk_id"] in seen:
            raise InputError(
                f"{path}: row {i} repeats chunk_id {row['chunk_id']!r} (re-run `doctune ingest`)"
            )
        seen.add(row["chunk_id"])
    return rows


async def _preflight_and_ask(
    llm: LLM,
    plan: Callable[[ReplyCosts], list[Request]],
    texts: list[str],
    progress: Progress,
    *,
    measure: bool,
    **kw: Any,
) -> tuple[list[Request], ReplyCosts | None, list[Outcome]]:
    """Preflight, then (in-process teachers) measure the tokenizer's costs, plan the requests and ask them."""
    try:
        await llm.preflight()
        costs = await measure_reply_costs(llm, texts) if measure else None
        requests = plan(costs or ReplyCosts())
        log.info(
            "%d requests, %d questions asked of %s",
            len(requests),
            sum(r.num_questions for r in requests),
            llm.name,
        )
        if costs is not None:
            log.info("%.2f characters per token: strings bounded to fit max_tokens", costs.chars_per_token)
        progress.start("generate", total=len(requests))
        return requests, costs, await ask_all(llm, requests, progress=progress, **kw)
    finally:
        progress.finish()
        await llm.aclose()


def run(
    cfg: Config, *, progress: Progress = NullProgress(), llm: LLM | None = None, use_cache: bool = True
) -> Summary:
    """Ask the teacher (`generate.model`) for question/answer pairs from every chunk of chunks.jsonl.

    Writes qa_raw.jsonl and generate_failures.jsonl, records the stage in manifest.json, and raises
    FailureRateError (after writing) when more requests failed than `generate.max_failure_rate` allows.
    `llm` replaces the configured teacher (tests, library use); `use_cache=False` bypasses cache.sqlite.
    """
    gen = cfg.generate
    run_dir = cfg.run_folder
    chunks = load_chunks(run_dir.chunks)
    template = load_prompts(STAGE, cfg.path(gen.prompts) if gen.prompts else None)[PROMPT_KEY]
    teacher = cfg.model(gen.model)
    counts = allocate_questions([c["n_tokens"] for c in chunks], gen.total_questions)
    bounded = teacher.backend == "hf"  # in-process decoding: strings bounded from the tokenizer's costs

    def plan(costs: ReplyCosts) -> list[Request]:
        bound = gen.max_tokens if bounded else None
        return build_requests(
            chunks, counts, template, language=gen.language, bound_strings_to=bound, costs=costs
        )

    provenance = {"teacher": teacher.model, "prompt_sha256": sha256_text(template)}
    record = StageRecord(STAGE, config={"generate": gen.model_dump(), "teacher": teacher.model_dump()})
    record.add_input(run_dir.chunks, run_dir.chunks.name)
    if llm is None:
        from doctune.llm.factory import build_llm

        llm = build_llm(cfg, gen.model, use_cache=use_cache, cache_path=run_dir.cache)
    log.info("%d chunks", len(chunks))

    tally = Tally()
    t0 = time.perf_counter()
    requests, costs, outcomes = asyncio.run(
        _preflight_and_ask(
            llm,
            plan,
            [c["text"] for c in chunks],
            progress,
            measure=bounded,
            max_tokens=gen.max_tokens,
            temperature=gen.temperature,
            provenance=provenance,
            tally=tally,
        )
    )
    seconds = time.perf_counter() - t0
    # answers shared with an identical request in flight (identical chunks): cached replies, but not from disk
    tally.coalesced = llm.cache.coalesced if isinstance(llm, CachedLLM) and llm.cache is not None else 0

    rows = [row for o in outcomes for row in o.rows]
    failures = [o.failure for o in outcomes if o.failure is not None]
    atomic_write_jsonl(run_dir.qa_raw, rows)
    atomic_write_jsonl(run_dir.generate_failures, failures)
    record.counts = {
        "chunks": len(chunks),
        "questions_asked": sum(counts),
        "requests": len(requests),
        "requests_cached": tally.cached - tally.coalesced,
        "requests_coalesced": tally.coalesced,
        "pairs": len(rows),
        "failures": len(failures),
        "failed": tally.failed,
        "failed_no_answer": tally.no_answer,
        "failed_unparseable": tally.unparseable,
        "empty": tally.empty,
    }
    record.tokens = tally.tokens()
    record.notes = {**provenance, "requests_per_s": round(len(requests) / seconds, 2) if seconds else None}
    if costs is not None:
        record.notes["teacher_chars_per_token"] = round(costs.chars_per_token, 3)
    run_dir.record(record)

    summary = _summary(run_dir, chunks, requests, tally, seconds)
    rate = tally.failed / len(requests) if requests else 0.0
    if rate > gen.max_failure_rate:
        raise FailureRateError(
            f"{tally.failed} of {len(requests)} requests failed ({rate:.0%} > generate.max_failure_rate "
            f"{gen.max_failure_rate:.0%}): see {run_dir.generate_failures}; fix the cause and run again "
            "(answered requests come from the cache)"
        )
    return summary


def _summary(run_dir: RunDir, chunks: list, requests: list[Request], tally: Tally, seconds: float) -> Summary:
    summary = Summary("generate")
    summary.add("chunks", len(chunks))
    summary.add("requests", len(requests))
    summary.add("  answered from cache", tally.cached - tally.coalesced)
    summary.add("  shared with an identical request", tally.coalesced)
    summary.add("pairs", tally.pairs)
    summary.add("failed: no answer", tally.no_answer)
    summary.add("failed: reply not JSON", tally.unparseable)
    summary.add("replies without pairs", tally.empty)
    summary.add("prompt tokens", tally.prompt_tokens)
    summary.add("completion tokens", tally.completion_tokens)
    summary.add("requests/s", f"{len(requests) / seconds:.1f}" if seconds else "-")
    summary.add("wall time", f"{seconds:.1f} s")
    summary.outputs = [str(run_dir.qa_raw), str(run_dir.generate_failures)]
    if tally.failed or tally.empty:
        summary.warnings.append(
            f"{tally.failed + tally.empty} chunk(s) gave no pairs: see {run_dir.generate_failures} (raw replies kept)"
        )
    if len(requests) < len(chunks):
        summary.warnings.append(
            f"{len(chunks) - len(requests)} chunk(s) got no question: generate.total_questions "
            f"is below the number of chunks ({len(chunks)})"
        )
    return summary
