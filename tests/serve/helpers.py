"""Helpers of the server tests: test adapters, a real server in a thread, waiting for the engine to be idle."""

from __future__ import annotations

import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from doctune.tinymodel import CHAT_TEMPLATE

ADAPTER_SYSTEM_PROMPT = "You answer questions about the doctune handbook."
# The "docs" adapter ships its own template: the base one with a visible marker, so tests can tell them apart.
ADAPTER_TEMPLATE = "{{- 'DOCS ADAPTER TEMPLATE ' }}" + CHAT_TEMPLATE
# A request that cannot end early: the grammar needs at least 1000 array items (2000+ tokens) before it may end.
LONG_ANSWER_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "long",
        "schema": {"type": "array", "items": {"type": "integer"}, "minItems": 1000},
    },
}


def make_adapter(base_dir: Path, out_dir: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) A and B, so it changes what the model writes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    with warnings.catch_warnings():  # transformers 5 deprecation noise from inside PEFT
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


class ServerThread:
    """A real uvicorn server for `app` on 127.0.0.1 (a free port), in a background thread."""

    def __init__(self, app: Any):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, backlog=512)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@contextmanager
def running(app: Any) -> Iterator[ServerThread]:
    with ServerThread(app) as server:
        yield server


def wait_idle(engine: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while engine.pending():
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine still has {engine.pending()} requests after {timeout}s")
        time.sleep(0.01)
