"""The LLM judge of eval: a reference-guided 1-10 score or the seed's YES/NO per answer, and a pairwise
verdict between two answers asked in both orders to cancel position bias.

A reply that fails or cannot be read becomes a `Verdict` with `error` set and no score: the stage counts and
lists it, and never scores it 0.

```python
judge = Judge(llm, load_prompts("eval"), mode="score")      # bounded_strings=True for in-process models
verdict = await judge.grade(question, reference, answer)          # Verdict(score=7.0, reason=..., error=None)
pair = await judge.compare(question, reference, answer_a, answer_b)   # PairVerdict(outcome="win", ...)
```
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from doctune.llm import verdict as replies
from doctune.llm.base import LLM, RequestFailed, Usage
from doctune.llm.structured import ReplyParseError
from doctune.prompts import fill

log = logging.getLogger(__name__)

JudgeMode = Literal["score", "yesno"]
MAX_SCORE = 10
WINNERS = ("A", "B", "tie")


def reply_schema(
    kind: Literal["score", "yesno", "pairwise"], *, bounded_strings: bool = False
) -> dict[str, Any]:
    """JSON schema of a judge reply (llm/verdict.py); the seed's keys (`Reason`, `Result`) in yesno mode.
    `bounded_strings` (in-process decoding) bounds the reason; servers get plain text, so a reason may quote."""
    if kind == "score":
        return replies.score_schema(MAX_SCORE, bounded_strings=bounded_strings)
    if kind == "yesno":
        return replies.yesno_schema(bounded_strings=bounded_strings)
    value = {"type": "string", "enum": list(WINNERS)}
    return replies.verdict_schema("reason", "winner", value, bounded_strings=bounded_strings)


PairOutcome = Literal["win", "tie", "loss"]


@dataclass(frozen=True)
class Verdict:
    """One judgement: `score` (1-10, or 1/0 for YES/NO) and `reason`, or `error` and no score."""

    score: float | None = None
    reason: str | None = None
    error: str | None = None
    raw: str | None = None


@dataclass(frozen=True)
class PairVerdict:
    """Answer A against answer B, judged as (A, B) and as (B, A). `outcome` is from A's side; None if either
    order failed. A win needs the same preference in both orders; anything else is a tie."""

    outcome: PairOutcome | None
    forward: str | None = None  # "A", "B" or "tie" when A was shown first
    backward: str | None = None  # the same, from A's side, when B was shown first
    reasons: list[str] = field(default_factory=list)
    error: str | None = None


def _reason(raw: Any) -> str | None:
    return str(raw) if raw is not None else None


def parse_score(text: str) -> Verdict:
    """A score-mode reply → Verdict; a reply without an integer score in 1..10 is an error.

    >>> parse_score('{"reason": "Right.", "score": 8}')
    Verdict(score=8.0, reason='Right.', error=None, raw=None)
    >>> parse_score('no idea').error is not None
    True
    """
    try:
        score, reason = replies.parse_score(text, high=MAX_SCORE)
    except replies.BadVerdict as exc:
        return Verdict(error=f"judge reply has no score 1-{MAX_SCORE} (got {exc.got!r})", raw=text)
    except ReplyParseError as exc:
        return Verdict(error=f"unparseable judge reply: {exc}", raw=text)
    return Verdict(score=float(score), reason=_reason(reason))


def parse_yesno(text: str) -> Verdict:
    """The seed's {"Reason", "Result": "YES"|"NO"} → Verdict with score 1 (YES) or 0 (NO).

    >>> parse_yesno('{"Reason": "Matches.", "Result": "YES."}').score
    1.0
    """
    try:
        passed, reason = replies.parse_yesno(text)
    except replies.BadVerdict as exc:
        return Verdict(error=f"judge reply has no Result YES or NO (got {exc.got!r})", raw=text)
    except ReplyParseError as exc:
        return Verdict(error=f"unparseable judge reply: {exc}", raw=text)
    return Verdict(score=1.0 if passed else 0.0, reason=_reason(reason))


def parse_winner(text: str) -> tuple[str | None, str | None, str | None]:
    """A pairwise reply → (winner "A"|"B"|"tie", reason, error).

    >>> parse_winner('{"reason": "B is wrong.", "winner": "a"}')
    ('A', 'B is wrong.', None)
    """
    try:
        winner, reason = replies.parse_choice(text, "winner", WINNERS)
    except replies.BadVerdict as exc:
        return None, None, f"judge reply has no winner A, B or tie (got {exc.got!r})"
    except ReplyParseError as exc:
        return None, None, f"unparseable judge reply: {exc}"
    return winner, _reason(reason), None


def combine_orders(forward: str, backward_from_a: str) -> PairOutcome:
    """A's outcome from both orders: the same preference twice wins, anything else is a tie.

    >>> combine_orders("A", "A"), combine_orders("A", "B"), combine_orders("B", "B"), combine_orders("A", "tie")
    ('win', 'tie', 'loss', 'tie')
    """
    if forward == backward_from_a == "A":
        return "win"
    if forward == backward_from_a == "B":
        return "loss"
    return "tie"


class Judge:
    """Asks one LLM for verdicts. Request failures and unreadable replies become errors, never exceptions."""

    def __init__(
        self, llm: LLM, prompts: dict[str, str], mode: JudgeMode = "score", *, bounded_strings: bool = False
    ):
        self.llm = llm
        self.prompts = prompts
        self.mode = mode
        self.schemas = {
            k: reply_schema(k, bounded_strings=bounded_strings) for k in ("score", "yesno", "pairwise")
        }
        self.usage = Usage()  # tokens of every reply (the stage records them)

    async def _ask(self, system: str, user: str, schema: dict[str, Any]) -> tuple[str | None, str | None]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        try:
            reply = await self.llm.chat(
                messages, max_tokens=replies.MAX_TOKENS, temperature=0.0, json_schema=schema
            )
        except RequestFailed as exc:
            return None, f"judge request failed: {exc.reason}"
        self.usage.add_reply(reply)
        return reply.text, None

    async def grade(self, question: str, reference: str, answer: str) -> Verdict:
        """The judgement of one answer against its reference."""
        user = fill(
            self.prompts["judge_input_template"], question=question, reference=reference, answer=answer
        )
        if self.mode == "yesno":
            text, error = await self._ask(self.prompts["judge_prompt_template"], user, self.schemas["yesno"])
            verdict = parse_yesno(text) if text is not None else Verdict(error=error)
        else:
            text, error = await self._ask(
                self.prompts["judge_score_prompt_template"], user, self.schemas["score"]
            )
            verdict = parse_score(text) if text is not None else Verdict(error=error)
        if verdict.error:
            log.debug("judge: %s", verdict.error)
        return verdict

    async def _winner(self, question: str, reference: str, first: str, second: str) -> tuple[Any, Any, Any]:
        user = fill(
            self.prompts["judge_pairwise_input_template"],
            question=question,
            reference=reference,
            answer_a=first,
            answer_b=second,
        )
        text, error = await self._ask(
            self.prompts["judge_pairwise_prompt_template"], user, self.schemas["pairwise"]
        )
        if text is None:
            return None, None, error
        return parse_winner(text)

    async def compare(self, question: str, reference: str, answer_a: str, answer_b: str) -> PairVerdict:
        """A against B, asked as (A, B) and as (B, A); the outcome is from A's side."""
        (fwd, fwd_reason, fwd_err), (bwd, bwd_reason, bwd_err) = await asyncio.gather(
            self._winner(question, reference, answer_a, answer_b),
            self._winner(question, reference, answer_b, answer_a),
        )
        backward = {"A": "B", "B": "A", "tie": "tie"}.get(bwd) if bwd is not None else None
        reasons = [r for r in (fwd_reason, bwd_reason) if r]
        error = fwd_err or bwd_err
        if error or fwd is None or backward is None:
            return PairVerdict(outcome=None, forward=fwd, backward=backward, reasons=reasons, error=error)
        return PairVerdict(combine_orders(fwd, backward), forward=fwd, backward=backward, reasons=reasons)
