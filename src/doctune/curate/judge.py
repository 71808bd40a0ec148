"""The judge: one request per QA pair; it sees the source context, the question and the answer.

Modes (`curate.mode`):
- `score`: `{"reason", "score"}` on the 5-point scale of "Self-Alignment with Instruction Backtranslation"
  (Li et al., 2023) adapted to grounding: 5 = fully supported by the context and useful to a user of the
  domain. Pairs scored at least `curate.threshold` pass.
- `yesno`: the seed recipe's prompt and `{"Reason", "Result": "YES"|"NO"}`; YES (any case) passes.

A reply that cannot be parsed (even after repair), whose score is not an integer 1-5 or whose Result is not
YES/NO, or a request that still fails after the backend's retries, gives a Verdict with `error` and the raw
reply: the stage puts that pair in qa_rejected.jsonl with rule `judge_error`. A fatal LLMError (server gone,
bad key) is not caught here: it ends the stage, and answered requests stay in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from doctune.llm import gather
from doctune.llm import verdict as replies
from doctune.llm.base import LLM, Completion, RequestFailed, Usage
from doctune.llm.structured import ReplyParseError
from doctune.prompts import fill
from doctune.reporting import Progress

SCORE_KEY = "score_prompt_template"
YESNO_KEY = "curation_prompt_template"
USER_KEY = "curation_user_template"
MAX_SCORE = 5


def reply_schema(mode: str, *, bounded_strings: bool = False) -> dict[str, Any]:
    """JSON schema of a judge's reply in `mode` (score or yesno); the reason comes first, so the model
    explains before it decides."""
    if mode == "score":
        return replies.score_schema(MAX_SCORE, bounded_strings=bounded_strings)
    if mode == "yesno":
        return replies.yesno_schema(bounded_strings=bounded_strings)
    raise ValueError(f"no judge schema for mode {mode!r}")


def _reason(raw: Any) -> str:
    return raw.strip() if isinstance(raw, str) else ""


def parse_score(text: str) -> tuple[int, str]:
    """(score, reason) of a score-mode reply. Raises ReplyParseError unless the score is an integer 1-5
    (a number, or a string such as "4" or "4/5": llm/verdict.py).

    >>> parse_score('{"reason": "Fully supported.", "score": 5}')
    (5, 'Fully supported.')
    >>> parse_score('```json\\n{"Reason": "Half of it is made up", "Score": "2"}\\n```')
    (2, 'Half of it is made up')
    """
    score, reason = replies.parse_score(text, high=MAX_SCORE)
    return score, _reason(reason)


def parse_yesno(text: str) -> tuple[bool, str]:
    """(passed, reason) of a yesno-mode reply: Result YES or NO, in any case. Raises ReplyParseError otherwise.

    >>> parse_yesno('{"Reason": "Relevant.", "Result": "yes"}')
    (True, 'Relevant.')
    """
    passed, reason = replies.parse_yesno(text)
    return passed, _reason(reason)


@dataclass(frozen=True)
class Verdict:
    """The judge's word on one pair. `passed` is None when the judge failed (`error`, with the raw reply)."""

    passed: bool | None
    score: int | None = None
    reason: str | None = None
    error: str | None = None
    raw: str | None = None
    completion: Completion | None = None


@dataclass
class Judge:
    """Builds the request for a pair and turns the reply into a Verdict.

    `prompts` holds the templates of prompts/curate.yaml (or the user's); `language` fills `{language}`.
    """

    llm: LLM
    mode: str
    threshold: int
    prompts: dict[str, str]
    language: str = "English"
    max_tokens: int = replies.MAX_TOKENS
    bounded_strings: bool = False
    schema: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        if self.mode not in ("score", "yesno"):
            raise ValueError(f"a Judge needs mode score or yesno, got {self.mode!r}")
        self.schema = reply_schema(self.mode, bounded_strings=self.bounded_strings)

    def messages(self, pair: dict[str, Any]) -> list[dict[str, str]]:
        """The seed's request shape: instructions as the system message; question, answer and context as
        the user's."""
        system = fill(self.prompts[SCORE_KEY if self.mode == "score" else YESNO_KEY], language=self.language)
        user = fill(
            self.prompts[USER_KEY],
            question=str(pair.get("question") or "").strip(),
            answer=str(pair.get("answer") or "").strip(),
            context=str(pair.get("context") or "").strip(),
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    async def judge(self, pair: dict[str, Any]) -> Verdict:
        try:
            reply = await self.llm.chat(
                self.messages(pair), max_tokens=self.max_tokens, temperature=0.0, json_schema=self.schema
            )
        except RequestFailed as exc:
            return Verdict(None, error=f"request failed: {exc.reason}", raw=exc.raw)
        try:
            if self.mode == "score":
                score, reason = parse_score(reply.text)
                return Verdict(score >= self.threshold, score, reason, completion=reply)
            passed, reason = parse_yesno(reply.text)
            return Verdict(passed, None, reason, completion=reply)
        except ReplyParseError as exc:
            cut = " (reply cut at max_tokens)" if reply.finish_reason == "length" else ""
            return Verdict(None, error=f"unusable reply: {exc}{cut}", raw=reply.text, completion=reply)


@dataclass
class JudgeTally(Usage):
    """Running totals of the judge's requests (progress bar, manifest, report)."""

    requests: int = 0
    passed: int = 0
    errors: int = 0

    def add(self, result: Verdict) -> None:
        self.requests += 1
        self.passed += result.passed is True
        self.errors += result.passed is None
        self.add_reply(result.completion)


async def judge_all(
    judge: Judge, pairs: Sequence[dict[str, Any]], *, progress: Progress, tally: JudgeTally
) -> list[Verdict]:
    """Every pair's verdict, in order. All requests are in flight at once (the LLM bounds concurrency); a
    fatal LLMError cancels the rest (what was answered is already in the cache)."""

    def count(result: Verdict) -> None:
        tally.add(result)
        progress.advance(1, passed=tally.passed, errors=tally.errors, tok_in=tally.prompt_tokens)

    return await gather.ordered(judge.judge, pairs, on_result=count)
