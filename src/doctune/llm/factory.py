"""Build the LLM a stage asks for by name: the backend of `models.NAME`, behind the run's response cache.

```python
llm = build_llm(cfg, "teacher")                                  # openai backend + run_dir/cache.sqlite
llm = build_llm(cfg, "student", adapter="{run_dir}/adapter")     # hf backend with a PEFT adapter
llm = build_llm(cfg, "judge", use_cache=False)                   # --no-cache
```

Backends are imported here, when asked for, so a stage that only talks to a server never imports torch.
"""

from __future__ import annotations

from pathlib import Path

from doctune.config import Config
from doctune.errors import ConfigError
from doctune.llm.base import LLM
from doctune.llm.cache import CachedLLM, ResponseCache


def build_llm(
    cfg: Config,
    name: str,
    *,
    adapter: str | None = None,
    use_cache: bool = True,
    cache_path: Path | None = None,
) -> LLM:
    """The model `cfg.models[name]` (with `adapter`, or the model's own `adapter:`, resolved by cfg.path),
    wrapped in the response cache at `cache_path` (default run_dir/cache.sqlite) unless `use_cache` is False."""
    if name not in cfg.models:
        known = ", ".join(sorted(cfg.models)) or "(none)"
        raise ConfigError([f"models.{name}: no such model (defined: {known})"])
    model_cfg = cfg.models[name]
    label = f"models.{name}"
    if model_cfg.backend == "openai":
        from doctune.llm.openai_backend import OpenAIBackend

        backend: LLM = OpenAIBackend(model_cfg, label=label)
    else:
        from doctune.llm.hf_backend import HFBackend

        adapter = adapter or model_cfg.adapter
        adapter_path = cfg.path(adapter) if adapter else None
        backend = HFBackend(model_cfg, adapter=adapter_path, model_path=cfg.model_source(model_cfg.model))
    if not use_cache:
        return backend
    cache = ResponseCache(cache_path if cache_path is not None else cfg.run_folder.cache)
    # Cache keys use the backend's name: the model for openai; for hf the model path plus the adapter's
    # digest, so a retrained adapter never gets the answers of the one before it.
    return CachedLLM(backend, cache)
