"""In-process transformers backend (+ optional PEFT adapter): the embedded default, no server needed.

```python
llm = HFBackend(cfg.models["student"], adapter=cfg.run_folder.adapter.path, model_path=cfg.model_source(...))
await llm.preflight()                     # loads now; LLMError (one line) if the model or adapter cannot load
replies = await asyncio.gather(*(llm.chat(m, max_tokens=256) for m in conversations))
```

Concurrent `chat()` calls share the model through llm/engine.py's continuous batching (the same engine as
`doctune serve`): up to `max_concurrency` requests decode together, one token each per forward pass, in a worker
thread so the event loop stays free; a request that finishes frees its slot for a waiting one at the next step.
max_tokens, temperature, stop strings and JSON schema are per request, so any requests share a batch. Greedy when
temperature is 0; a sampled request draws from its own generator, seeded from its prompt and parameters, so the
same request gives the same reply on every run whatever else runs beside it. JSON schemas are enforced with
xgrammar (llm/grammar.py).

Model, tokenizer and adapter are loaded through doctune.models (a folder, a .gguf file or a hub name; device
and dtype resolved there; any failure one LLMError line). The adapter is always active, so the engine never
passes `adapter_names`: PEFT's per-call forward hooks (which PEFT issue #3475 leaves behind when a call raises)
are never installed, and a failed step leaves the model as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doctune.adapters import AdapterDir
from doctune.config import ModelConfig
from doctune.errors import DoctuneError, LLMError
from doctune.llm.base import Completion, RequestFailed
from doctune.llm.rows import take_token
from doctune.runs import sha256_file, sha256_text

log = logging.getLogger(__name__)


def adapter_digest(adapter: Path) -> str:
    """Short sha256 of an adapter's weights and config: a re-trained adapter gets a new backend name (and so
    new cache keys). "missing" when the folder holds no adapter weights."""
    folder = AdapterDir(adapter)
    if not folder.weights.is_file():
        return "missing"
    parts = [sha256_file(folder.weights), sha256_file(folder.config) if folder.config.is_file() else ""]
    return sha256_text("+".join(parts))[:12]


def backend_name(model_path: str, adapter: Path | None) -> str:
    """`hf:MODEL` or `hf:MODEL+ADAPTER_FOLDER@DIGEST`."""
    name = f"hf:{model_path}"
    if adapter is not None:
        name += f"+{adapter.name}@{adapter_digest(adapter)}"
    return name


@dataclass(frozen=True)
class _Params:
    max_tokens: int
    temperature: float
    top_p: float = 1.0


@dataclass(eq=False)
class _Row:
    """One chat() request inside the engine (llm/engine.py's Row): it collects tokens, stops on an end-of-turn
    token, a stop string or max_tokens, and then hands its Completion (or error) to `done` (worker thread)."""

    prompt_ids: list[int]
    params: _Params
    stop: tuple[str, ...]
    loaded: _Loaded
    done: Any  # Callable[[Completion | Exception], None]
    adapter: str = "__base__"
    matcher: Any = None
    grammar_tail: bytes = b""
    generator: Any = None
    cancelled: bool = False
    finish_reason: str | None = None
    generated: list[int] = field(default_factory=list)
    _window: int = 0  # tokens to decode when looking for a stop string

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> None:
        if not take_token(self, token, self.loaded.eos_ids, self._token_bytes, "json_schema"):
            return
        if self.stop and self._stop_in_tail():
            self._finish("stop")
        elif len(self.generated) >= self.params.max_tokens:
            self._finish("length")

    def fail(self, message: str) -> None:
        if self.finished:
            return
        self.finish_reason = "error"
        self.done(RequestFailed(message))

    def _token_bytes(self) -> list[bytes]:
        return self.loaded.grammars().guard.token_bytes

    def _stop_in_tail(self) -> bool:
        if not self._window:
            self._window = 2 * max(len(s) for s in self.stop) + 8
        tail = self.loaded.decode(self.generated[-self._window :])
        return any(s in tail for s in self.stop)

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        tokens = self.generated
        kept = tokens[:-1] if reason == "stop" and tokens and tokens[-1] in self.loaded.eos_ids else tokens
        text = self.loaded.decode(kept)
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            text, reason = text[: min(cuts)], "stop"
        self.done(
            Completion(
                text=text,
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(tokens),
                finish_reason=reason,
            )
        )


@dataclass
class _Request:
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float
    json_schema: dict[str, Any] | None
    stop: tuple[str, ...]
    future: asyncio.Future[Completion]
    row: _Row | None = None


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
    # The fast tokenizer is not safe to share between threads ("Already borrowed"): requests are rendered in
    # worker threads while the engine decodes in its own.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    _grammars_lock: threading.Lock = field(default_factory=threading.Lock)

    def grammars(self) -> Any:
        with self._grammars_lock:
            if self._grammars is None:
                from doctune.llm.grammar import SchemaGrammars

                with self.tokenizer_lock:
                    self._grammars = SchemaGrammars(
                        self.tokenizer,
                        vocab_size=self.model.config.get_text_config().vocab_size,
                        stop_token_ids=sorted(self.eos_ids),
                    )
            return self._grammars

    def decode(self, tokens: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)


class HFBackend:
    """The LLM protocol over a transformers model in this process (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, adapter: str | Path | None = None, model_path: str | None = None):
        self.cfg = cfg
        self.model_path = str(model_path or cfg.model)
        adapter = adapter if adapter is not None else cfg.adapter
        self.adapter = Path(adapter).expanduser() if adapter else None
        self.name = backend_name(self.model_path, self.adapter)
        self.max_batch = cfg.max_concurrency
        # batches: prefills (requests admitted together); steps: decode forward passes; rows: requests run
        self.stats = dict.fromkeys(
            ("batches", "steps", "rows", "largest_batch", "failed_batches", "cancelled"), 0
        )
        self._loaded: _Loaded | None = None
        self._engine: Any = None  # llm/engine.py's BatchEngine, started with the model
        self._load_lock = threading.Lock()
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
        with loaded.tokenizer_lock:
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
        stops = tuple(s for s in stop or () if s)
        request = _Request(messages, max_tokens, float(temperature), json_schema, stops, loop.create_future())
        self._pending.append(request)
        if self._dispatcher is None or self._dispatcher.done() or self._dispatcher.get_loop() is not loop:
            self._dispatcher = loop.create_task(self._dispatch())
        try:
            return await request.future
        except asyncio.CancelledError:  # the caller gave up: free its slot
            if request.row is not None and self._engine is not None:
                self._engine.cancel(request.row)
            raise

    async def aclose(self) -> None:
        """Cancel what is still queued or running and free the model's memory."""
        for request in self._pending:
            request.future.cancel()
        self._pending.clear()
        with self._load_lock:
            loaded, self._loaded = self._loaded, None
            engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)
        if loaded is not None and loaded.device.startswith("cuda"):
            import torch

            del loaded
            torch.cuda.empty_cache()

    # -- requests into the engine (event loop side) -------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Hand queued requests to the engine; exits when the queue is empty (chat() starts a new one)."""
        while self._pending:
            await asyncio.sleep(0)  # callers started in the same tick go in together
            if self._loaded is None:
                try:
                    await asyncio.to_thread(self._load)
                except Exception as exc:  # every waiting caller gets the error, none waits forever
                    self._fail_pending(exc if isinstance(exc, LLMError) else LLMError(f"{self.name}: {exc}"))
                    return
            taken = [r for r in self._pending if not r.future.done()]
            self._pending = []
            if taken:
                await asyncio.to_thread(self._submit, taken, asyncio.get_running_loop())

    def _fail_pending(self, exc: Exception) -> None:
        for request in self._pending:
            if not request.future.done():
                request.future.set_exception(exc)
        self._pending.clear()

    def _submit(self, requests: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        """Render each request (in a thread: templates and schemas take a while) and queue them all at once."""
        from doctune.llm.engine import EngineBusy

        loaded, engine = self._loaded, self._engine
        rows = []
        for request in requests:
            resolve = functools.partial(_resolve_threadsafe, loop, request.future)
            if loaded is None or engine is None:
                resolve(LLMError(f"{self.name}: the model was closed (aclose) before this request ran"))
                continue
            try:
                request.row = make_row(loaded, request, resolve)
            except RequestFailed as exc:
                resolve(exc)
                continue
            rows.append(request.row)
        if not rows:
            return
        try:
            engine.submit(rows)
        except EngineBusy as exc:
            for row in rows:
                row.fail(f"{self.name}: {exc}")

    # -- model (worker thread side) ---------------------------------------------------------------------------

    def _load(self) -> None:
        with self._load_lock:
            if self._loaded is None:
                loaded = load_model(self.model_path, self.adapter, self.cfg)
                self._engine = start_engine(loaded, self.max_batch, self.stats)
                self._loaded = loaded


def _resolve_threadsafe(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any) -> None:
    """Set `future` to `result` (a value or an exception) from any thread, unless it is already done."""

    def resolve() -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting any more
        loop.call_soon_threadsafe(resolve)


def start_engine(loaded: _Loaded, max_batch: int, stats: dict[str, int]) -> Any:
    """The continuous-batching engine (llm/engine.py) over a loaded model."""
    from doctune.llm.engine import BatchEngine

    return BatchEngine(
        loaded.model,
        pad_id=loaded.pad_id,
        vocab_size=loaded.model.config.get_text_config().vocab_size,
        guard=_GuardOf(loaded),
        max_batch=max_batch,
        stats=stats,
        closing_message="the model was closed (aclose) before this request finished",
    )


class _GuardOf:
    """The loaded model's TokenGuard, built when a constrained row first needs it."""

    def __init__(self, loaded: _Loaded):
        self._loaded = loaded

    def mask(self, scores: Any, row: int, tail: bytes) -> None:
        self._loaded.grammars().guard.mask(scores, row, tail)


def make_row(loaded: _Loaded, request: _Request, done: Any) -> _Row:
    """The engine row of one request: prompt ids, grammar matcher, seeded generator. RequestFailed when the
    template cannot render the messages or the schema cannot be compiled."""
    import torch

    ids = prompt_ids(loaded, request.messages)
    row = _Row(ids, _Params(request.max_tokens, request.temperature), request.stop, loaded, done)
    if request.json_schema is not None:
        import xgrammar as xgr

        try:
            compiled = loaded.grammars().compile(request.json_schema)
        except Exception as exc:  # xgrammar raises several types for schemas it cannot compile
            raise RequestFailed(f"json_schema cannot be compiled: {_one_line(exc)}") from None
        row.matcher = xgr.GrammarMatcher(compiled)
    if request.temperature > 0:
        # Seeded from the request itself: the same request samples the same reply on every run.
        key = json.dumps([ids, request.max_tokens, request.temperature, request.json_schema, request.stop])
        row.generator = torch.Generator(device=loaded.device).manual_seed(int(sha256_text(key)[:15], 16))
    return row


def prompt_ids(loaded: _Loaded, messages: list[dict[str, Any]]) -> list[int]:
    """The conversation through the tokenizer's own chat template, ending in an open assistant turn."""
    from jinja2 import TemplateError

    try:
        with loaded.tokenizer_lock:
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
            AdapterDir(adapter).checked(adapter)
        has_tokenizer = adapter is not None and AdapterDir(adapter).has_tokenizer()
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
