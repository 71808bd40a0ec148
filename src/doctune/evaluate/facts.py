"""Key facts of a reference answer, and which of them a candidate's answer states.

ROUGE and embedding similarity reward an answer that sounds like the reference: "Port 7000 by default." scores
well against "Lumen Relay listens on port 7300 by default." The key-fact recall asks the question a user asks:
does the answer state the reference's numbers, names and quoted strings?

A key fact is one of (found in this order; a span claimed by one kind is not searched again):

- a code span (`` `lumen start` ``), a quoted span ("...", '...', “...”, „...“, «...»; at most 80 characters),
  a URL, an e-mail address or a path;
- a date (2024-03-15, 15/03/2024, March 15, 2024, 15 March 2024), a time (14:30), a version (1.4.2, v1.4.2);
- an identifier: a token with digits and letters (SmolLM2), inner dots (lumen.toml), underscores, CamelCase
  (LumenRelay) or in capitals (API, TLS);
- a number with its unit when one follows or a currency precedes it (7300, 6 euros, €6, 30 days, 2.5 GB, 30%);
- a proper name: a run of capitalised words ("Marie Curie", "Bank of England"), less the word that starts a
  sentence ("The Team edition" gives "Team", "Lumen Relay listens" gives "Relay", "It works" nothing).

A candidate states a fact when (see `facts_hit`):

- numbers are equal as numbers (7300 = 7,300 = 7 300; 2.0 = 2; 6,50 = 6.5) and, when the reference gives a
  unit (a currency, %, a size, a duration, a counted thing such as users or replicas: see `_UNIT_GROUPS` and
  `_COUNTED`), the candidate gives the same unit right after the number (within two words) or a currency before it:
  "6 euros" is stated by "6 EUR" and "€6", not by "6 dollars" or a bare "6";
- names and identifiers match case-insensitively as whole words; quoted spans case-insensitively, code spans
  exactly (both with any run of whitespace equal to any other).

Languages that capitalise every noun (German) make every noun a "name": the facts are still checked, only
more of them. Scripts without case (Chinese, Japanese) have no names; their numbers and quotes still count.

>>> f = key_facts("Lumen Relay listens on port 7300; the Team edition costs 6 euros per user.")
>>> [x.text for x in f]
['Relay', '7300', 'Team', '6 euros']
>>> facts_hit(f, "Port 7,300. Team costs 6 dollars.")
['7300', 'Team']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

KEY_FACTS = "key_fact_recall"  # the metric's name in results.jsonl and summary.json
MAX_SPAN_CHARS = 80

# ------------------------------------------------------------------------------------------ vocabularies

_MONTHS = {
    name: i + 1
    for i, names in enumerate(
        [
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ]
    )
    for name in names
}
_MONTH_RE = "|".join(sorted(_MONTHS, key=len, reverse=True))

# surface form (lower case) → canonical unit
_UNIT_GROUPS = {
    "eur": "€ eur euro euros",
    "usd": "$ usd dollar dollars dólar dólares",
    "gbp": "£ gbp pound pounds",
    "jpy": "¥ jpy yen",
    "chf": "chf",
    "%": "% percent pct prozent pourcent",
    "b": "b byte bytes",
    "kb": "kb kib kilobyte kilobytes",
    "mb": "mb mib megabyte megabytes",
    "gb": "gb gib gigabyte gigabytes",
    "tb": "tb tib terabyte terabytes",
    "ms": "ms millisecond milliseconds",
    "s": "s sec secs second seconds sekunde sekunden seconde secondes segundo segundos",
    "min": "min mins minute minutes minuten minuto minutos",
    "h": "h hr hrs hour hours stunde stunden heure heures hora horas",
    "day": "day days tag tage tagen jour jours día días dia dias",
    "week": "week weeks woche wochen semaine semaines semana semanas",
    "month": "month months monat monate monaten mois mes meses",
    "year": "year years yr yrs jahr jahre jahren année années año años",
    "hz": "hz khz mhz ghz",
    "m": "m meter meters metre metres",
    "km": "km kilometer kilometers kilometre kilometres",
    "cm": "cm mm",
    "kg": "kg kilogram kilograms g gram grams",
    "x": "x times fach fois veces",
    "k": "k",
    "cpu": "cpu cpus core cores",
}
# things counted after a number ("3 replicas", "50 users"), singular; a plural adds "s". Other words after a
# number are no unit: "Setting 3 controls" must not ask an answer for "3 controls".
_COUNTED = """user seat license licence member replica node instance server machine worker thread process request
    call connection token page file document item step epoch attempt retry message question answer project team
    device gpu key column row table record character word line letter digit port plan tier edition"""
_UNITS = {form: canon for canon, forms in _UNIT_GROUPS.items() for form in forms.split()}
_UNITS |= {form: noun for noun in _COUNTED.split() for form in (noun, noun + "s")}
# written right after the number in Chinese and Japanese ("6欧元", "30天")
_CJK_UNITS = {
    "欧元": "eur",
    "ユーロ": "eur",
    "美元": "usd",
    "ドル": "usd",
    "英镑": "gbp",
    "天": "day",
    "日": "day",
}
_CJK_UNITS |= {
    "年": "year",
    "个月": "month",
    "か月": "month",
    "小时": "h",
    "時間": "h",
    "分钟": "min",
    "秒": "s",
}
_CURRENCY_BEFORE = {"€": "eur", "$": "usd", "£": "gbp", "¥": "jpy", "eur": "eur", "usd": "usd", "gbp": "gbp"}

# words that never are a unit after a number, nor start a name at the start of a sentence
_FUNCTION_WORD_TEXT = """
    a an and are as at be been but by default for from has have if in into is it its of on or per so than that
    the their then there these this those to was were when where which while who will with without you your we our
    they he she his her i my me what how why yes no not also only all any each every both either more most less
    use using see note please here after before during until since about over under between plus minus
    across always unless whereas besides thus does
    und oder der die das den dem des ein eine ist sind im in am an auf mit für von bis pro je zu zum zur bei nach
    et ou le la les un une de des du est sont à au aux en par pour sur avec dans
    y o el los las del es son en por para con sin sobre"""
_FUNCTION_WORDS = frozenset(_FUNCTION_WORD_TEXT.split())
_CONNECTORS = {"of", "de", "del", "della", "di", "da", "du", "des", "von", "van", "der", "den", "la", "le"}


# ------------------------------------------------------------------------------------------ patterns

_FENCE = re.compile(r"```.*?(?:```|\Z)", re.S)
_CODE = re.compile(rf"`([^`\n]{{1,{MAX_SPAN_CHARS}}})`")
_QUOTES = [
    re.compile(rf'"([^"\n]{{1,{MAX_SPAN_CHARS}}})"'),
    re.compile(rf"“([^“”\n]{{1,{MAX_SPAN_CHARS}}})”"),
    re.compile(rf"„([^„“”\n]{{1,{MAX_SPAN_CHARS}}})[“”]"),
    re.compile(rf"«\s?([^«»\n]{{1,{MAX_SPAN_CHARS}}}?)\s?»"),
    re.compile(rf"‘([^‘’\n]{{1,{MAX_SPAN_CHARS}}})’"),
    re.compile(rf"(?<!\w)'([^'\n]{{1,{MAX_SPAN_CHARS}}}?)'(?!\w)"),
]
_TRAIL = r"(?<![.,;:!?)\]'\"])"  # a URL or path does not end in sentence punctuation
_URL = re.compile(r"\b(?:https?|ftp)://[^\s<>\"'`]+" + _TRAIL)
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+" + _TRAIL)
_PATH = re.compile(r"(?<![\w/.~])(?:~|\.{1,2})?/[\w.\-]+(?:/[\w.\-]*)*" + _TRAIL)
_LIST_MARKER = re.compile(r"^[ \t]*\d{1,3}[.)][ \t]", re.M)
_ISO_DATE = re.compile(r"(?<![\w.])(\d{4})-(\d{1,2})-(\d{1,2})(?![\w])")
_NUMERIC_DATE = re.compile(r"(?<![\w.])(\d{1,2})[./](\d{1,2})[./](\d{4})(?![\w]|\.\d)")
_MONTH_DAY = re.compile(rf"\b({_MONTH_RE})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?(?:,?\s+(\d{{4}}))?(?![\w])", re.I)
_DAY_MONTH = re.compile(
    rf"(?<![\w.])(\d{{1,2}})(?:st|nd|rd|th)?\.?\s+({_MONTH_RE})\.?(?:,?\s+(\d{{4}}))?\b", re.I
)
_MONTH_YEAR = re.compile(rf"\b({_MONTH_RE})\.?\s+(\d{{4}})(?![\w])", re.I)
_TIME = re.compile(r"(?<![\w:.])(\d{1,2}):(\d{2})(?::(\d{2}))?(?![\w:])")
_VERSION = re.compile(r"(?<![\w.])[vV]?(\d+(?:\.\d+){2,})(?![\w]|\.\d)")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_LETTER = rf"[^\W_{_CJK}]"  # a letter or digit of a script that separates words by spaces
_WORD_CHAR = rf"[^\W{_CJK}]"  # the same and "_"
_NUMBER = re.compile(
    rf"(?<!{_LETTER})(?<!\d[.,])("
    r"\d{1,3}(?:[,\u00a0\u202f ]\d{3})+(?!\d)(?:\.\d+)?"  # 7,300  7 300  1,234.5
    r"|\d+\.\d+"  # 2.5
    r"|\d+,\d{1,2}(?!\d)"  # 6,50 (decimal comma)
    r"|\d+"
    r")(?:st|nd|rd|th)?(?!\d|[.,]\d)"
)
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
)
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80}
_NUMBER_WORDS = {w: i for i, w in enumerate([*_ONES.split(), "seventeen", "eighteen", "nineteen"])}
_NUMBER_WORDS |= _TENS | {"ninety": 90, "hundred": 100}
_NUMBER_WORD = re.compile(rf"\b(?:{'|'.join(_NUMBER_WORDS)})\b(?!-)", re.I)
_TOKEN = re.compile(rf"{_LETTER}(?:(?:{_WORD_CHAR}|[.\-])*{_LETTER})?")
_WORD_AFTER = re.compile(r"(?:\s{0,2}|-)([%€$£¥]|[^\W\d_]+\.?)")
_NUMBER_UNIT = re.compile(r"\d+(?:[.,]\d+)?([^\W\d_]+)")


@dataclass(frozen=True)
class Fact:
    """One key fact: `text` as written in the reference, `kind`, and the `key` it is matched by."""

    text: str
    kind: str  # code | quote | link | date | time | version | identifier | number | name
    key: Any
    start: int = 0

    def __str__(self) -> str:
        return self.text


# ------------------------------------------------------------------------------------------ numbers


def number_key(text: str) -> str | None:
    """A number written any common way, as one canonical string (None: not a number).

    >>> [number_key(x) for x in ["7300", "7,300", "7\u202f300", "2.50", "2.0", "6,5", "1,234.5", "3rd"]]
    ['7300', '7300', '7300', '2.5', '2', '6.5', '1234.5', '3']
    """
    text = re.sub(r"(?:st|nd|rd|th)$", "", text.strip())
    if re.fullmatch(r"\d+,\d{1,2}", text):
        text = text.replace(",", ".")
    text = re.sub(r"[, \u00a0\u202f]", "", text)
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    out = format(value.normalize(), "f")
    return out


def unit_key(word: str, *, any_word: bool = False) -> str | None:
    """The canonical unit of a word after (or a currency before) a number; None: not a unit. Words outside the
    table are units only with `any_word` (the answer's side: "3 replica sets" names replicas): any lower-case
    word that is not a function word, less a plural "s".

    >>> [unit_key(w) for w in ["euros", "EUR", "€", "Days", "GB", "replicas", "by", "controls", "Lumen"]]
    ['eur', 'eur', 'eur', 'day', 'gb', 'replica', None, None, None]
    >>> unit_key("sets"), unit_key("sets", any_word=True)
    (None, 'set')
    """
    low = word.rstrip(".").lower()
    if low in _UNITS:
        return _UNITS[low]
    if not any_word or low in _FUNCTION_WORDS or not word[:1].islower() or len(low) < 3:
        return None
    return low[:-1] if low.endswith("s") else low


def _units_after(text: str, end: int, words: int) -> list[str]:
    """Canonical units among the next `words` words after position `end` (a unit glued on counts: 2.5GB)."""
    out = []
    pos = end
    for _ in range(words):
        m = _WORD_AFTER.match(text, pos)
        if not m:
            break
        if pos == end and m.start(1) == end and m.group(1)[:1].isalpha():
            unit = _glued_unit(m.group(1))
        else:
            unit = unit_key(m.group(1), any_word=True)
        if unit:
            out.append(unit)
        pos = m.end()
    return out


def _glued_unit(word: str) -> str | None:
    """A unit written without a space after the number: only known ones (2.5GB, 100ms, 6欧元).

    >>> [_glued_unit(w) for w in ["GB", "ms", "欧元。", "D"]]
    ['gb', 'ms', 'eur', None]
    """
    unit = _UNITS.get(word.rstrip(".").lower())
    if unit is None:
        unit = next((u for k, u in _CJK_UNITS.items() if word.startswith(k)), None)
    return unit


def _unit_before(text: str, start: int) -> str | None:
    m = re.search(r"([€$£¥]|\b(?:EUR|USD|GBP|eur|usd|gbp))\s?$", text[max(0, start - 5) : start])
    return _CURRENCY_BEFORE[m.group(1).lower()] if m else None


def numbers_in(text: str) -> list[tuple[str, set[str], int, int]]:
    """Every number of `text`: (canonical value, units written with it, start, end); English number words
    ("six", "twenty") count too.

    >>> [(v, sorted(u)) for v, u, _, _ in numbers_in("It costs €6 or 7,300 GB, in two calendar days.")]
    [('6', ['eur']), ('7300', ['gb']), ('2', ['calendar', 'day'])]
    """
    found = [(number_key(m.group(1)), m.start(), m.end()) for m in _NUMBER.finditer(text)]
    found += [
        (str(_NUMBER_WORDS[m.group(0).lower()]), m.start(), m.end()) for m in _NUMBER_WORD.finditer(text)
    ]
    out = []
    for key, start, end in sorted(found, key=lambda f: f[1]):
        if key is None:
            continue
        units = set(_units_after(text, end, 2))
        before = _unit_before(text, start)
        if before:
            units.add(before)
        out.append((key, units, start, end))
    return out


# ------------------------------------------------------------------------------------------ dates


def _date_key(year: str | None, month: int, day: str | None) -> str:
    return "-".join(p for p in (year, f"{month:02d}", f"{int(day):02d}" if day else None) if p)


def dates_in(text: str) -> list[tuple[str, int, int]]:
    """Every date of `text` as (YYYY-MM-DD, MM-DD or YYYY-MM, start, end); day-first for 15/03/2024.

    >>> [d for d, _, _ in dates_in("From 2024-03-15 to March 20, 2024, then 1 April and 05.06.2025.")]
    ['2024-03-15', '2024-03-20', '04-01', '2025-06-05']
    """
    found: list[tuple[str, int, int]] = []

    def add(key: str, start: int, end: int) -> None:
        if not any(s < end and start < e for _, s, e in found):
            found.append((key, start, end))

    for m in _ISO_DATE.finditer(text):
        if 1 <= int(m.group(2)) <= 12:
            add(_date_key(m.group(1), int(m.group(2)), m.group(3)), m.start(), m.end())
    for m in _NUMERIC_DATE.finditer(text):
        day, month = int(m.group(1)), int(m.group(2))
        if month > 12 and day <= 12:  # 03/15/2024 can only be month first
            day, month = month, day
        if 1 <= month <= 12:
            add(_date_key(m.group(3), month, str(day)), m.start(), m.end())
    for m in _MONTH_DAY.finditer(text):
        add(_date_key(m.group(3), _MONTHS[m.group(1).lower()], m.group(2)), m.start(), m.end())
    for m in _DAY_MONTH.finditer(text):
        add(_date_key(m.group(3), _MONTHS[m.group(2).lower()], m.group(1)), m.start(), m.end())
    for m in _MONTH_YEAR.finditer(text):
        add(_date_key(m.group(2), _MONTHS[m.group(1).lower()], None), m.start(), m.end())
    return sorted(found, key=lambda d: d[1])


# ------------------------------------------------------------------------------------------ extraction


def _squash(text: str) -> str:
    return " ".join(text.split())


def _sentence_start(text: str, pos: int) -> bool:
    """Whether position `pos` starts a sentence: start of text or line, or after . ! ? : ; (opening quotes,
    brackets and bullets in between are skipped).

    >>> [_sentence_start("It runs. The Team", i) for i in (0, 9, 13)]
    [True, True, False]
    """
    i = pos
    while i > 0 and text[i - 1] in " \t\"'“„«‘([*•>#-":
        i -= 1
    return i == 0 or text[i - 1] in "\n.!?:;…"


def _identifier(token: str) -> bool:
    """A token that names a thing whatever its position: digits and letters, dots, underscores, CamelCase,
    capitals.

    >>> [_identifier(t) for t in ["SmolLM2", "lumen.toml", "HF_HOME", "LumenRelay", "API", "Team", "I", "e.g"]]
    [True, True, True, True, True, False, False, False]
    """
    letters = [c for c in token if c.isalpha()]
    if not letters:
        return False
    if any(c.isdigit() for c in token):
        return True
    if "_" in token or re.search(r"[^\W_]\.[^\W_]{2,}", token):
        return True
    if re.search(r"[a-z][A-Z]", token):
        return True
    return len(letters) >= 2 and all(c.isupper() for c in letters)


def _number_with_unit(token: str) -> bool:
    """2.5GB, 100ms, 3rd: a number and its unit written together, not an identifier."""
    m = _NUMBER_UNIT.fullmatch(token)
    return bool(m) and (m.group(1).lower() in _UNITS or m.group(1).lower() in ("st", "nd", "rd", "th"))


def _capitalised(token: str) -> bool:
    return token[:1].isupper() and len(token) > 1 and any(c.islower() for c in token[1:])


def _names(text: str, claimed: list[tuple[int, int]]) -> list[Fact]:
    """Proper names and identifiers among the unclaimed tokens of `text`."""
    out: list[Fact] = []
    run: list[re.Match] = []

    def close_run() -> None:
        while run and run[-1].group(0).lower() in _CONNECTORS:
            run.pop()
        if not run:
            return
        words = list(run)
        if _sentence_start(text, words[0].start()):  # "The Team", "Lumen Relay listens": "Team", "Relay"
            words = words[1:]
        if words:
            name = text[words[0].start() : words[-1].end()]
            out.append(Fact(_squash(name), "name", _squash(name).casefold(), words[0].start()))
        run.clear()

    for m in _TOKEN.finditer(text):
        token = m.group(0)
        if any(s < m.end() and m.start() < e for s, e in claimed):
            close_run()
            continue
        gap = text[run[-1].end() : m.start()] if run else ""
        if run and not re.fullmatch(r" ", gap):
            close_run()
        if _identifier(token) and not _number_with_unit(token):
            close_run()
            out.append(Fact(token, "identifier", token.casefold(), m.start()))
        elif _capitalised(token) or (run and token.lower() in _CONNECTORS):
            run.append(m)
        else:
            close_run()
    close_run()
    return out


def key_facts(reference: str) -> list[Fact]:
    """The key facts of a reference answer, in the order they appear, each once.

    >>> [(f.kind, f.text) for f in key_facts('It reads `lumen.toml` and logs "ready" after 30 days.')]
    [('code', 'lumen.toml'), ('quote', 'ready'), ('number', '30 days')]
    >>> key_facts("The answer is yes. It works.")
    []
    """
    found: list[Fact] = []
    claimed: list[tuple[int, int]] = []

    def free(start: int, end: int) -> bool:
        return not any(s < end and start < e for s, e in claimed)

    def claim(fact: Fact | None, start: int, end: int) -> None:
        claimed.append((start, end))
        if fact is not None:
            found.append(fact)

    for m in _FENCE.finditer(reference):
        claim(None, m.start(), m.end())  # a code block is not a short fact
    for m in _LIST_MARKER.finditer(reference):
        claim(None, m.start(), m.end())
    for m in _CODE.finditer(reference):
        if free(m.start(), m.end()) and m.group(1).strip():
            body = _squash(m.group(1))
            claim(Fact(body, "code", body, m.start()), m.start(), m.end())
    for pattern in (_URL, _EMAIL, _PATH):
        for m in pattern.finditer(reference):
            if free(m.start(), m.end()):
                claim(Fact(m.group(0), "link", m.group(0).casefold(), m.start()), m.start(), m.end())
    for pattern in _QUOTES:
        for m in pattern.finditer(reference):
            body = _squash(m.group(1))
            if free(m.start(), m.end()) and body:
                claim(Fact(body, "quote", body.casefold(), m.start()), m.start(), m.end())
    for key, start, end in dates_in(reference):
        if free(start, end):
            claim(Fact(_squash(reference[start:end]), "date", key, start), start, end)
    for m in _TIME.finditer(reference):
        if free(m.start(), m.end()) and int(m.group(1)) < 24:
            claim(Fact(m.group(0), "time", _time_key(m), m.start()), m.start(), m.end())
    for m in _VERSION.finditer(reference):
        if free(m.start(), m.end()):
            claim(Fact(m.group(0), "version", m.group(1), m.start()), m.start(), m.end())
    for fact in _names(reference, claimed):  # "SmolLM2", "Llama-3": before their digits are read as numbers
        if fact.kind == "identifier" and any(c.isdigit() for c in fact.text):
            claim(fact, fact.start, fact.start + len(fact.text))
    for key, _units, start, end in numbers_in(reference):
        if not free(start, end):
            continue
        unit, (unit_start, unit_end) = _reference_unit(reference, start, end)
        if unit is None and reference[start].isalpha():
            continue  # "one of them", "Five;": a number word is a fact only with its unit ("two minutes")
        first, last = min(start, unit_start), max(end, unit_end)  # the unit is not a name too ("6 Euro")
        claim(Fact(_squash(reference[first:last]), "number", (key, unit), start), first, last)
    found += _names(reference, claimed)
    return _unique(sorted(found, key=lambda f: f.start))


def _reference_unit(text: str, start: int, end: int) -> tuple[str | None, tuple[int, int]]:
    """The unit written right after (or a currency right before) a number of the reference, and its span."""
    m = _WORD_AFTER.match(text, end)
    if m:
        glued = m.start(1) == end and m.group(1)[:1].isalpha()
        word = m.group(1).rstrip(".")
        unit = _glued_unit(word) if glued else unit_key(word)
        if unit:
            length = (
                next((len(k) for k in _CJK_UNITS if word.startswith(k)), len(word)) if glued else len(word)
            )
            return unit, (m.start(1), m.start(1) + length)
    before = _unit_before(text, start)
    if before:
        m = re.search(r"([€$£¥]|\b[A-Za-z]{3})\s?$", text[max(0, start - 5) : start])
        return before, (start - len(m.group(0)), start)
    return None, (start, end)


def _time_key(m: re.Match) -> str:
    return f"{int(m.group(1)):02d}:{m.group(2)}" + (f":{m.group(3)}" if m.group(3) else "")


def _unique(facts: list[Fact]) -> list[Fact]:
    seen, out = set(), []
    for fact in facts:
        if (fact.kind, fact.key) not in seen:
            seen.add((fact.kind, fact.key))
            out.append(fact)
    return out


# ------------------------------------------------------------------------------------------ matching


def _phrase(needle: str, *, ignore_case: bool) -> re.Pattern:
    """`needle` as a whole phrase: any whitespace run matches any other, no word character glued on."""
    body = r"\s+".join(re.escape(part) for part in needle.split())
    if re.match(_WORD_CHAR, needle):
        body = rf"(?<!{_WORD_CHAR})" + body
    if re.match(_WORD_CHAR, needle[-1:]):
        body += rf"(?!{_WORD_CHAR})"
    return re.compile(body, re.I if ignore_case else 0)


def fact_spans(fact: Fact, answer: str) -> list[tuple[int, int]]:
    """Where `answer` states `fact`: the (start, end) of each mention (empty: not stated).

    >>> fact_spans(key_facts("It costs 6 euros.")[0], "6 dollars, or 6 EUR")
    [(14, 15)]
    """
    if fact.kind == "number":
        value, unit = fact.key
        return [
            (s, e) for v, units, s, e in numbers_in(answer) if v == value and (unit is None or unit in units)
        ]
    if fact.kind == "date":
        return [(s, e) for key, s, e in dates_in(answer) if key == fact.key or key.endswith("-" + fact.key)]
    if fact.kind == "time":
        return [(m.start(), m.end()) for m in _TIME.finditer(answer) if _time_key(m) == fact.key]
    if fact.kind == "version":
        return [(m.start(), m.end()) for m in _VERSION.finditer(answer) if m.group(1) == fact.key]
    pattern = _phrase(fact.text, ignore_case=fact.kind != "code")
    return [(m.start(), m.end()) for m in pattern.finditer(answer)]


def facts_hit(facts: list[Fact], answer: str) -> list[str]:
    """The texts of the facts that `answer` states, in the reference's order."""
    return [f.text for f in facts if fact_spans(f, answer)]


def score(answer: str, reference: str) -> dict[str, Any]:
    """{"facts": [...], "facts_hit": [...], "key_fact_recall": hits / facts, or None without key facts}.

    >>> score("Port 7000 by default.", "Lumen Relay listens on port 7300 by default.")
    {'facts': ['Relay', '7300'], 'facts_hit': [], 'key_fact_recall': 0.0}
    >>> score("Yes.", "Yes, it does.")["key_fact_recall"] is None
    True
    """
    facts = key_facts(reference)
    hit = facts_hit(facts, answer)
    return {
        "facts": [f.text for f in facts],
        "facts_hit": hit,
        "key_fact_recall": len(hit) / len(facts) if facts else None,
    }
