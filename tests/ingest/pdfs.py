"""Real PDF files for the ingest tests, written with reportlab (and pypdf for encryption). No fixtures on disk."""

from __future__ import annotations

import os
from pathlib import Path

import reportlab
from reportlab.lib.pagesizes import A4
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen import canvas

# Vera ships with reportlab: accents, curly quotes and dashes embedded as TrueType; STSong-Light is a CID font
# for Chinese and Japanese text.
_VERA = os.path.join(os.path.dirname(reportlab.__file__), "fonts", "Vera.ttf")
pdfmetrics.registerFont(TTFont("Vera", _VERA))
pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))

NON_ASCII_LINE = "Café “quoted” naïve — Ærøskøbing"
CJK_LINE = "日本語の文章。中文文本。"
WORDS = (
    "the pump valve pressure must be checked before each shift and the operator records the reading "
    "in the log while a supervisor signs the sheet at the end of the week unless the alarm sounds"
)


def write_pdf(path: Path, pages: list[list[str]]) -> Path:
    """One page per list of lines; lines with CJK characters use the CID font, others Vera."""
    path.parent.mkdir(parents=True, exist_ok=True)
    c = canvas.Canvas(str(path), pagesize=A4, invariant=True)
    for lines in pages:
        y = 800
        for line in lines:
            font = "STSong-Light" if any(ord(ch) > 0x3000 for ch in line) else "Vera"
            c.setFont(font, 10)
            c.drawString(40, y, line)
            y -= 14
        c.showPage()
    c.save()
    return path


def write_drawing_only_pdf(path: Path, pages: int = 2) -> Path:
    """Pages with shapes and a raster image but no text layer, like a scan."""
    from PIL import Image
    from reportlab.lib.utils import ImageReader

    image = Image.new("RGB", (40, 20), (200, 30, 30))
    c = canvas.Canvas(str(path), pagesize=A4, invariant=True)
    for _ in range(pages):
        c.rect(50, 50, 300, 200, fill=1)
        c.drawImage(ImageReader(image), 100, 400, width=200, height=100)
        c.showPage()
    c.save()
    return path


def write_encrypted_pdf(path: Path, source: Path, password: str = "secret") -> Path:
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=str(source))
    writer.encrypt(user_password=password, owner_password="owner-" + password)
    with open(path, "wb") as f:
        writer.write(f)
    return path


def write_truncated_pdf(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def paragraphs(n: int, seed: int = 0, sentences: int = 5) -> list[str]:
    """Readable, varied paragraphs (deterministic for a seed)."""
    import random

    rng = random.Random(seed)
    words = WORDS.split()
    out = []
    for p in range(n):
        sents = []
        for _ in range(sentences):
            body = " ".join(rng.choice(words) for _ in range(rng.randint(6, 16)))
            sents.append(body[0].upper() + body[1:] + rng.choice([".", ".", "?", "!"]))
        out.append(f"P{p}. " + " ".join(sents))
    return out


def wrap(text: str, width: int = 90) -> list[str]:
    """Lines of at most `width` characters (how a paragraph is drawn on a PDF page)."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return lines
