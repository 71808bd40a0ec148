"""`doctune export`: adapter (+ its base) → merged model → one GGUF file per type, with its tokenizer and chat
template, plus an Ollama Modelfile beside each, so the fine-tuned chatbot runs in llama.cpp, Ollama and LM Studio.

```python
export("runs/x/adapter", "runs/x/export/chatbot-{type}.gguf", types=["f16", "q8_0"])
```

The adapter is merged into its base by `doctune.finetune.merge` (into a temporary folder beside the output); a folder
that already holds a full model (`doctune merge` output) is exported as it is. The merged Llama is then written with
the `gguf` package under llama.cpp's names and layout: tensor names from `gguf.TensorNameMap`, the rows of
q_proj/k_proj reordered for llama.cpp's rotary embedding, 1-D tensors (norms) kept in float32, `output` left out when
the embeddings are tied, the byte-level BPE vocabulary with its merges, special tokens and chat template. Tensors are
converted and written one at a time, so memory holds one tensor beyond the merged model's files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doctune.adapters import ADAPTER_CONFIG, AdapterDir
from doctune.errors import DoctuneError, InputError
from doctune.reporting import NullProgress, Progress, Summary
from doctune.runs import atomic_write_text

log = logging.getLogger(__name__)

# --type name -> (GGMLQuantizationType name of 2-D tensors, LlamaFileType name written as general.file_type)
TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}
TYPE_PLACEHOLDER = "{type}"
# Written first in every file doctune exports; a file at the output path without it is not replaced.
MARKER_KEY = "doctune.version"
MODELFILE_HEADER = "# Ollama Modelfile written by doctune export."
SUPPORTED_ROPE = ("default", "llama3")
MODEL_CONFIG = "config.json"  # a full model folder (transformers)


def export(
    adapter_dir: str | Path,
    out: str | Path,
    *,
    types: Sequence[str] = ("q8_0",),
    base: str | None = None,
    progress: Progress = NullProgress(),
) -> Summary:
    """Merge the adapter in `adapter_dir` into its base (or `base`) and write one GGUF file per type in `types`
    (f32, f16, q8_0) plus an Ollama Modelfile beside each (`<file stem>.Modelfile`).

    `out` is the .gguf path; with several types it must hold `{type}`, replaced by each type. A folder with a full
    model (config.json, no adapter_config.json) is exported without merging. An existing file at an output path is
    replaced only if doctune export wrote it.
    """
    from doctune.finetune.merge import merge

    # ---- setup
    t0 = time.perf_counter()
    adapter = AdapterDir(adapter_dir)
    adapter_dir = adapter.path
    targets = output_paths(out, types)
    is_full_model = (adapter_dir / MODEL_CONFIG).is_file() and not adapter.exists()
    if not is_full_model and not adapter.exists():
        raise InputError(
            f"--adapter {adapter_dir}: no {ADAPTER_CONFIG} there (give the folder finetune wrote, "
            "or a merged model folder)"
        )
    for path in targets.values():
        refuse_foreign_file(path)
        refuse_foreign_file(modelfile_path(path))
    if is_full_model and base:
        log.warning("--base %s is ignored: %s is a full model, exported as it is", base, adapter_dir)
    system = adapter.system_prompt()  # None for a full model or an adapter doctune did not train
    for path in targets.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    first = next(iter(targets.values()))
    summary = Summary(title="export")
    summary.add("adapter" if not is_full_model else "model", str(adapter_dir))

    # ---- run
    with tempfile.TemporaryDirectory(prefix=".doctune-export-", dir=first.parent) as tmp:
        if is_full_model:
            model_dir, base = adapter_dir, None
        else:
            model_dir = Path(tmp) / "merged"
            base = str(dict(merge(adapter_dir, model_dir, base=base, progress=progress).rows)["base model"])
            summary.add("base model", base)
        provenance = {"adapter": str(adapter_dir.resolve()), "base_model": base or str(adapter_dir)}
        for gguf_type, path in targets.items():
            t_type = time.perf_counter()
            written = write_gguf(
                model_dir, path, gguf_type, name=_model_name(out), provenance=provenance, progress=progress
            )
            # ---- write
            modelfile = _write_modelfile(path, written, system, summary.warnings)
            seconds = round(time.perf_counter() - t_type, 1)
            size_mb = round(path.stat().st_size / 1e6, 1)
            summary.add(f"{gguf_type} file", f"{path.name} ({size_mb} MB, {seconds} s)")
            summary.outputs += [str(path), str(modelfile)]
            if written.kept_f16:
                names = ", ".join(written.kept_f16[:3]) + (", ..." if len(written.kept_f16) > 3 else "")
                summary.warnings.append(
                    f"{path.name}: {len(written.kept_f16)} tensor(s) kept in f16, their rows are not a multiple "
                    f"of 32 ({names})"
                )
    summary.add("tensors", written.n_tensors)
    summary.add("seconds", round(time.perf_counter() - t0, 1))
    log.info("exported %s to %s", adapter_dir, ", ".join(str(p) for p in targets.values()))
    return summary


def _write_modelfile(gguf_path: Path, written: Written, system: str | None, warnings: list[str]) -> Path:
    """The Ollama Modelfile beside `gguf_path`: TEMPLATE when the chat format can be derived, stop tokens, and
    the training system prompt (else the template's own default)."""
    chat = derive_chat_format(written.tokenizer)
    if chat is None:
        warnings.append(
            f"{modelfile_path(gguf_path).name}: no TEMPLATE (the chat template is not ChatML/Llama-3-like); "
            "Ollama picks one matching the GGUF's tokenizer.chat_template"
        )
    bos = written.tokenizer.bos_token if written.adds_bos else None
    system = system or (chat.default_system if chat else None)
    path = modelfile_path(gguf_path)
    atomic_write_text(path, modelfile_text(gguf_path.name, chat, written.stop_tokens, system, bos=bos))
    return path


def output_paths(out: str | Path, types: Sequence[str]) -> dict[str, Path]:
    """The .gguf path of each type: `out` with `{type}` replaced.

    >>> output_paths("x/chatbot-{type}.gguf", ["f16", "q8_0"])["q8_0"].name
    'chatbot-q8_0.gguf'
    """
    wanted = [t.strip().lower() for t in types if t.strip()]
    if not wanted:
        raise DoctuneError(f"--type: give at least one of {', '.join(TYPES)}")
    unknown = [t for t in wanted if t not in TYPES]
    if unknown:
        raise DoctuneError(f"--type {unknown[0]}: unknown GGUF type; use {', '.join(TYPES)}")
    wanted = list(dict.fromkeys(wanted))
    out = str(out)
    if not out.endswith(".gguf"):
        raise DoctuneError(f"--out {out}: give a file name ending in .gguf")
    if len(wanted) > 1 and TYPE_PLACEHOLDER not in out:
        raise DoctuneError(f"--out {out}: several --type values need {TYPE_PLACEHOLDER} in the file name")
    return {t: Path(out.replace(TYPE_PLACEHOLDER, t)) for t in wanted}


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")


def refuse_foreign_file(path: Path) -> None:
    """Raise unless `path` is absent or a file doctune export wrote (a GGUF with its marker, a Modelfile with its
    header line)."""
    if not path.exists():
        return
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        ours = (
            head.startswith(b"GGUF") and MARKER_KEY.encode() in head
            if path.suffix == ".gguf"
            else head.startswith(MODELFILE_HEADER.encode())
        )
        if ours:
            return
    raise DoctuneError(
        f"{path}: exists and was not written by doctune export; choose another --out or move it"
    )


# ------------------------------------------------------------------------------------------------ GGUF writing


@dataclass
class Written:
    """What `write_gguf` wrote: tensor count, tensors that could not be q8_0, the tokenizer and stop tokens."""

    n_tensors: int
    kept_f16: list[str]
    tokenizer: Any
    stop_tokens: list[str]
    adds_bos: bool


@dataclass
class _Planned:
    gguf_name: str
    hf_name: str
    file: Path
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: tuple[int, int] | None = None  # (n_head, n_head_kv) for q_proj / k_proj


def write_gguf(
    model_dir: str | Path,
    path: str | Path,
    gguf_type: str,
    *,
    name: str,
    provenance: dict[str, str] | None = None,
    progress: Progress = NullProgress(),
) -> Written:
    """Write the Llama model in `model_dir` (config.json, safetensors, tokenizer) as one GGUF file of `gguf_type`
    at `path`, atomically (temp file beside it, then rename)."""
    import gguf
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    from doctune import __version__

    model_dir, path = Path(model_dir), Path(path)
    config = AutoConfig.from_pretrained(str(model_dir))
    hparams = llama_hparams(config, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    plan, kept_f16 = _plan_tensors(model_dir, config, hparams, gguf_type)

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_string(MARKER_KEY, __version__)
    for key, value in (provenance or {}).items():
        writer.add_string(f"doctune.{key}", value)
    _add_model_metadata(writer, hparams, name, gguf_type)
    adds_bos = _add_tokenizer(writer, model_dir, tokenizer, hparams["vocab_size"])
    extra = _rope_factors(hparams)
    if extra is not None:
        writer.add_tensor_info("rope_freqs.weight", extra.shape, extra.dtype, extra.nbytes)
    for p in plan:
        shape = _safetensors_shape(p.file, p.hf_name)
        if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if p.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(
                p.gguf_name, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize
            )
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, p.qtype)
            writer.add_tensor_info(
                p.gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), p.qtype
            )

    progress.start(f"export {gguf_type}", total=len(plan))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # the usual permissions, not mkstemp's 0600
        os.close(fd)
        with _quiet("gguf", logging.WARNING):
            try:
                writer.write_header_to_file(path=Path(tmp))
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                if extra is not None:
                    writer.write_tensor_data(extra)
                for array in _converted_tensors(plan):
                    writer.write_tensor_data(array)
                    progress.advance(1)
            finally:
                writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        progress.finish()
    log.info("wrote %s: %d tensors, %s", path, len(plan), gguf_type)
    stops = _stop_tokens(model_dir, config, tokenizer)
    return Written(len(plan) + (extra is not None), kept_f16, tokenizer, stops, adds_bos)


def llama_hparams(config: Any, model_dir: Path) -> dict[str, Any]:
    """The numbers llama.cpp needs from a Llama config; a one-line error for any other architecture or a Llama
    variant it would run wrongly (biases, an unknown RoPE scaling)."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise InputError(
            f"{model_dir}: architecture {model_type!r}; doctune export writes Llama models only "
            "(LlamaForCausalLM, e.g. SmolLM2, Llama 3)"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise InputError(
            f"{model_dir}: a Llama with attention/MLP biases; doctune export writes bias-free Llama only"
        )
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE:
        raise InputError(
            f"{model_dir}: RoPE scaling {rope_type!r}; doctune export supports {', '.join(SUPPORTED_ROPE)}"
        )
    n_head = config.num_attention_heads
    return {
        "n_layer": config.num_hidden_layers,
        "n_ctx": config.max_position_embeddings,
        "n_embd": config.hidden_size,
        "n_ff": config.intermediate_size,
        "n_head": n_head,
        "n_head_kv": getattr(config, "num_key_value_heads", None) or n_head,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // n_head,
        "rope_theta": float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0),
        "rope": rope | {"rope_type": rope_type},
        "rms_eps": float(config.rms_norm_eps),
        "vocab_size": config.vocab_size,
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _add_model_metadata(writer: Any, hp: dict[str, Any], name: str, gguf_type: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(hp["n_ctx"])
    writer.add_embedding_length(hp["n_embd"])
    writer.add_block_count(hp["n_layer"])
    writer.add_feed_forward_length(hp["n_ff"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["rms_eps"])
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["n_embd"] // hp["n_head"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_file_type(gguf.LlamaFileType[TYPES[gguf_type][1]])
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_factors(hp: dict[str, Any]) -> Any:
    """Llama 3.1-style RoPE scaling as llama.cpp takes it: one frequency divisor per rotary dimension pair
    (`rope_freqs.weight`); None for plain RoPE.

    Wavelengths shorter than original_context / high_freq_factor keep their frequency, longer than
    original_context / low_freq_factor are divided by `factor`, and those between are interpolated smoothly.
    """
    import numpy as np

    rope = hp["rope"]
    if rope["rope_type"] != "llama3":
        return None
    dim, theta = hp["head_dim"], hp["rope_theta"]
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings", 8192))
    wavelengths = 2 * math.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = (original / wavelengths - low) / (high - low)
    between = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(
        wavelengths < original / high, 1.0, np.where(wavelengths > original / low, factor, between)
    )
    return divisors.astype(np.float32)


# --- tensors


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file or an index of shards)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise InputError(f"{model_dir}: no model.safetensors (or index) to export")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _plan_tensors(
    model_dir: Path, config: Any, hp: dict[str, Any], gguf_type: str
) -> tuple[list[_Planned], list[str]]:
    """Every tensor to write, in file order, with its GGUF name and type; also the names that fall back to f16."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["n_layer"])
    wanted = gguf.GGMLQuantizationType[TYPES[gguf_type][0]]
    plan, kept_f16 = [], []
    for hf_name, file in sorted(_weight_files(model_dir).items(), key=lambda kv: _layer_order(kv[0])):
        if hf_name.endswith("rotary_emb.inv_freq") or (hp["tied"] and hf_name == "lm_head.weight"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InputError(f"{model_dir}: tensor {hf_name!r} has no llama.cpp name; is this a plain Llama?")
        shape = _safetensors_shape(file, hf_name)
        qtype = wanted
        if len(shape) == 1:
            qtype = gguf.GGMLQuantizationType.F32
        elif wanted == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0]:
            qtype = gguf.GGMLQuantizationType.F16
            kept_f16.append(gguf_name)
        heads = None
        if gguf_name.endswith("attn_q.weight"):
            heads = (hp["n_head"], hp["n_head"])
        elif gguf_name.endswith("attn_k.weight"):
            heads = (hp["n_head"], hp["n_head_kv"])
        plan.append(_Planned(gguf_name, hf_name, file, qtype, heads))
    if kept_f16:
        log.info("kept in f16 (rows not a multiple of 32, q8_0 needs that): %s", ", ".join(kept_f16))
    return plan, kept_f16


def _layer_order(name: str) -> tuple[int, str]:
    """Embeddings first, then layer by layer, then the rest (the order llama.cpp's converter writes)."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match:
        return (int(match.group(1)) + 1, name)
    return (0 if "embed_tokens" in name else 1 << 30, name)


def _safetensors_shape(file: Path, name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return tuple(f.get_slice(name).get_shape())


def _converted_tensors(plan: list[_Planned]) -> Iterator[Any]:
    """Each planned tensor read, reordered where needed, and converted to its GGUF type (one at a time)."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    for p in plan:
        with safe_open(str(p.file), framework="pt") as f:
            array = f.get_tensor(p.hf_name).to(torch.float32).numpy()
        if p.permute_heads is not None:
            array = interleave_rotary_halves(array, *p.permute_heads)
        if p.qtype == gguf.GGMLQuantizationType.F32:
            yield np.ascontiguousarray(array, dtype=np.float32)
        elif p.qtype == gguf.GGMLQuantizationType.F16:
            yield np.ascontiguousarray(array, dtype=np.float16)
        else:
            yield gguf.quants.quantize(np.ascontiguousarray(array), p.qtype)


def interleave_rotary_halves(weight: Any, n_head: int, n_head_kv: int) -> Any:
    """Reorder the output rows of a q_proj/k_proj weight from transformers' rotary layout to llama.cpp's.

    transformers rotates the first half of each head's dimensions against the second half; llama.cpp rotates
    neighbouring pairs. Per head, row i of the first half and row i of the second half become rows 2i and 2i+1.
    k_proj has `n_head_kv` heads (grouped-query attention), q_proj `n_head`.

    >>> import numpy as np
    >>> interleave_rotary_halves(np.arange(4.0).reshape(4, 1), 1, 1).ravel().tolist()
    [0.0, 2.0, 1.0, 3.0]
    """
    heads = n_head_kv if n_head_kv != n_head else n_head
    rows = weight.shape[0]
    halves = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])  # head, half, index, ...
    return halves.swapaxes(1, 2).reshape(weight.shape)  # head, index, half, ...


# --- tokenizer


def _add_tokenizer(writer: Any, model_dir: Path, tokenizer: Any, vocab_size: int) -> bool:
    """The byte-level BPE vocabulary as llama.cpp reads it ("gpt2" model): tokens, types, merges, special token
    ids, whether BOS/EOS are added, the pre-tokenizer's name and the chat template. Returns whether BOS is added."""
    import gguf

    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise InputError(
            f"{model_dir}: no tokenizer.json (doctune export needs a fast byte-level BPE tokenizer)"
        )
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    if (spec.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise InputError(
            f"{tokenizer_json}: not a byte-level BPE tokenizer; doctune export supports GPT-2-style byte-level "
            "BPE (SmolLM2, Llama 3), not sentencepiece"
        )
    tokens, token_types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer"), tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    # it warns about pair templates (two sequences), which a chat model never uses
    with _quiet("gguf.vocab", logging.ERROR):
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    probe = tokenizer("a").input_ids
    special.add_special_token["bos"] = (
        tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    )
    special.add_special_token["eos"] = (
        tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
    )
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    return special.add_special_token["bos"]


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id (padded to the model's vocab size) and their llama.cpp token types: added special
    tokens are CONTROL, other added tokens USER_DEFINED, ids without a token UNUSED."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            looks_special = added[i].content.startswith("<|") and added[i].content.endswith("|>")
            types.append(
                gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


# llama.cpp's names for the byte-level pre-tokenizers doctune recognises in tokenizer.json
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer_name(pre: dict[str, Any] | None, source: Path | str = "tokenizer.json") -> str:
    """The llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) that splits text as this tokenizer.json does.

    >>> pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True})
    'gpt-2'
    """
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space")
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe"
    raise InputError(
        f"{source}: pre-tokenizer {kinds or None} is not one llama.cpp names; doctune export supports GPT-2 "
        "byte-level, SmolLM (digits + byte-level) and Llama 3 splitting"
    )


def _stop_tokens(model_dir: Path, config: Any, tokenizer: Any) -> list[str]:
    """Tokens that end a reply: the tokenizer's eos and every eos id of the generation config."""
    ids: list[int] = []
    for source in (model_dir / "generation_config.json", model_dir / MODEL_CONFIG):
        if source.is_file():
            value = json.loads(source.read_text(encoding="utf-8")).get("eos_token_id")
            ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    stops += [tokenizer.convert_ids_to_tokens(i) for i in ids]
    return list(dict.fromkeys(s for s in stops if s))


# ------------------------------------------------------------------------------------------------ Modelfile


@dataclass
class ChatFormat:
    """A chat template of the form  start + Σ (head(role) + content + end) [+ generation prompt], where
    head(role) = before_role + role + after_role (ChatML, Llama 3 and their kin)."""

    start: str
    before_role: str
    after_role: str
    end: str
    generation_prompt: str
    default_system: str | None = None
    stop_in_end: list[str] = field(default_factory=list)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = self.start + "".join(
            f"{self.before_role}{m['role']}{self.after_role}{m['content']}{self.end}" for m in messages
        )
        return text + (self.generation_prompt if add_generation_prompt else "")

    def go_template(self, drop_start: bool) -> str:
        """The same format in Ollama's Go template syntax, over `.Messages` (Ollama puts SYSTEM first)."""
        return (
            ("" if drop_start else self.start)
            + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            + f"{self.before_role}{{{{ .Role }}}}{self.after_role}{{{{ .Content }}}}{self.end}"
            + f'{{{{ if and $last (ne .Role "assistant") }}}}{self.generation_prompt}{{{{ end }}}}{{{{ end }}}}'
        )


_SENTINEL = {"system": "DOCTUNESYSTEM7", "user": "DOCTUNEUSER7", "assistant": "DOCTUNEASSISTANT7"}


def derive_chat_format(tokenizer: Any) -> ChatFormat | None:
    """Read the chat format off the tokenizer's template by rendering probe conversations; None when the template
    is not of the head(role) + content + end kind, or renders any probe differently from the derived format."""
    from jinja2 import TemplateError

    if not tokenizer.chat_template:
        return None

    def render(roles: list[str], gen: bool = False) -> str:
        messages = [{"role": r, "content": _SENTINEL[r]} for r in roles]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    try:
        full = render(["system", "user", "assistant"])
        fmt = _format_from(full, render(["system", "user"], gen=True), render(["system", "user"]))
        if fmt is None:
            return None
        fmt.default_system = _default_system(fmt, render(["user", "assistant"]))
        probes = [
            (["system", "user", "assistant", "user"], True),
            (["system", "user"], True),
            (["system", "user", "assistant"], False),
        ]
        for roles, gen in probes:
            messages = [{"role": r, "content": _SENTINEL[r]} for r in roles]
            if fmt.render(messages, gen) != render(roles, gen):
                return None
    except (TemplateError, TypeError, ValueError) as exc:
        log.info("chat template not derivable for the Modelfile: %s", exc)
        return None
    if "{{" in fmt.before_role + fmt.after_role + fmt.end + fmt.generation_prompt + fmt.start:
        return None
    fmt.stop_in_end = [t for t in tokenizer.all_special_tokens if t and t in fmt.end]
    return fmt


def _format_from(full: str, with_prompt: str, without_prompt: str) -> ChatFormat | None:
    """Split a rendered [system, user, assistant] conversation into start, head(role) and end."""
    s, u, a = (_SENTINEL[r] for r in ("system", "user", "assistant"))
    if not all(full.count(x) == 1 for x in (s, u, a)) or not with_prompt.startswith(without_prompt):
        return None
    head_sys, rest = full.split(s)
    sys_to_user, rest = rest.split(u)
    user_to_asst, end = rest.split(a)
    if not end or not sys_to_user.startswith(end) or not user_to_asst.startswith(end):
        return None
    head_user, head_asst = sys_to_user[len(end) :], user_to_asst[len(end) :]
    if head_user.count("user") != 1:
        return None
    before, after = head_user.split("user")
    if head_asst != f"{before}assistant{after}" or not head_sys.endswith(f"{before}system{after}"):
        return None
    start = head_sys[: len(head_sys) - len(f"{before}system{after}")]
    return ChatFormat(start, before, after, end, with_prompt[len(without_prompt) :])


def _default_system(fmt: ChatFormat, rendered: str) -> str | None:
    """The system prompt the template inserts when a conversation has none (SmolLM2 does), else None."""
    head = fmt.start + f"{fmt.before_role}system{fmt.after_role}"
    if not rendered.startswith(head):
        return None
    rest = rendered[len(head) :]
    cut = rest.find(fmt.end + f"{fmt.before_role}user{fmt.after_role}")
    return rest[:cut] if cut > 0 else None


def modelfile_text(
    gguf_name: str,
    chat: ChatFormat | None,
    stop_tokens: list[str],
    system: str | None,
    *,
    bos: str | None = None,
) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` in the same folder. `bos`: the BOS token when the GGUF
    says to add it (Ollama then writes it itself, so the TEMPLATE leaves it out)."""
    lines = [
        MODELFILE_HEADER,
        f"# Load it with: ollama create <name> -f {Path(gguf_name).stem}.Modelfile",
        f"FROM ./{gguf_name}",
    ]
    if chat is not None:
        lines.append(f'TEMPLATE """{chat.go_template(drop_start=chat.start == bos)}"""')
    else:
        lines.append("# No TEMPLATE: Ollama picks the one matching the GGUF's tokenizer.chat_template.")
    for stop in dict.fromkeys([*(chat.stop_in_end if chat else []), *stop_tokens]):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    if system and '"""' not in system:
        lines.append(f'SYSTEM """{system}"""')
    elif system:
        log.warning('the system prompt holds """, which a Modelfile cannot quote; no SYSTEM line written')
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ helpers


def _model_name(out: str | Path) -> str:
    """general.name: the output file's stem without the type (`chatbot-{type}.gguf` -> `chatbot`)."""
    stem = Path(str(out)).name.removesuffix(".gguf")
    return re.sub(r"[-_.]?\{type\}", "", stem) or "chatbot"


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; set it back at once
    os.umask(mask)
    return mask


@contextmanager
def _quiet(logger_name: str, level: int) -> Iterator[None]:
    """Raise a library logger's level for a block (the gguf package logs every step at INFO)."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(max(level, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)
