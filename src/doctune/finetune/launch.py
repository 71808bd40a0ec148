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
from dataclasses import dataclass

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


def finetune_args(
    *,
    config: str | None = None,
    sets: list[str] | None = None,
    run_dir: str | None = None,
    output_dir: str | None = None,
    resume: bool = False,
    from_adapter: str | None = None,
    overwrite: bool = False,
    verbose: bool = False,
) -> list[str]:
    """The `doctune finetune` arguments each torchrun worker gets (everything but --nproc).

    >>> finetune_args(config="doctune.yaml", sets=["finetune.epochs=1"], resume=True)
    ['finetune', '--config', 'doctune.yaml', '--set', 'finetune.epochs=1', '--resume']
    """
    args = ["finetune"]
    if config is not None:
        args += ["--config", str(config)]
    for item in sets or []:
        args += ["--set", item]
    for flag, value in (
        ("--run-dir", run_dir),
        ("--output-dir", output_dir),
        ("--from-adapter", from_adapter),
    ):
        if value is not None:
            args += [flag, str(value)]
    args += [flag for flag, on in (("--resume", resume), ("--overwrite", overwrite), ("-v", verbose)) if on]
    return args


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
