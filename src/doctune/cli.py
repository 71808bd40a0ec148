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

from doctune.config import Config
from doctune.errors import DoctuneError
from doctune.runs import RunDir

app = typer.Typer(
    help="doctune: documents in, a fine-tuned domain chatbot out, with numbers that say whether it got better.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

RUN = RunDir("{run_dir}")  # the run folder's files as help texts name them: {run_dir}/adapter, ...


def field_help(key: str, lead: str = "Override", extra: str = "") -> str:
    """The help of an option that mirrors a config field: the field's own description, so they cannot drift.

    >>> field_help("curate.threshold")
    'Override curate.threshold: score mode: keep pairs scored at least this.'
    """
    model: Any = Config
    *sections, name = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    description = model.model_fields[name].description
    return f"{lead} {key}: {description}{extra}"


ConfigOpt = Annotated[
    Path | None, typer.Option("-c", "--config", help="doctune.yaml to use (default: ./doctune.yaml).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override one config field, KEY=VALUE (repeatable), e.g. data.chunk_tokens=512."
    ),
]
RunDirOpt = Annotated[str | None, typer.Option("--run-dir", help=field_help("run_dir"))]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="Log details (DEBUG level).")]
NoCacheOpt = Annotated[
    bool,
    typer.Option("--no-cache", help=f"Send every request again instead of reusing {RUN.cache.name}."),
]


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


def _config(
    config: Path | None,
    sets: list[str] | None,
    stages: tuple[str, ...] | None = None,
    writes_run_dir: bool = True,
    **fields: Any,
):
    """Load and validate the config; `stages`: whose model references to check (None: every stage's)."""
    from doctune.config import load_config, parse_overrides
    from doctune.runs import check_writable_dir

    overrides = parse_overrides(sets or [])
    overrides.update({k: v for k, v in fields.items() if v is not None})
    cfg = load_config(config, overrides, stages=stages)
    if writes_run_dir:  # checked before any work, not when the first file is written
        check_writable_dir(cfg.run_path, "run_dir")
        cfg.run_folder.remove_stray_temporaries()  # what a write killed before its rename left
    return cfg


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:  # library warnings that say nothing a doctune user can act on
        import warnings

        # PEFT, saving an adapter of a .gguf base: it cannot look for a resized vocabulary there (doctune never
        # resizes it)
        warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Folder to write doctune.yaml into.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing doctune.yaml.")] = False,
) -> None:
    """Write doctune.yaml with every default and what it means."""
    from doctune.config import DEFAULT_CONFIG_NAME, default_config_yaml
    from doctune.runs import atomic_write_text

    if directory.exists() and not directory.is_dir():
        raise DoctuneError(
            f"{directory}: is a file, not a folder (give the folder to write doctune.yaml into)"
        )
    target = directory / DEFAULT_CONFIG_NAME
    if target.is_dir():
        raise DoctuneError(f"{target}: is a folder; move it away or init another folder")
    if target.exists() and not force:
        raise DoctuneError(f"{target}: already exists (use --force to overwrite)")
    atomic_write_text(target, default_config_yaml())
    out.print(f"wrote {target}")


@app.command("tiny-model")
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the model and tokenizer into.")],
    corpus: Annotated[
        Path | None,
        typer.Option("--corpus", exists=True, help="Folder of .txt/.md files to train the tokenizer on."),
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
    data_dir: Annotated[str | None, typer.Option("--data-dir", help=field_help("data.dir"))] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Read PDFs, Markdown and text from data.dir into token-counted chunks (chunks.jsonl)."""
    cfg = _config(config, sets, (), run_dir=run_dir, **{"data.dir": data_dir})
    _setup_logging(verbose)
    from doctune.ingest.stage import run

    _print_summary(run(cfg, progress=RichProgress()))


@app.command()
def generate(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    run_dir: RunDirOpt = None,
    total_questions: Annotated[
        int | None,
        typer.Option("-t", "--total-questions", help=field_help("generate.total_questions")),
    ] = None,
    no_cache: NoCacheOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Ask the teacher for question/answer pairs from every chunk (qa_raw.jsonl, generate_failures.jsonl)."""
    cfg = _config(
        config, sets, ("generate",), run_dir=run_dir, **{"generate.total_questions": total_questions}
    )
    _setup_logging(verbose)
    from doctune.generate import run

    _print_summary(run(cfg, progress=RichProgress(), use_cache=not no_cache))


@app.command("eval")
def eval_(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    run_dir: RunDirOpt = None,
    eval_set: Annotated[
        str | None,
        typer.Option("--eval-set", help=field_help("eval.eval_set", extra=" JSON or JSONL.")),
    ] = None,
    pairwise: Annotated[
        str | None,
        typer.Option(
            "--pairwise", help=field_help("eval.pairwise", extra=" Comma-separated: finetuned,base.")
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            exists=True,
            help=field_help("eval.prompts"),
        ),
    ] = None,
    no_similarity: Annotated[
        bool, typer.Option("--no-similarity", help=field_help("eval.similarity", lead="Turn off"))
    ] = False,
    no_cache: NoCacheOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Answer the eval set with every candidate and score it: ROUGE, F1, similarity, LLM judge (eval/)."""
    pair = [p.strip() for p in pairwise.split(",")] if pairwise else None
    overrides = {
        "eval.eval_set": eval_set,
        "eval.pairwise": pair,
        "eval.prompts": prompts and str(prompts.resolve()),
    }
    if no_similarity:
        overrides["eval.similarity"] = False
    cfg = _config(config, sets, ("eval",), run_dir=run_dir, **overrides)
    _setup_logging(verbose)
    from doctune.evaluate.stage import run

    _print_summary(run(cfg, progress=RichProgress(), use_cache=not no_cache))


@app.command()
def curate(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    run_dir: RunDirOpt = None,
    mode: Annotated[str | None, typer.Option("--mode", help=field_help("curate.mode"))] = None,
    threshold: Annotated[
        int | None, typer.Option("--threshold", help=field_help("curate.threshold", extra=" 1-5."))
    ] = None,
    eval_set: Annotated[
        str | None,
        typer.Option("--eval-set", help=field_help("curate.eval_set")),
    ] = None,
    no_cache: NoCacheOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Judge, dedup and split qa_raw.jsonl into data.json, train.jsonl and val.jsonl (+ rejects and report)."""
    cfg = _config(
        config,
        sets,
        ("curate",),
        run_dir=run_dir,
        **{"curate.mode": mode, "curate.threshold": threshold, "curate.eval_set": eval_set},
    )
    _setup_logging(verbose)
    from doctune.curate.stage import run

    _print_summary(run(cfg, progress=RichProgress(), use_cache=not no_cache))


@app.command()
def finetune(
    ctx: typer.Context,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    run_dir: RunDirOpt = None,
    output_dir: Annotated[
        str | None,
        typer.Option("--output-dir", help=f"Folder for the adapter (default: {RUN.adapter.path})."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint in the output dir.")
    ] = False,
    from_adapter: Annotated[
        str | None,
        typer.Option("--from-adapter", help="Continue training this adapter (no second adapter on top)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier run's adapter and checkpoints.")
    ] = False,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc", min=1, help="Processes on this machine: starts torchrun (DDP, or finetune.fsdp)."
        ),
    ] = 1,
    verbose: VerboseOpt = False,
) -> None:
    """LoRA fine-tune the student on train.jsonl, val loss on val.jsonl ({run_dir}/adapter)."""
    cfg = _config(config, sets, ("finetune",), run_dir=run_dir)
    _setup_logging(verbose)
    from doctune.finetune import launch
    from doctune.reporting import NullProgress

    if nproc > 1 and not launch.dist_info().distributed:
        from doctune.finetune.train import preflight

        preflight(cfg)
        args = launch.worker_args(sys.argv[1:], launch.value_options(ctx.command))  # as typed, less --nproc
        raise typer.Exit(launch.run_torchrun(nproc, args))
    from doctune.finetune.train import run

    main_process = launch.is_main_process()
    summary = run(
        cfg,
        progress=RichProgress() if main_process else NullProgress(),
        output_dir=output_dir,
        resume=resume,
        from_adapter=from_adapter,
        overwrite=overwrite,
    )
    if main_process:
        _print_summary(summary)


@app.command()
def merge(
    adapter: Annotated[
        Path | None,
        typer.Option("--adapter", exists=True, help=f"Adapter folder (default: {RUN.adapter.path})."),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help=f"Folder for the merged model (default: {RUN.merged}).")
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="Base model (default: the one the adapter was trained on).")
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    run_dir: RunDirOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Merge a LoRA adapter into its base model: one folder of safetensors + tokenizer + chat template."""
    if adapter is None or out_dir is None:
        cfg = _config(config, sets, (), run_dir=run_dir)
        adapter = adapter or cfg.run_folder.adapter.path
        out_dir = out_dir or cfg.run_folder.merged
    _setup_logging(verbose)
    from doctune.finetune.merge import merge as merge_adapter

    _print_summary(merge_adapter(adapter, out_dir, base=base, progress=RichProgress()))


@app.command("serve")
def serve_command(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Base model: a folder, a .gguf file, a hub name, or a name in `models:` of the config.",
        ),
    ],
    adapters: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="NAME=DIR: also serve this LoRA adapter as model NAME (repeatable)."),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option("--served-model-name", help="API name of the base model (default: --model).")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help=field_help("serve.host"))] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help=field_help("serve.port", extra=" 0: a free one.")),
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            "--api-key-env", help="Env var holding the API key that every endpoint but /health needs."
        ),
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="Most requests in one forward pass.")
    ] = 32,
    max_tokens: Annotated[
        int,
        typer.Option(
            "--max-tokens", min=1, help="Largest max_tokens a request may ask for (and the default)."
        ),
    ] = 2048,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="CPU only: torch threads (default: torch's own, every core or OMP_NUM_THREADS).",
        ),
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve the base model and adapters: OpenAI-compatible API at /v1, chat page at /."""
    from doctune.config import DEFAULT_CONFIG_NAME

    has_config = config is not None or Path(DEFAULT_CONFIG_NAME).is_file()
    cfg = _config(config, sets, (), writes_run_dir=False) if has_config else None
    _setup_logging(verbose)
    from doctune.serve.launch import run_server

    run_server(
        cfg,
        model=model,
        adapters=adapters or [],
        served_model_name=served_model_name,
        host=host,
        port=port,
        api_key_env=api_key_env,
        max_batch=max_batch,
        max_tokens=max_tokens,
        threads=threads,
    )


@app.command("chat")
def chat_command(
    model: Annotated[
        str,
        typer.Option(
            "--model", help="Base model folder, .gguf file or hub name; or the model's name on --endpoint."
        ),
    ],
    adapter: Annotated[
        Path | None,
        typer.Option("--adapter", exists=True, help="LoRA adapter folder to chat with (in-process)."),
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="OpenAI-compatible server URL ending in /v1.")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", help="Env var holding the endpoint's API key.")
    ] = None,
    system: Annotated[
        str | None, typer.Option("--system", help="System prompt (default: the adapter's).")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Longest reply.")] = None,
    temperature: Annotated[float, typer.Option("--temperature", min=0, max=2, help="0: greedy.")] = 0.0,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=0.1,
            help="With --endpoint: seconds the server may stay silent before a reply fails.",
        ),
    ] = 60.0,
    verbose: VerboseOpt = False,
) -> None:
    """Chat in the terminal with streaming replies: /reset, /system TEXT, /exit."""
    import contextlib

    if endpoint is not None and adapter is not None:
        raise DoctuneError("--adapter works in-process only; with --endpoint, name the adapter with --model")
    _setup_logging(verbose)
    from doctune.chat import EndpointBackend, LocalBackend, run_chat
    from doctune.serve.launch import api_key_from_env

    if endpoint is not None:
        backend = EndpointBackend(
            endpoint, model, api_key_from_env(api_key_env), idle_timeout=timeout, api_key_env=api_key_env
        )
    else:
        backend = LocalBackend(model, str(adapter) if adapter is not None else None)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    try:
        run_chat(backend, system=system, max_tokens=max_tokens, temperature=temperature)
    finally:
        backend.close()


@app.command("export")
def export_command(
    adapter: Annotated[
        Path | None,
        typer.Option(
            "--adapter", help=f"Adapter folder, or a merged model folder (default: {RUN.adapter.path})."
        ),
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="Base model (default: the one the adapter was trained on).")
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            help=f"GGUF file to write; {{type}} is replaced by the type (default: {RUN.export_gguf}).",
        ),
    ] = None,
    types: Annotated[
        list[str] | None,
        typer.Option("--type", help="f16, q8_0 or f32; repeatable or comma-separated (default: q8_0)."),
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    run_dir: RunDirOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Export the fine-tuned chatbot as GGUF (llama.cpp, Ollama, LM Studio) with an Ollama Modelfile beside it."""
    from doctune.finetune.export import TYPES, export

    wanted = [t.strip() for value in types or ["q8_0"] for t in value.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TYPES]
    if unknown:
        raise typer.BadParameter(f"{unknown[0]!r}: use {', '.join(TYPES)}", param_hint="--type")
    if adapter is None or out is None:
        cfg = _config(config, sets, (), run_dir=run_dir)
        adapter = adapter or cfg.run_folder.adapter.path
        out = out or str(cfg.run_folder.export_gguf)
    _setup_logging(verbose)
    _print_summary(export(adapter, out, types=wanted, base=base, progress=RichProgress()))


@app.command("run")
def run_pipeline(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    run_dir: RunDirOpt = None,
    from_stage: Annotated[
        str | None, typer.Option("--from", help="Start at this stage (and run every stage after it).")
    ] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run just this stage.")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Run every selected stage even if nothing changed.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run ingest → generate → curate → finetune → eval, skipping stages whose inputs and config are unchanged."""
    cfg = _config(config, sets, None, run_dir=run_dir)
    _setup_logging(verbose)
    from doctune import pipeline

    def show(outcome: pipeline.StageOutcome) -> None:
        if outcome.summary is not None:  # a skipped stage was logged by the pipeline
            _print_summary(outcome.summary)

    outcomes = pipeline.run(
        cfg, from_stage=from_stage, only=only, force=force, progress=RichProgress(), on_stage=show
    )
    _print_summary(pipeline.overview(cfg, outcomes))


def _usage_error_types() -> tuple[type[Exception], ...]:
    """Click's exception classes: Typer >= 0.29 raises its vendored copy (`typer._click`), older Typer click's."""
    found: list[type[Exception]] = []
    try:
        from typer._click.exceptions import ClickException as VendoredClickException

        found.append(VendoredClickException)
    except ImportError:
        pass
    try:
        from click.exceptions import ClickException

        found.append(ClickException)
    except ImportError:
        pass
    return tuple(found)


def _exit_types() -> tuple[type[Exception], ...]:
    found: list[type[Exception]] = [typer.Exit, typer.Abort]
    try:
        from click.exceptions import Abort, Exit

        found += [Exit, Abort]
    except ImportError:
        pass
    return tuple(found)


def interrupted_hint(argv: list[str]) -> str:
    """What to tell a user after Ctrl-C: every stage resumes when run again; `finetune` needs --resume.

    >>> interrupted_hint(["finetune", "-c", "x.yaml"])
    'interrupted: run the same command again with --resume to continue from the last checkpoint'
    """
    if "finetune" in argv and "--resume" not in argv:
        return "interrupted: run the same command again with --resume to continue from the last checkpoint"
    return "interrupted: run the same command again to resume"


def _interrupted() -> None:
    console.print(interrupted_hint(sys.argv[1:]), highlight=False, markup=False, soft_wrap=True)
    sys.exit(130)


def main() -> None:
    """Entry point: usage errors → click's usage line + one error line, exit 2; DoctuneError → one line on
    stderr and its exit code; Ctrl-C → exit 130 and how to resume. No traceback reaches the user."""
    try:
        code = app(standalone_mode=False)  # Typer turns Ctrl-C inside a command into `return 130`
    except DoctuneError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except _usage_error_types() as exc:
        exc.show()  # type: ignore[attr-defined]
        sys.exit(getattr(exc, "exit_code", 2))
    except _exit_types() as exc:
        code = getattr(exc, "exit_code", 1)
    except (
        OSError
    ) as exc:  # a file or folder the OS refused (permissions, a file where a folder must be, ...)
        where = f": {exc.filename}" if exc.filename else ""
        message = escape((exc.strerror or str(exc)) + where)
        console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
        sys.exit(1)
    if code == 130:
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
