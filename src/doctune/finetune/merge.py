"""`doctune merge`: base model + LoRA adapter → one full model folder (safetensors + tokenizer + chat template),
loadable by `AutoModelForCausalLM` and any server that does not take adapters. Its greedy outputs equal the base
model's with the adapter on top.

```python
merge("runs/x/adapter", "runs/x/merged")          # base model read from the adapter's doctune_finetune.json
```

Base model, adapter and tokenizer load through doctune.models (a folder, a .gguf file or a hub name); an adapter
of another base model is refused in one line before its weights are read.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from doctune import models
from doctune.adapters import AdapterDir
from doctune.errors import DoctuneError, InputError
from doctune.reporting import NullProgress, Progress, Summary
from doctune.runs import atomic_write_json, check_output_dir, mark_output_dir, sha256_file

log = logging.getLogger(__name__)

MERGE_INFO = "doctune_merge.json"


def merge(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | None = None,
    progress: Progress = NullProgress(),
) -> Summary:
    """Merge the adapter in `adapter_dir` into its base model (or `base`) and write the result to `out_dir`.

    The weights are merged in float32 and saved in the base model's own dtype. The folder is written beside
    `out_dir` and renamed into place, so a crash never leaves half a model; an existing `out_dir` is replaced only
    when doctune wrote it (runs.check_output_dir), else refused before anything is loaded.
    """
    # ---- setup
    t0 = time.perf_counter()
    adapter, out_dir = AdapterDir(adapter_dir).checked(adapter_dir), Path(out_dir)
    adapter_dir = adapter.path
    if out_dir.resolve() == adapter_dir.resolve() or adapter_dir.resolve() in out_dir.resolve().parents:
        raise DoctuneError(f"--out {out_dir}: must not be the adapter folder or inside it")
    check_output_dir(out_dir, "--out", keep=[adapter_dir], ours=[MERGE_INFO])
    from transformers import AutoConfig  # after the checks: a wrong path is reported at once

    base = base or adapter.base_model()
    if base is None:
        raise InputError(f"--adapter {adapter_dir}: records no base model; pass --base MODEL")
    progress.start("merge", total=3)
    try:
        ref = models.resolve(base)
        model = models.load_causal_lm(ref, dtype="float32", device=None)
        saved_dtype = _declared_dtype(AutoConfig.from_pretrained(ref.source))
        progress.advance(1)

        # ---- run
        model = models.load_adapter(model, adapter_dir, base=ref)
        merged = model.merge_and_unload()
        merged.to(saved_dtype)
        merged.config.use_cache = True
        progress.advance(1)

        # ---- write
        tokenizer_source = adapter_dir if adapter.has_tokenizer() else base
        tokenizer = models.load_tokenizer(tokenizer_source)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
            staged = Path(tmp) / "model"
            merged.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
            atomic_write_json(
                staged / MERGE_INFO,
                {
                    "base_model": base,
                    "adapter": str(adapter_dir.resolve()),
                    "adapter_sha256": sha256_file(adapter.weights),
                    "dtype": str(saved_dtype).removeprefix("torch."),
                    "chat_template_from": str(tokenizer_source),
                },
            )
            mark_output_dir(staged, "merge")
            check_output_dir(
                out_dir, "--out", keep=[adapter_dir], ours=[MERGE_INFO]
            )  # again: it may have changed meanwhile
            _swap_in(staged, out_dir)
        progress.advance(1)
    finally:
        progress.finish()
    log.info("merged %s into %s: %s", adapter_dir, base, out_dir)

    summary = Summary(title="merge")
    summary.add("base model", base)
    summary.add("adapter", str(adapter_dir))
    summary.add("parameters", sum(p.numel() for p in merged.parameters()))
    summary.add("dtype", str(saved_dtype).removeprefix("torch."))
    summary.add("seconds", round(time.perf_counter() - t0, 1))
    summary.outputs.append(str(out_dir))
    return summary


def _declared_dtype(config: Any) -> Any:
    """The dtype the base checkpoint declares (config.dtype), float32 when it declares none."""
    import torch

    declared = getattr(config, "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else torch.float32


def _swap_in(staged: Path, target: Path) -> None:
    """Put `staged` at `target`; an existing `target` is removed only after the new folder is in place."""
    if not target.exists():
        staged.rename(target)
        return
    old = staged.parent / "old"
    target.rename(old)
    staged.rename(target)
    shutil.rmtree(old)
