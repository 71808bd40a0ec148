"""A tiny random Llama with a byte-level BPE tokenizer and a Llama-3-style chat template, built offline.

Tests, the quickstart and the benchmarks use it: no network, a second or two on a CPU. It is an ordinary
transformers folder (config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json, chat_template.jinja), so nothing in doctune is special-cased for it.

```python
from doctune.tinymodel import build_tiny_model
build_tiny_model("models/tiny", size="tiny", seed=0)       # ~200k params
AutoModelForCausalLM.from_pretrained("models/tiny"); AutoTokenizer.from_pretrained("models/tiny")
```

The same seed and corpus give byte-identical weights and tokenizer files.
"""

from __future__ import annotations

import logging
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from doctune.errors import DoctuneError
from doctune.reporting import Summary, quiet_library_bars
from doctune.runs import check_output_dir, make_dir, mark_output_dir

log = logging.getLogger(__name__)

CORPUS_SUFFIXES = (".txt", ".md", ".markdown")

# Llama-3-style special tokens. eos is the end-of-turn token, so a model trained on the chat template stops
# after its answer; <|end_of_text|> also stops generation (generation_config.eos_token_id lists both).
BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, END_OF_TEXT, START_HEADER, END_HEADER, EOT, PAD]

# Assistant content *and* its end-of-turn token sit inside {% generation %}, so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks what the model must learn to write.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('roles must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Shapes of the random Llama. Parameter counts below are for the packaged corpus (vocab 1024).
SIZES: dict[str, dict[str, Any]] = {
    # ~205k params: 2 x 64 x 1024 embeddings + 2 layers of ~37k
    "tiny": {
        "vocab": 1024,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
    },
    # ~10M params: big enough for benchmark timings to mean something, small enough for a laptop CPU
    "small": {
        "vocab": 2048,
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "intermediate_size": 1024,
    },
}
MAX_POSITIONS = 8192


def read_corpus(corpus: Path | None) -> list[str]:
    """Texts the tokenizer is trained on: every .txt/.md file under `corpus` (recursively, sorted), or the
    text packaged in doctune.tinymodel_corpus when `corpus` is None."""
    if corpus is None:
        folder = resources.files("doctune") / "tinymodel_corpus"
        files = sorted((f for f in folder.iterdir() if f.name.endswith(".txt")), key=lambda f: f.name)
        texts = [f.read_text(encoding="utf-8") for f in files]
        source = "the packaged corpus (doctune/tinymodel_corpus)"
    else:
        corpus = Path(corpus)
        if not corpus.is_dir():
            raise DoctuneError(f"{corpus}: corpus is not a folder (give a folder of .txt/.md files)")
        files = sorted(p for p in corpus.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES)
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        source = str(corpus)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DoctuneError(f"{source}: no text to train the tokenizer on (add .txt or .md files with text)")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, wrapped as a PreTrainedTokenizerFast with the chat template.

    Byte-level: every string round-trips, whatever its script. Plain `tok(text)` prepends <|begin_of_text|>,
    as Llama 3's tokenizer does; the chat template writes it itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=[END_OF_TEXT, START_HEADER, END_HEADER],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_model(shape: dict[str, Any], tokenizer, seed: int):
    """A LlamaForCausalLM with random weights drawn from `seed` (same seed, same weights)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in (BOS, EOT, END_OF_TEXT, PAD)}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOT], ids[END_OF_TEXT]],
        pad_token_id=ids[PAD],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOT], ids[END_OF_TEXT]],
        pad_token_id=ids[PAD],
        do_sample=False,
    )
    return model


def build_tiny_model(
    out_dir: str | Path, corpus: Path | None = None, size: str = "tiny", seed: int = 0
) -> Summary:
    """Write a random-weight Llama + BPE tokenizer + chat template into `out_dir`, loadable with the Auto classes.

    The folder is written next to `out_dir` first and renamed into place, so a crash never leaves half a model;
    an existing `out_dir` is replaced only when doctune wrote it (runs.check_output_dir), else refused.
    """
    if size not in SIZES:
        raise DoctuneError(f"--size {size!r}: unknown model size (choose one of: {', '.join(SIZES)})")
    shape = SIZES[size]
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if _written_before_markers(out_dir):
        mark_output_dir(out_dir, "tiny-model")
    check_output_dir(out_dir, "tiny-model", keep=[corpus] if corpus else [])
    texts = read_corpus(corpus)

    tokenizer = train_tokenizer(texts, shape["vocab"])
    model = build_model(shape, tokenizer, seed)
    n_params = sum(p.numel() for p in model.parameters())

    make_dir(out_dir.parent)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        staged = Path(tmp) / "model"
        with quiet_library_bars():
            model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / "README.md").write_text(_readme(size, seed, n_params, len(tokenizer)), encoding="utf-8")
        mark_output_dir(staged, "tiny-model")
        check_output_dir(out_dir, "tiny-model")  # again: it may have changed meanwhile
        if out_dir.exists():
            _replace_dir(out_dir, staged)
        else:
            staged.rename(out_dir)
    log.info("tiny model (%s, %d params, vocab %d) written to %s", size, n_params, len(tokenizer), out_dir)

    summary = Summary(title=f"tiny-model ({size})")
    summary.add("parameters", n_params)
    summary.add("vocab size", len(tokenizer))
    summary.add("layers", shape["num_hidden_layers"])
    summary.add("hidden size", shape["hidden_size"])
    summary.add("seed", seed)
    summary.add("seconds", round(time.perf_counter() - started, 2))
    summary.outputs.append(str(out_dir))
    return summary


def _written_before_markers(folder: Path) -> bool:
    """A tiny model written by a doctune older than the output marker: its README.md is this module's."""
    readme = folder / "README.md"
    try:
        return readme.is_file() and readme.read_text(encoding="utf-8").startswith("# doctune tiny model (")
    except (OSError, UnicodeDecodeError):
        return False


def _replace_dir(target: Path, staged: Path) -> None:
    """Swap `staged` into `target`'s place; the old folder is removed only after the new one is there."""
    import shutil

    old = staged.parent / "old"
    target.rename(old)
    staged.rename(target)
    shutil.rmtree(old)


def _readme(size: str, seed: int, n_params: int, vocab: int) -> str:
    return (
        f"# doctune tiny model ({size})\n\n"
        f"Random weights (seed {seed}), {n_params:,} parameters, byte-level BPE vocabulary of {vocab}.\n"
        "Written by `doctune tiny-model` for tests, the quickstart and benchmarks: it produces noise, not answers.\n"
    )
