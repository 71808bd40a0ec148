"""Reference-based metrics of one answer: ROUGE (rouge-score), SQuAD token F1 / exact match, and the cosine
similarity of MiniLM sentence embeddings.

```python
lexical = LexicalScorer()
lexical.score(prediction, reference)   # {"rouge1": .., "rougeLsum": .., "token_f1": .., "exact_match": ..}
embedder = Embedder()                  # loads the packaged all-MiniLM-L6-v2 on first use
embedder.similarity(["answer", ...], ["reference", ...])   # cosine per pair
```
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
LEXICAL_METRICS = (*ROUGE_TYPES, "token_f1", "exact_match")
SIMILARITY = "similarity"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def sentences_on_lines(text: str) -> str:
    """One sentence per line, as rouge-score's rougeLsum expects (its own splitter needs NLTK punkt).

    >>> sentences_on_lines("It runs. Does it stop? Yes!\\nDone")
    'It runs.\\nDoes it stop?\\nYes!\\nDone'
    """
    lines = []
    for line in text.splitlines():
        lines += [s.strip() for s in _SENTENCE_END.split(line) if s.strip()]
    return "\n".join(lines)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces.

    >>> normalize_answer("The  Llama's weights!")
    'llamas weights'
    """
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised answers are equal, else 0.0.

    >>> exact_match("The answer.", "answer")
    1.0
    """
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of the normalised answers (both empty: 1, one empty: 0).

    >>> round(token_f1("the cat sat on the mat", "a cat on a mat"), 3)
    0.857
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class _MemoStemmer:
    """NLTK's Porter stemmer with a memo: the same output as rouge-score's, without re-stemming every word."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self.stem = lru_cache(maxsize=200_000)(porter.PorterStemmer().stem)


def _rouge_tokenizer() -> Any:
    from rouge_score import tokenize, tokenizers

    class MemoTokenizer(tokenizers.Tokenizer):
        """rouge-score's DefaultTokenizer(use_stemmer=True), memoising the stemmer."""

        def __init__(self) -> None:
            self._stemmer = _MemoStemmer()

        def tokenize(self, text: str) -> list[str]:
            return tokenize.tokenize(text, self._stemmer)

    return MemoTokenizer()


class LexicalScorer:
    """ROUGE-1/2/L/Lsum F1 (rouge-score, Porter stemmer) and SQuAD token F1 / exact match. One instance holds
    one RougeScorer; build it once and reuse it."""

    def __init__(self) -> None:
        from rouge_score import rouge_scorer

        self._rouge = rouge_scorer.RougeScorer(
            list(ROUGE_TYPES), use_stemmer=True, tokenizer=_rouge_tokenizer()
        )

    def score(self, prediction: str, reference: str) -> dict[str, float]:
        rouge = self._rouge.score(sentences_on_lines(reference), sentences_on_lines(prediction))
        scores = {name: rouge[name].fmeasure for name in ROUGE_TYPES}
        scores["token_f1"] = token_f1(prediction, reference)
        scores["exact_match"] = exact_match(prediction, reference)
        return scores


class Embedder:
    """Sentence embeddings from the packaged all-MiniLM-L6-v2 (no download), loaded on first use. With a `store`
    (evaluate/embedding_store.py), texts embedded before are read from it and new ones are added to it."""

    def __init__(self, device: str = "auto", batch_size: int = 32, store: Any = None):
        self.device = device
        self.batch_size = batch_size
        self.store = store

    def _encode(self, texts: list[str]) -> Any:
        from doctune.models import minilm_vectors

        device = self.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return minilm_vectors(texts, device, self.batch_size)

    def embed(self, texts: Sequence[str]) -> Any:
        """Unit-length embeddings, one row per text (numpy float32)."""
        texts = list(texts)
        if self.store is None or not texts:
            return self._encode(texts)
        import numpy as np

        known = self.store.get(texts)
        new = [t for t in dict.fromkeys(texts) if t not in known]
        if new:
            vectors = self._encode(new)
            self.store.put(new, vectors)
            known.update(zip(new, vectors, strict=True))
        return np.stack([known[t] for t in texts]).astype(np.float32, copy=False)

    def similarity(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        """Cosine similarity of each prediction to its reference, in [-1, 1]."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if not predictions:
            return []
        pred = self.embed(predictions)
        ref = self.embed(references)
        return [float(max(-1.0, min(1.0, v))) for v in (pred * ref).sum(axis=1)]
