"""The `doctune` command. Thin: parse options, load the config, call the stage's run(), print its summary.

Heavy libraries (torch, transformers, ...) are imported inside the commands that need them, so `--help` and
config errors answer at once.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichBar
from rich.table import Table

from doctune.errors import DoctuneError

app = typer.Typer(
    help="doctune: documents in, a fine-tuned domain chatbot out, with numbers that say whether it got better.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[
    Path | None, typer.Option("-c", "--config", help="doctune.yaml to use (default: ./doctune.yaml).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override one config field, KEY=VALUE (repeatable), e.g. data.chunk_tokens=512."
    ),
]
RunDirOpt = Annotated[str | None, typer.Option("--run-dir", help="Override run_dir.")]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="Log details (DEBUG level).")]


class RichProgress:
    """The CLI's Progress: a rich bar with count, rate, ETA and the stage's own fields."""

    def __init__(self) -> None:
        self._bar: RichBar | None = None
        self._task: Any = None
        self._fields: dict[str, Any] = {}

    def start(self, description: str, total: int | None) -> None:
        self.finish()
        self._fields = {}
        self._bar = RichBar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[extra]}"),
            console=console,
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, rate="", extra="")

    def advance(self, n: int = 1, **fields: Any) -> None:
        if self._bar is None:
            return
        self._fields.update(fields)
        extra = "  ".join(f"{k}={v}" for k, v in self._fields.items())
        task = self._bar.tasks[0]
        speed = task.finished_speed or task.speed
        rate = f"{speed:.1f}/s" if speed else ""
        self._bar.update(self._task, advance=n, extra=extra, rate=rate)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _print_summary(summary: Any) -> None:
    table = Table(title=summary.title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for what, value in summary.rows:
        table.add_row(str(what), f"{value:,}" if isinstance(value, int) else str(value))
    out.print(table)
    for line in summary.warnings:
        console.print(f"[yellow]warning:[/] {line}")
    for path in summary.outputs:
        out.print(f"wrote {path}")


def _config(config: Path | None, sets: list[str] | None, **fields: Any):
    from doctune.config import load_config, parse_overrides

    overrides = parse_overrides(sets or [])
    overrides.update({k: v for k, v in fields.items() if v is not None})
    return load_config(config, overrides)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )
    for noisy in ("httpx", "httpcore", "openai", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Folder to write doctune.yaml into.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing doctune.yaml.")] = False,
) -> None:
    """Write doctune.yaml with every default and what it means."""
    from doctune.config import DEFAULT_CONFIG_NAME, default_config_yaml
    from doctune.runs import atomic_write_text

    target = directory / DEFAULT_CONFIG_NAME
    if target.exists() and not force:
        raise DoctuneError(f"{target}: already exists (use --force to overwrite)")
    atomic_write_text(target, default_config_yaml())
    out.print(f"wrote {target}")


@app.command("tiny-model")
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the model and tokenizer into.")],
    corpus: Annotated[
        Path | None, typer.Option("--corpus", help="Folder of .txt/.md files to train the tokenizer on.")
    ] = None,
    size: Annotated[
        str, typer.Option("--size", help="tiny (~200k params) or small (~10-30M, benchmarks).")
    ] = "tiny",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights.")] = 0,
) -> None:
    """Build a random-weight Llama with a BPE tokenizer, offline: for tests, the quickstart and benchmarks."""
    from doctune.tinymodel import build_tiny_model

    summary = build_tiny_model(out_dir, corpus=corpus, size=size, seed=seed)
    _print_summary(summary)


@app.command()
def ingest(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    run_dir: RunDirOpt = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="Override data.dir.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Read PDFs, Markdown and text from data.dir into token-counted chunks (chunks.jsonl)."""
    cfg = _config(config, sets, run_dir=run_dir, **{"data.dir": data_dir})
    _setup_logging(verbose)
    from doctune.ingest.stage import run

    _print_summary(run(cfg, progress=RichProgress()))


def main() -> None:
    """Entry point: DoctuneError → one line on stderr and its exit code; Ctrl-C → exit 130."""
    try:
        app(standalone_mode=False)
    except DoctuneError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted: run the same command again to continue where it stopped")
        sys.exit(130)
    except (typer.Exit, typer.Abort) as exc:
        sys.exit(getattr(exc, "exit_code", 1))
    except Exception as exc:
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
