"""Run a doctune command that SIGKILLs itself right before atomic_open renames its temporary file over an
existing file of a chosen name (the worst moment: the new content written in full, the old file not yet
replaced). For tests/reliability/test_kill_rename.py:

    python tests/reliability/kill_rename_runner.py chunks.jsonl ingest -c doctune.yaml

Only this process is patched (doctune.runs' `os.replace`, as atomic_open calls it); doctune has no test hook.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import doctune.runs


class KillBeforeRename:
    """`os` for doctune.runs, except that renaming over an existing file named `name` kills the process."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(os, attr)

    def replace(self, src: str, dst: str | Path) -> None:
        if Path(dst).name == self.name and Path(dst).exists():
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(src, dst)


if __name__ == "__main__":
    doctune.runs.os = KillBeforeRename(sys.argv[1])
    sys.argv = ["doctune", *sys.argv[2:]]
    from doctune.cli import main

    main()
