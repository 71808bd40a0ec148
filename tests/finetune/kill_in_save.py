"""Run `doctune ARGS`, killed (SIGKILL) while the Trainer writes the checkpoint of step STEP: trainer_state.json,
the last file a checkpoint gets, is left half-written, as a kill at that moment leaves it.

    python tests/finetune/kill_in_save.py STEP finetune -c doctune.yaml ...

A test helper (tests/finetune/test_resume.py): the patch lives here, not in doctune.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys


def main() -> None:
    from transformers import TrainerState

    step = int(sys.argv[1])
    save_to_json = TrainerState.save_to_json

    def save_then_die(self: TrainerState, json_path: str) -> None:
        if self.global_step != step:
            save_to_json(self, json_path)
            return
        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(text[: len(text) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    TrainerState.save_to_json = save_then_die  # type: ignore[method-assign]
    sys.argv = ["doctune", *sys.argv[2:]]
    from doctune.cli import main as doctune

    doctune()


if __name__ == "__main__":
    main()
