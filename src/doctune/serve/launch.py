"""What `doctune serve` does between parsing its options and running the server: resolve, load, serve."""

from __future__ import annotations

import errno
import logging
import os
import socket

from doctune.config import Config, ServeConfig
from doctune.errors import ConfigError, DoctuneError

log = logging.getLogger(__name__)


def base_model(cfg: Config | None, model: str) -> tuple[str, str, str]:
    """(source, dtype, device) of `--model`: a name in `models:` of the config (an hf model), else a local
    folder (relative to the config's folder when there is a config) or a hub name."""
    if cfg is not None and model in cfg.models:
        entry = cfg.models[model]
        if entry.backend != "hf":
            raise ConfigError(
                [f"--model {model}: models.{model} is an {entry.backend} model; serve needs an hf model"]
            )
        return cfg.model_source(entry.model), entry.dtype, entry.device
    return (cfg.model_source(model) if cfg is not None else model), "auto", "auto"


def api_key_from_env(env_var: str | None) -> str | None:
    """The key held by `env_var` (None when no variable is named). The key itself is never logged."""
    if env_var is None:
        return None
    key = os.environ.get(env_var, "").strip()
    if not key:
        raise ConfigError(
            [f"--api-key-env {env_var}: that environment variable is not set or empty (export it first)"]
        )
    return key


def run_server(
    cfg: Config | None,
    *,
    model: str,
    adapters: list[str],
    served_model_name: str | None = None,
    host: str | None = None,
    port: int | None = None,
    api_key_env: str | None = None,
    max_batch: int = 32,
    max_tokens: int = 2048,
    threads: int | None = None,
) -> None:
    """Load the base model and adapters and serve them until interrupted."""
    defaults = cfg.serve if cfg is not None else ServeConfig()
    api_key = api_key_from_env(api_key_env)
    host = host or defaults.host
    port = free_port(host, port if port is not None else defaults.port)  # at once, not after loading

    from doctune.models import resolve_device
    from doctune.serve.app import serve
    from doctune.serve.engine import Engine
    from doctune.serve.models import parse_adapter_specs

    adapter_dirs = {
        name: str(cfg.path(path)) if cfg else path for name, path in parse_adapter_specs(adapters).items()
    }
    source, dtype, device = base_model(cfg, model)
    if resolve_device(device) == "cpu":
        set_cpu_threads(threads)
    engine = Engine.load(
        source,
        adapter_dirs,
        served_name=served_model_name or model,
        dtype=dtype,
        device=device,
        max_batch=max_batch,
        max_tokens_cap=max_tokens,
    )
    serve(engine, host=host, port=port, api_key=api_key)


def free_port(host: str, port: int) -> int:
    """Check that the server can listen on host:port, at once rather than after the model has loaded; the port
    to serve on (for port 0, the free port the OS picks). DoctuneError in one line when it cannot."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise DoctuneError(
            f"--host {host}: not an address this machine can listen on ({exc.strerror})"
        ) from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DoctuneError(
                    f"--port {port}: already in use on {host} (stop the other server, choose another port, "
                    "or --port 0 for a free one)"
                ) from None
            raise DoctuneError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
        return int(sock.getsockname()[1])


def set_cpu_threads(threads: int | None) -> int:
    """Give torch `threads` CPU threads; None keeps torch's own choice (every physical core, or
    OMP_NUM_THREADS when it is set).

    Measured with 32 streaming clients on a quiet 2-core machine (bench/serve.py): SmolLM2-135M served 147.5
    tokens/s on 2 threads against 118.6 on 1. On a machine that other work keeps busy, fewer threads than cores
    avoid OpenMP's spin-waiting collapse: set --threads or OMP_NUM_THREADS.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    log.info("torch uses %d CPU thread(s)", n)
    return n
