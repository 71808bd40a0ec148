"""Token-counted chunks that end at natural boundaries, streamed from a document's text.

A document's text is cut into *pieces*: paragraphs (blank lines), split into sentences; a sentence longer than a
chunk is split at line breaks, then words, then characters. Pieces are packed greedily into chunks of at most
`max_tokens` tokens; a chunk ends at the strongest boundary (section > paragraph > sentence > line > word >
character) among the ends that fill it at least half, and the next chunk starts about `overlap` tokens earlier
(whole sentences, then whole words of the sentence before them). Every chunk is counted again with the real
counter and shrunk if it went over: piece counts are only an estimate of the joined text's.

Chunks are trimmed of surrounding whitespace, and `text == document_text[start:end]` (offsets in characters of
the decoded text). The text arrives in blocks; it is chunked a region at a time (a region ends at a paragraph
break), so memory stays bounded whatever the document's size.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from doctune.errors import ConfigError, InputError

if TYPE_CHECKING:
    from doctune.config import Config

log = logging.getLogger(__name__)

# Boundary strengths: where a piece ends. Higher is a better place to end a chunk.
CHAR, WORD, LINE, SENTENCE, PARAGRAPH, SECTION, DOCUMENT = range(7)

_PARAGRAPH = re.compile(r"\n[^\S\n]*\n\s*")
_HEADING = re.compile(r"#{1,6}\s")  # a Markdown heading opening the next paragraph: a section boundary
# A paragraph break (blank line) or a sentence end: Latin punctuation followed by whitespace, or CJK punctuation.
# Written to start with one character class, which lets `re` skip ahead fast (5x the plain alternation).
_SENTENCE_OR_PARAGRAPH = re.compile(
    r"[.!?…。！？\n](?:(?<=\n)(?P<para>[^\S\n]*\n\s*)|(?<=[.!?…])[.!?…]*[\"'”’»)\]]*\s+|(?<=[。！？])[。！？]*[」』”’）)]*\s*)"
)
_LINE = re.compile(r"\n\s*")
_WORD = re.compile(r"\s+")
# after whitespace, or after a CJK character (scripts written without spaces): where a chunk may start
_WORD_OR_WIDE = re.compile(
    r"\s+|[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff01-\uff60]"
)
_FINER = {SENTENCE: (LINE, _LINE), LINE: (WORD, _WORD)}

REGION_CHARS = 1 << 20
# A text longer than max_tokens * this many characters is taken to be over the limit without being counted:
# no tokenizer in use has tokens that long on average, and a wrong guess only splits a piece more finely
# (every chunk is still counted exactly). This keeps a huge sentence- or line-less text from being
# tokenized whole, which costs about 200 bytes of memory per token.
MAX_CHARS_PER_TOKEN = 64
# Texts are sent to a tokenizer in batches of about this many characters, so memory stays bounded.
COUNT_BATCH_CHARS = 1 << 16


# ------------------------------------------------------------------------------------------------ counters


class TokenCounter(Protocol):
    """Counts tokens. `name` goes into the manifest so a reader knows what `n_tokens` means."""

    name: str

    def count(self, text: str) -> int: ...

    def count_many(self, texts: Sequence[str]) -> list[int]: ...


class CharCounter:
    """The approximation used when no tokenizer is at hand: one token per 4 characters, rounded up.

    >>> CharCounter().count("twelve chars")
    3
    """

    name = "chars/4"

    def count(self, text: str) -> int:
        return (len(text) + 3) // 4

    def count_many(self, texts: Sequence[str]) -> list[int]:
        return [(len(t) + 3) // 4 for t in texts]


class TokenizerCounter:
    """Tokens of a transformers tokenizer, without special tokens (what the text itself costs)."""

    def __init__(self, tokenizer: Any, source: str):
        self.name = f"tokenizer:{source}"
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer: batch encoding, no max-length warnings
            backend.no_truncation()
            backend.no_padding()
        self._backend = backend

    def count(self, text: str) -> int:
        return self.count_many([text])[0]

    def count_many(self, texts: Sequence[str]) -> list[int]:
        counts: list[int] = []
        for batch in _batches(texts, COUNT_BATCH_CHARS):
            counts += self._count_batch(batch)
        return counts

    def count_spans(self, text: str, spans: Sequence[tuple[int, int]]) -> list[int]:
        """Tokens of each of `spans` (contiguous (start, end) of `text`, in order), from one tokenization per
        window of about COUNT_BATCH_CHARS characters: a token counts for the span it starts in. An estimate
        (a span counted alone may differ by a token), much faster than counting many small spans one by one."""
        if self._backend is None:
            return self.count_many([text[s:e] for s, e in spans])
        counts = [0] * len(spans)
        first = 0
        while first < len(spans):
            last = first
            while last + 1 < len(spans) and spans[last + 1][1] - spans[first][0] <= COUNT_BATCH_CHARS:
                last += 1
            base = spans[first][0]
            starts = [s - base for s, _ in spans[first : last + 1]]
            window = text[base : spans[last][1]]
            for token_start, _ in self._backend.encode(window, add_special_tokens=False).offsets:
                counts[first + max(bisect_right(starts, token_start) - 1, 0)] += 1
            first = last + 1
        return counts

    def _count_batch(self, texts: list[str]) -> list[int]:
        if self._backend is not None:
            return [len(e.ids) for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        ids = self._tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]


def _batches(texts: Sequence[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive groups of `texts` of at most `max_chars` characters in all (a longer text goes alone).

    >>> list(_batches(["ab", "cd", "efgh", "i"], 4))
    [['ab', 'cd'], ['efgh'], ['i']]
    """
    batch: list[str] = []
    size = 0
    for text in texts:
        if batch and size + len(text) > max_chars:
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += len(text)
    if batch:
        yield batch


def counter_for(cfg: Config) -> TokenCounter:
    """data.tokenizer if set; else the teacher's tokenizer when the teacher is an hf model; else chars/4."""
    if cfg.data.tokenizer:
        return load_tokenizer_counter(cfg.model_source(cfg.data.tokenizer), key="data.tokenizer")
    teacher = cfg.models.get(cfg.generate.model)
    if teacher is not None and teacher.backend == "hf":
        key = f"models.{cfg.generate.model}.model"
        return load_tokenizer_counter(cfg.model_source(teacher.model), key=key)
    return CharCounter()


def load_tokenizer_counter(source: str, key: str = "data.tokenizer") -> TokenizerCounter:
    """A TokenizerCounter for a local tokenizer folder, a .gguf file or a (cached) hub name (doctune.models);
    ConfigError naming `key` if it won't load."""
    from doctune.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(source)
    except InputError as exc:
        raise ConfigError([f"{key}: cannot load a tokenizer from {exc}"]) from None
    return TokenizerCounter(tokenizer, source)


# ------------------------------------------------------------------------------------------------ chunker


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk: `text == document_text[start:end]`, `n_tokens` counted by the real counter."""

    start: int
    end: int
    text: str
    n_tokens: int


class Chunker:
    """Streams chunks of at most `max_tokens` tokens out of a document's text blocks (see the module doc).

    >>> chunker = Chunker(CharCounter(), max_tokens=8, overlap=4)
    >>> [c.text for c in chunker.chunks(["One short sentence. Another one here.\\n\\nA new paragraph."])]
    ['One short sentence.', 'sentence. Another one here.', 'one here.\\n\\nA new paragraph.']
    """

    def __init__(
        self, counter: TokenCounter, max_tokens: int, overlap: int = 0, *, min_fill: float = 0.5
    ) -> None:
        if max_tokens < 4 or not 0 <= overlap < max_tokens:  # one character is at most 4 tokens (bytes)
            raise ValueError(f"need 4 <= max_tokens ({max_tokens}) and 0 <= overlap ({overlap}) < max_tokens")
        self.counter = counter
        self.max_tokens = max_tokens
        self.overlap = overlap
        self.min_fill = min_fill
        self.region_chars = max(REGION_CHARS, 64 * max_tokens)
        self.too_long = MAX_CHARS_PER_TOKEN * max_tokens  # characters: surely over the limit

    def _span_estimates(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        """`_estimates` of contiguous spans of `text` through the counter's `count_spans`, run by run of spans
        short enough to count."""
        counts = [self.max_tokens + 1] * len(spans)
        run: list[int] = []

        def flush() -> None:
            if run:
                for i, n in zip(run, self.counter.count_spans(text, [spans[i] for i in run]), strict=True):
                    counts[i] = n
                run.clear()

        for i, (start, end) in enumerate(spans):
            if end - start > self.too_long:
                flush()
            else:
                run.append(i)
        flush()
        return counts

    def _estimates(self, texts: Sequence[str]) -> list[int]:
        """Token counts of pieces; a text of more than `too_long` characters gets max_tokens + 1 uncounted
        (it will be split further either way)."""
        short = [t for t in texts if len(t) <= self.too_long]
        counts = iter(self.counter.count_many(short))
        return [next(counts) if len(t) <= self.too_long else self.max_tokens + 1 for t in texts]

    def chunks(self, blocks: Iterable[str]) -> Iterator[Chunk]:
        """Chunks of the text that `blocks` spell out, in order, with offsets into their concatenation."""
        pending: list[str] = []
        pending_chars = 0
        base = 0
        floor = -1  # where the last chunk ended (untrimmed): every chunk must bring text beyond it
        wait_for = self.region_chars
        for block in blocks:
            pending.append(block)
            pending_chars += len(block)
            if pending_chars < wait_for:
                continue
            buf = "".join(pending)
            region = _Region(self, buf[: _region_end(buf)], base, floor, final=False)
            yield from region.chunks()
            pending = [buf[region.consumed :]]
            pending_chars = len(pending[0])
            base += region.consumed
            floor = region.floor
            # a region with no finished chunk (text that counts very few tokens): wait for more text
            wait_for = self.region_chars if region.consumed else 2 * pending_chars
        yield from _Region(self, "".join(pending), base, floor, final=True).chunks()

    def _chunk(self, text: str, base: int, start: int, end: int) -> Chunk | None:
        piece = text[start:end]
        stripped = piece.strip()
        if not stripped:
            return None
        start += len(piece) - len(piece.lstrip())
        return Chunk(base + start, base + start + len(stripped), stripped, self.counter.count(stripped))

    def _tail_start(self, text: str, start: int, end: int, budget: int) -> int | None:
        """Earliest word start (or CJK character) in (start, end) whose tail text[pos:end] counts at most
        `budget` tokens; None if even the last word is too long."""
        window = max(start, end - 64 * budget)  # a tail of `budget` tokens is shorter than this
        candidates = [
            m.end()
            for m in _WORD_OR_WIDE.finditer(text, window, end)
            if start < m.end() < end and not text[m.end()].isspace()
        ]
        lo, hi = 0, len(candidates)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.counter.count(text[candidates[mid] : end]) <= budget:
                hi = mid
            else:
                lo = mid + 1
        return candidates[lo] if lo < len(candidates) else None

    def _longest_prefix(self, text: str, start: int, end: int, trimmed: bool = False) -> int:
        """Largest q in (start, end] with text[start:q] within the limit (searching outward, then bisecting,
        so a huge span is never counted whole)."""

        def fits(q: int) -> bool:
            part = text[start:q]
            return self.counter.count(part.strip() if trimmed else part) <= self.max_tokens

        width = 4 * self.max_tokens
        lo = start + 1  # one character always fits (max_tokens >= 4)
        while start + width < end and fits(start + width):
            lo = start + width
            width *= 2
        hi = min(end, start + width)
        if fits(hi):
            return hi
        while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    # -------------------------------------------------------------------------------------------- pieces

    def _pieces(self, text: str, final: bool) -> _Pieces:
        """Sentence-level pieces of `text` covering it end to end: starts, ends, boundary strengths, counts.
        Pieces longer than max_tokens are split at lines, words, then characters."""
        out = _Pieces()
        starts, ends, strengths = out.starts, out.ends, out.strengths
        pos = 0
        for m in _SENTENCE_OR_PARAGRAPH.finditer(text):
            end = m.end()
            if end >= len(text):
                break  # trailing whitespace stays with the last piece
            if m.group("para") is not None or m.group().count("\n") >= 2:
                if not text[pos : m.start()].strip():
                    continue  # leading blank lines: keep them with the paragraph they precede
                strength = SECTION if _HEADING.match(text, end) else PARAGRAPH
            else:
                strength = SENTENCE
            starts.append(pos)
            ends.append(end)
            strengths.append(strength)
            pos = end
        if pos < len(text):
            starts.append(pos)
            ends.append(len(text))
            strengths.append(DOCUMENT if final else CHAR)
        out.counts = self._estimates([text[s:e] for s, e in zip(starts, ends, strict=True)])
        if max(out.counts, default=0) <= self.max_tokens:
            return out
        fitting = _Pieces()  # split the sentences that are too long
        for s, e, strength, n in zip(starts, ends, strengths, out.counts, strict=True):
            if n <= self.max_tokens:
                fitting.add(s, e, strength, n)
            else:
                self._refine(text, s, e, strength, SENTENCE, fitting)
        return fitting

    def _refine(
        self,
        text: str,
        start: int,
        end: int,
        strength: int,
        level: int,
        out: _Pieces,
    ) -> None:
        """Split a too-long piece at the next finer boundary (lines, then words), down to characters."""
        if level not in _FINER:
            self._split_chars(text, start, end, strength, out)
            return
        finer, pattern = _FINER[level]
        spans = _split(text, start, end, pattern, finer, strength)
        if finer == WORD and hasattr(self.counter, "count_spans"):  # many small spans: one pass per window
            counts = self._span_estimates(text, [(s, e) for s, e, _ in spans])
        else:
            counts = self._estimates([text[s:e] for s, e, _ in spans])
        for (s, e, st), n in zip(spans, counts, strict=True):
            if n <= self.max_tokens:
                out.add(s, e, st, n)
            else:
                self._refine(text, s, e, st, finer, out)

    def _split_chars(self, text: str, start: int, end: int, strength: int, out: _Pieces) -> None:
        pos = start
        while pos < end:
            q = _skip_space(text, self._longest_prefix(text, pos, end), end)  # no whitespace-only piece
            out.add(pos, q, strength if q == end else CHAR, self.counter.count(text[pos:q]))
            pos = q


class _Region:
    """One region of a document being chunked: its pieces, and the packing of pieces into chunks."""

    def __init__(self, chunker: Chunker, text: str, base: int, floor: int, final: bool) -> None:
        self.c = chunker
        self.max = chunker.max_tokens
        self.text = text
        self.base = base
        self.floor = floor
        self.final = final
        self.consumed = 0
        p = chunker._pieces(text, final)
        self.starts, self.ends, self.strengths, self.counts = p.starts, p.ends, p.strengths, p.counts

    def chunks(self) -> Iterator[Chunk]:
        """Chunk the region. Unless final, stop before the chunk that would reach the region's end and leave
        `consumed` at the text used up (the rest is chunked again with what follows)."""
        i = 0
        while i < len(self.starts):
            last = len(self.starts) - 1
            j_max = self._last_fitting(i)
            if j_max == last and not self.final:
                self.consumed = self.starts[i]
                return
            lo = i  # the first piece with text beyond the previous chunk's end
            while lo < last and not self._brings_new_text(lo):
                lo += 1
            if lo > j_max:  # the overlap leaves no room for new text: start without it
                i = lo
                continue
            end = j_max if j_max == last else self._best_end(i, lo, j_max)
            end, chunk = self._verified(i, lo, end)
            if end is None:
                i = lo
                continue
            if chunk is not None:
                yield chunk
            self.floor = self.base + self.ends[end]
            if end == len(self.starts) - 1:
                break
            i = self._next_start(i, end)
        self.consumed = len(self.text)

    def _brings_new_text(self, j: int) -> bool:
        return bool(self.text[max(self.starts[j], self.floor - self.base) : self.ends[j]].strip())

    def _last_fitting(self, i: int) -> int:
        total = 0
        j = i
        while j < len(self.counts) and total + self.counts[j] <= self.max:
            total += self.counts[j]
            j += 1
        return max(j - 1, i)  # a lone piece over the limit is cut in _verified

    def _best_end(self, i: int, lo: int, j_max: int) -> int:
        """The strongest boundary among the ends in [lo, j_max] that fill the chunk from piece i at least
        `min_fill` (or as much as j_max does, if less); the latest one on ties."""
        fill = sum(self.counts[i : j_max + 1])
        threshold = min(self.c.min_fill * self.max, fill)
        best = j_max
        for j in range(j_max, lo - 1, -1):
            if fill < threshold:
                break
            if self.strengths[j] > self.strengths[best]:
                best = j
            fill -= self.counts[j]
        return best

    def _verified(self, i: int, lo: int, end: int) -> tuple[int | None, Chunk | None]:
        """The chunk of pieces i..end counted for real; if it went over the limit, end earlier (not before lo).
        (None, None) when even piece lo does not fit after the overlap; when piece i alone does not fit, it is
        cut at the longest prefix that does."""
        while True:
            chunk = self.c._chunk(self.text, self.base, self.starts[i], self.ends[end])
            if chunk is None or chunk.n_tokens <= self.max:
                return end, chunk
            if end > lo:
                end = self._best_end(i, lo, end - 1)
            elif i < lo:
                return None, None
            else:
                self._cut_piece(i)

    def _cut_piece(self, i: int) -> None:
        start, end = self.starts[i], self.ends[i]
        cut = _skip_space(self.text, self.c._longest_prefix(self.text, start, end, trimmed=True), end)
        self.starts.insert(i + 1, cut)
        self.ends.insert(i + 1, end)
        self.strengths.insert(i + 1, self.strengths[i])
        self.counts.insert(i + 1, self.c.counter.count(self.text[cut:end]))
        self.ends[i], self.strengths[i] = cut, CHAR
        self.counts[i] = self.c.counter.count(self.text[start:cut])

    def _next_start(self, i: int, end: int) -> int:
        """Index of the piece the next chunk starts at: about `overlap` tokens before `end` ends, but leaving
        room for the piece after `end` (so every chunk brings new text). The piece it starts at may be cut to
        a word-aligned tail of itself."""
        room = min(self.c.overlap, self.max - self.counts[end + 1])
        if room <= 0:
            return end + 1
        k = end
        shared = 0
        while k > i and shared + self.counts[k] <= room:
            shared += self.counts[k]
            k -= 1
        if room > shared:
            cut = self.c._tail_start(self.text, self.starts[k], self.ends[k], room - shared)
            if cut is not None and self.text[self.starts[k] : cut].strip():  # it leaves some text out
                self.starts[k] = cut
                self.counts[k] = self.c.counter.count(self.text[cut : self.ends[k]])
                return k
        return k + 1


def _split(
    text: str, start: int, end: int, pattern: re.Pattern[str], inner: int, last: int
) -> list[tuple[int, int, int]]:
    """Spans of text[start:end] ending after each match of `pattern` (the separator stays with the text before
    it); inner spans get strength `inner`, the last one `last`.

    >>> _split("a b\\nc d\\ne", 0, 9, _LINE, LINE, DOCUMENT)
    [(0, 4, 2), (4, 8, 2), (8, 9, 6)]
    """
    spans = []
    pos = start
    for m in pattern.finditer(text, start, end):
        if m.end() >= end:
            break
        if m.start() > pos:
            spans.append((pos, m.end(), inner))
            pos = m.end()
    spans.append((pos, end, last))
    return spans


class _Pieces:
    """Pieces of a region as parallel lists: start and end offsets, boundary strength at the end, tokens."""

    __slots__ = ("counts", "ends", "starts", "strengths")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.strengths: list[int] = []
        self.counts: list[int] = []

    def add(self, start: int, end: int, strength: int, n_tokens: int) -> None:
        self.starts.append(start)
        self.ends.append(end)
        self.strengths.append(strength)
        self.counts.append(n_tokens)


def _skip_space(text: str, pos: int, end: int) -> int:
    while pos < end and text[pos].isspace():
        pos += 1
    return pos


def _region_end(buf: str) -> int:
    """Where to end a region of `buf` (not the end of the text): after the last paragraph break in its second
    half whose whitespace is complete, else after the last line break or space there, else at its end."""
    half = len(buf) // 2
    cut = None
    for m in _PARAGRAPH.finditer(buf, half):
        if m.end() < len(buf):
            cut = m.end()
    if cut is not None:
        return cut
    for sep in ("\n", " "):
        at = buf.rfind(sep, half, len(buf) - 1)
        if at >= 0:
            return at + 1
    return len(buf)
