"""In-process transformers backend (+ optional PEFT adapter): the embedded default, no server needed.

```python
llm = HFBackend(cfg.models["student"], adapter=run_dir / "adapter", model_path=cfg.model_source(...))
await llm.preflight()                     # loads now; LLMError (one line) if the model or adapter cannot load
replies = await asyncio.gather(*(llm.chat(m, max_tokens=256) for m in conversations))
```

Concurrent `chat()` calls are gathered into batches: requests with the same max_tokens, temperature, schema and
stop strings share one left-padded `generate()` of up to `max_concurrency` rows, run in a worker thread so the
event loop stays free; requests that arrive while a batch runs form the next one. Greedy when temperature is 0.
JSON schemas are enforced with xgrammar (llm/grammar.py).

Model, tokenizer and adapter are loaded through doctune.models (a folder, a .gguf file or a hub name; device
and dtype resolved there; any failure one LLMError line). The adapter is always active, so `generate()` never gets
`adapter_names`: PEFT's per-call forward hooks (which PEFT issue #3475 leaves behind when a call raises) are
never installed, and a failed batch leaves the model as it was.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doctune.config import ModelConfig
from doctune.errors import DoctuneError, LLMError
from doctune.llm.base import Completion, RequestFailed
from doctune.runs import sha256_file, sha256_text

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_digest(adapter: Path) -> str:
    """Short sha256 of an adapter's weights and config: a re-trained adapter gets a new backend name (and so
    new cache keys). "missing" when the folder holds no adapter weights."""
    weights = next((adapter / f for f in ADAPTER_FILES if (adapter / f).is_file()), None)
    if weights is None:
        return "missing"
    config = adapter / "adapter_config.json"
    parts = [sha256_file(weights), sha256_file(config) if config.is_file() else ""]
    return sha256_text("+".join(parts))[:12]


def backend_name(model_path: str, adapter: Path | None) -> str:
    """`hf:MODEL` or `hf:MODEL+ADAPTER_FOLDER@DIGEST`."""
    name = f"hf:{model_path}"
    if adapter is not None:
        name += f"+{adapter.name}@{adapter_digest(adapter)}"
    return name


@dataclass
class _Request:
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float
    json_schema: dict[str, Any] | None
    stop: tuple[str, ...]
    future: asyncio.Future[Completion]
    batch_key: str = field(init=False)

    def __post_init__(self) -> None:
        params = [self.max_tokens, self.temperature, self.json_schema, self.stop]
        self.batch_key = json.dumps(params)


@dataclass
class _Loaded:
    """A model ready to generate: weights on their device, tokenizer, stop tokens, grammar compiler."""

    model: Any
    tokenizer: Any
    device: str
    eos_ids: set[int]
    pad_id: int
    max_positions: int | None
    _grammars: Any = None

    def grammars(self) -> Any:
        if self._grammars is None:
            from doctune.llm.grammar import SchemaGrammars

            self._grammars = SchemaGrammars(
                self.tokenizer,
                vocab_size=self.model.config.get_text_config().vocab_size,
                stop_token_ids=sorted(self.eos_ids),
            )
        return self._grammars


class HFBackend:
    """The LLM protocol over a transformers model in this process (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, adapter: str | Path | None = None, model_path: str | None = None):
        self.cfg = cfg
        self.model_path = str(model_path or cfg.model)
        adapter = adapter if adapter is not None else cfg.adapter
        self.adapter = Path(adapter).expanduser() if adapter else None
        self.name = backend_name(self.model_path, self.adapter)
        self.max_batch = cfg.max_concurrency
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0}
        self._loaded: _Loaded | None = None
        self._load_lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self._pending: list[_Request] = []
        self._dispatcher: asyncio.Task[None] | None = None

    async def preflight(self) -> None:
        """Load the model (and adapter) now; LLMError with one line if that fails."""
        await asyncio.to_thread(self._load)

    async def count_tokens(self, text: str) -> int:
        """Tokens of `text` under this model's tokenizer, without special tokens (loads the model if needed)."""
        await asyncio.to_thread(self._load)
        loaded = self._loaded
        if loaded is None:
            raise LLMError(f"{self.name}: the model was closed (aclose) before its tokens could be counted")
        return len(loaded.tokenizer.encode(text, add_special_tokens=False))

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        stop: list[str] | None = None,
    ) -> Completion:
        if max_tokens < 1:
            raise RequestFailed(f"max_tokens must be at least 1, got {max_tokens}")
        loop = asyncio.get_running_loop()
        request = _Request(
            messages, max_tokens, float(temperature), json_schema, tuple(stop or ()), loop.create_future()
        )
        self._pending.append(request)
        if self._dispatcher is None or self._dispatcher.done() or self._dispatcher.get_loop() is not loop:
            self._dispatcher = loop.create_task(self._dispatch())
        return await request.future

    async def aclose(self) -> None:
        """Cancel what is still queued and free the model's memory."""
        for request in self._pending:
            request.future.cancel()
        self._pending.clear()
        with self._load_lock:
            loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded.device.startswith("cuda"):
            import torch

            del loaded
            torch.cuda.empty_cache()

    # -- batching (event loop side) ---------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Run batches while requests are queued; exits when the queue is empty (chat() starts a new one)."""
        while self._pending:
            await asyncio.sleep(0)  # callers started in the same tick join this batch
            if self._loaded is None:
                try:
                    await asyncio.to_thread(self._load)
                except Exception as exc:  # every waiting caller gets the error, none waits forever
                    self._fail_pending(exc if isinstance(exc, LLMError) else LLMError(f"{self.name}: {exc}"))
                    return
            batch = self._take_batch()
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self._run_batch, batch)
            except Exception as exc:  # a bug here must not leave callers waiting forever
                log.exception("hf backend: batch of %d failed", len(batch))
                results = [RequestFailed(f"generation failed: {type(exc).__name__}: {exc}")] * len(batch)
            for request, result in zip(batch, results, strict=True):
                if request.future.done():
                    continue
                if isinstance(result, BaseException):
                    request.future.set_exception(result)
                else:
                    request.future.set_result(result)

    def _take_batch(self) -> list[_Request]:
        """The oldest waiting request and up to max_concurrency - 1 others with the same parameters."""
        live = [r for r in self._pending if not r.future.done()]
        if not live:
            self._pending.clear()
            return []
        key = live[0].batch_key
        batch = [r for r in live if r.batch_key == key][: self.max_batch]
        taken = {id(r) for r in batch}
        self._pending = [r for r in live if id(r) not in taken]
        return batch

    def _fail_pending(self, exc: Exception) -> None:
        for request in self._pending:
            if not request.future.done():
                request.future.set_exception(exc)
        self._pending.clear()

    # -- model (worker thread side) ---------------------------------------------------------------------------

    def _load(self) -> None:
        with self._load_lock:
            if self._loaded is None:
                self._loaded = load_model(self.model_path, self.adapter, self.cfg)

    def _run_batch(self, batch: list[_Request]) -> list[Completion | Exception]:
        with self._generate_lock:
            loaded = self._loaded
            if loaded is None:
                return [
                    LLMError(f"{self.name}: the model was closed (aclose) before this request ran")
                ] * len(batch)
            return generate_batch(loaded, batch, self.stats)


def generate_batch(
    loaded: _Loaded, batch: list[_Request], stats: dict[str, int]
) -> list[Completion | Exception]:
    """One left-padded `generate()` for requests that share their parameters; a result or error per request."""
    import torch

    results: list[Completion | Exception | None] = [None] * len(batch)
    prompts: dict[int, list[int]] = {}
    for i, request in enumerate(batch):
        try:
            prompts[i] = prompt_ids(loaded, request.messages)
        except RequestFailed as exc:
            results[i] = exc
    if not prompts:
        return [r for r in results if r is not None]
    first = batch[0]
    rows = list(prompts)

    kwargs: dict[str, Any] = {"max_new_tokens": first.max_tokens, "pad_token_id": loaded.pad_id}
    kwargs["eos_token_id"] = sorted(loaded.eos_ids)
    if first.temperature > 0:
        kwargs.update(do_sample=True, temperature=first.temperature, top_p=1.0, top_k=0)
    else:
        kwargs.update(do_sample=False)
    if first.stop:
        kwargs.update(stop_strings=list(first.stop), tokenizer=loaded.tokenizer)
    if first.json_schema is not None:
        try:
            kwargs["logits_processor"] = [loaded.grammars().processor(first.json_schema, len(rows))]
        except Exception as exc:  # xgrammar raises several types for schemas it cannot compile
            failure = RequestFailed(f"json_schema cannot be compiled: {_one_line(exc)}")
            return [failure if r is None else r for r in results]

    input_ids, attention_mask = left_pad([prompts[i] for i in rows], loaded.pad_id, loaded.device)
    # Sampling is seeded from the batch's prompts: the same requests give the same replies on every run.
    seed = int(sha256_text(repr(input_ids.tolist()))[:8], 16)
    started = time.perf_counter()
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            output = loaded.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    except Exception as exc:  # reported per request; the model has no per-call state left (module docstring)
        log.warning("hf backend: generate() failed for a batch of %d: %s", len(rows), _one_line(exc))
        failure = RequestFailed(f"generation failed: {type(exc).__name__}: {_one_line(exc)}")
        return [failure if r is None else r for r in results]
    new_tokens = output[:, input_ids.shape[1] :].tolist()

    for row, i in enumerate(rows):
        results[i] = decode_completion(loaded, new_tokens[row], batch[i].stop, len(prompts[i]))
    stats["batches"] += 1
    stats["rows"] += len(rows)
    stats["largest_batch"] = max(stats["largest_batch"], len(rows))
    log.debug(
        "hf backend: batch of %d x %d new tokens in %.2fs",
        len(rows),
        len(new_tokens[0]),
        time.perf_counter() - started,
    )
    return [r for r in results if r is not None]


def prompt_ids(loaded: _Loaded, messages: list[dict[str, Any]]) -> list[int]:
    """The conversation through the tokenizer's own chat template, ending in an open assistant turn."""
    from jinja2 import TemplateError

    try:
        ids = loaded.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise RequestFailed(f"the chat template cannot render these messages: {_one_line(exc)}") from exc
    if loaded.max_positions is not None and len(ids) >= loaded.max_positions:
        raise RequestFailed(
            f"the prompt has {len(ids)} tokens; the model reads at most {loaded.max_positions}: shorten it"
        )
    return list(ids)


def left_pad(rows: list[list[int]], pad_id: int, device: str) -> tuple[Any, Any]:
    """`(input_ids, attention_mask)` with every row padded on the left to the longest."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def decode_completion(loaded: _Loaded, tokens: list[int], stop: tuple[str, ...], n_prompt: int) -> Completion:
    """Text up to the first end-of-turn token or stop string (neither included); "length" if neither came."""
    end = next((j for j, t in enumerate(tokens) if t in loaded.eos_ids), None)
    if end is not None:
        kept, n_completion, finish = tokens[:end], end + 1, "stop"
    else:
        kept = tokens
        while kept and kept[-1] == loaded.pad_id:  # a row stopped by a stop string is padded after it
            kept = kept[:-1]
        n_completion, finish = len(kept), "length"
    text = loaded.tokenizer.decode(kept, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s and s in text]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    return Completion(text=text, prompt_tokens=n_prompt, completion_tokens=n_completion, finish_reason=finish)


# -- loading ---------------------------------------------------------------------------------------------------


# transformers' lazy module imports are not thread-safe: two backends loading at once in worker threads can
# fail with "cannot import name AutoModelForCausalLM". Loads are serialised (they compete for memory anyway).
_LOAD_LOCK = threading.Lock()


def load_model(model_path: str, adapter: Path | None, cfg: ModelConfig) -> _Loaded:
    """Tokenizer (the adapter's own when it has one: it carries the chat template it was trained with), model
    on cfg.device in cfg.dtype, adapter on top. Any failure → LLMError naming the folder, in one line."""
    with _LOAD_LOCK:
        return _load_model(model_path, adapter, cfg)


def _load_model(model_path: str, adapter: Path | None, cfg: ModelConfig) -> _Loaded:
    from doctune import models

    started = time.perf_counter()
    device = models.resolve_device(cfg.device)
    try:
        ref = models.resolve(model_path)
        if adapter is not None:
            models.adapter_folder(adapter)
        has_tokenizer = adapter is not None and (adapter / "tokenizer_config.json").is_file()
        tokenizer = models.load_tokenizer(adapter if has_tokenizer else ref, chat_template=True)
        model = models.load_causal_lm(ref, dtype=cfg.dtype, device=device)
        if adapter is not None:
            model = models.load_adapter(model, adapter, base=ref)
    except DoctuneError as exc:  # one line already; a backend reports LLMError
        raise LLMError(str(exc)) from None
    model.eval()

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    if not eos_ids:
        raise LLMError(
            f"{model_path}: neither generation_config nor tokenizer names an end-of-sequence token"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    log.info(
        "loaded %s%s on %s (%s) in %.1fs",
        model_path,
        f" + adapter {adapter}" if adapter else "",
        device,
        str(model.dtype).removeprefix("torch."),
        time.perf_counter() - started,
    )
    return _Loaded(model, tokenizer, device, eos_ids, pad_id, max_positions)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
