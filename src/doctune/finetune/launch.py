"""Distributed fine-tuning: `doctune finetune --nproc N` starts torchrun, which runs `doctune finetune` once per
process. The same happens when a user runs `torchrun --nproc-per-node N -m doctune finetune ...` directly
(multi-node: add torchrun's rendezvous flags).

Each process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment torchrun sets; the Trainer then runs DDP
(gloo on CPU, nccl on CUDA) or, with `finetune.fsdp: full_shard` on CUDA, FSDP through accelerate. Only rank 0
writes files and draws progress.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not started by torchrun)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def is_main_process() -> bool:
    """True unless this is a torchrun worker other than rank 0 (those draw no progress and print nothing)."""
    return dist_info().is_main


NPROC = "--nproc"


def worker_args(argv: Sequence[str], value_options: Collection[str] = ()) -> list[str]:
    """The arguments each torchrun worker gets: the `doctune` command line as the user typed it (`argv`, without
    the program name) less `--nproc N` / `--nproc=N`, so every other flag, a new one too, reaches the workers
    unchanged. `value_options`: the options that take a value (see `value_options`), whose value is kept even
    when it reads `--nproc`. Everything after `--` is kept.

    >>> worker_args(["finetune", "-c", "x.yaml", "--nproc", "2", "--set", "finetune.lr=1e-4", "--resume"])
    ['finetune', '-c', 'x.yaml', '--set', 'finetune.lr=1e-4', '--resume']
    >>> worker_args(["finetune", "--nproc=4", "--output-dir", "--nproc"], {"--output-dir"})
    ['finetune', '--output-dir', '--nproc']
    """
    args: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token == "--":
            args += [token, *tokens]
        elif token == NPROC:
            next(tokens, None)
        elif not token.startswith(f"{NPROC}="):
            args.append(token)
            value = next(tokens, None) if token in value_options else None
            if value is not None:
                args.append(value)
    return args


def value_options(command: Any) -> set[str]:
    """The option strings of a click/Typer command's options that take a value (`--set`, `-c`, ...)."""
    return {
        opt
        for param in getattr(command, "params", [])
        if getattr(param, "opts", None)
        and not getattr(param, "is_flag", False)
        and not getattr(param, "count", False)
        for opt in [*param.opts, *getattr(param, "secondary_opts", [])]
        if opt.startswith("-")
    }


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m doctune ARGS` (the same Python)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "doctune",
        *args,
    ]


def run_torchrun(nproc: int, args: list[str]) -> int:
    """Run `doctune ARGS` in `nproc` processes on this machine and wait; returns torchrun's exit code."""
    cmd = torchrun_command(nproc, args)
    log.info("starting %d processes: %s", nproc, " ".join(cmd))
    env = dict(os.environ)
    # torchrun would set 1 thread per process with a warning; say it ourselves unless the user chose.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)
