"""Train/val split by source chunk, so that no chunk has pairs on both sides (val measures the unseen).

Chunks are ranked by sha256(f"{seed}:{chunk}") and the first round(n * val_fraction) go to val (at least one
when there are two chunks or more and val_fraction > 0; never all of them). The ranking depends only on the
seed and the chunk's key, so a chunk keeps its side when other chunks come or go.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from doctune.runs import sha256_text


def chunk_key(pair: dict[str, Any]) -> str:
    """The source chunk of a pair: `chunk_id`, else its document, else its own id.

    >>> chunk_key({"chunk_id": "a.pdf#3", "doc": "a.pdf"}), chunk_key({"doc": "a.pdf"}), chunk_key({"id": 7})
    ('a.pdf#3', 'doc:a.pdf', 'id:7')
    """
    if pair.get("chunk_id") not in (None, ""):
        return str(pair["chunk_id"])
    if pair.get("doc") not in (None, ""):
        return f"doc:{pair['doc']}"
    return f"id:{pair.get('id')}"


def val_chunks(chunks: Iterable[str], val_fraction: float, seed: int) -> set[str]:
    """The chunks whose pairs go to val.

    >>> val_chunks(["c1", "c2", "c3", "c4"], 0.5, seed=0) == val_chunks(["c4", "c3", "c2", "c1"], 0.5, seed=0)
    True
    >>> len(val_chunks(["c1", "c2"], 0.01, seed=0)), len(val_chunks(["c1"], 0.5, seed=0))
    (1, 0)
    """
    unique = sorted(set(chunks))
    if val_fraction <= 0 or len(unique) < 2:
        return set()
    n_val = min(max(round(len(unique) * val_fraction), 1), len(unique) - 1)
    ranked = sorted(unique, key=lambda c: (sha256_text(f"{seed}:{c}"), c))
    return set(ranked[:n_val])


def chat_row(pair: dict[str, Any], system_prompt: str) -> dict[str, Any]:
    """One training conversation: the system prompt (left out when empty), the question as the user, the
    answer as the assistant.

    >>> chat_row({"id": "q1", "question": "What is X?", "answer": "A thing."}, "Be brief.")["messages"][1]
    {'role': 'user', 'content': 'What is X?'}
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    messages += [
        {"role": "user", "content": pair["question"].strip()},
        {"role": "assistant", "content": pair["answer"].strip()},
    ]
    return {"id": pair.get("id"), "chunk_id": chunk_key(pair), "messages": messages}
