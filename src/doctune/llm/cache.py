"""The run's response cache: every answered LLM request, so a re-run sends only what never got an answer.

```python
cache = ResponseCache(cfg.run_folder.cache)
llm = CachedLLM(backend, cache)          # a hit returns Completion(..., cached=True) without calling backend
reply = await llm.chat(messages, max_tokens=512)
await llm.aclose()                       # flushes and closes the cache too
```

Keys are sha256 of canonical JSON of (model identity, messages, sampling params, schema): `cache_key`. Only
answers are stored; a request that failed (`RequestFailed`) is asked again next time.

Identical requests in flight together are sent once: the first starts the request, the others wait for its
answer (`Completion.cached` True for them: they cost nothing; `ResponseCache.coalesced` counts them next to
`hits`). A failure reaches every waiter and is not stored, so the next call asks again; a waiter that is
cancelled leaves the request running for the others (it is cancelled only when no one waits for it any more).

Writes must not slow the event loop and must survive the process being killed. `put` hands the row to a writer
thread that commits whatever has queued up in one transaction (group commit: one commit per batch, batches form
on their own under load), so an answer is on disk within milliseconds of `put`, well under a second. SQLite
runs in WAL mode with synchronous=NORMAL: a committed row survives SIGKILL of the process (it is in the WAL
file), though not necessarily a power cut. Rows not yet committed are served from memory meanwhile.
Several processes may share one file (busy timeout 30 s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doctune.errors import DoctuneError
from doctune.llm.base import LLM, Completion
from doctune.runs import sha256_json

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason TEXT,
    created REAL NOT NULL
)
"""
_Row = tuple[str, str, str, int, int, str | None, float]
_STOP = object()


def cache_key(
    model_name: str, messages: list[dict[str, Any]], params: dict[str, Any], schema: dict[str, Any] | None
) -> str:
    """sha256 of the request in canonical JSON (sorted keys, no spaces): equal requests, equal keys.

    >>> a = cache_key("m", [{"role": "user", "content": "hi"}], {"max_tokens": 5, "temperature": 0.0}, None)
    >>> b = cache_key("m", [{"content": "hi", "role": "user"}], {"temperature": 0.0, "max_tokens": 5}, None)
    >>> a == b, a == cache_key("m2", [{"role": "user", "content": "hi"}], {"max_tokens": 5}, None)
    (True, False)
    """
    return sha256_json({"model": model_name, "messages": messages, "params": params, "schema": schema})


def _connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


class ResponseCache:
    """SQLite file of answered requests. Thread-safe. The file is created on first use (not by the
    constructor, so a stage that fails its preflight writes nothing); `close()` (or `with`) flushes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._open_lock = threading.Lock()
        self._read: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._pending: dict[str, _Row] = {}
        self._pending_lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self.hits = 0
        self.misses = 0
        self.coalesced = 0  # requests answered by an identical request in flight (counted by CachedLLM)

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _reader(self) -> sqlite3.Connection:
        if self._read is None:
            with self._open_lock:
                if self._read is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    con = _connect(self.path)
                    con.execute(SCHEMA)
                    self._writer = threading.Thread(
                        target=self._write_loop, name="doctune-cache-writer", daemon=True
                    )
                    self._writer.start()
                    self._read = con
        return self._read

    def get(self, key: str) -> Completion | None:
        """The stored answer of `key` (with cached=True), or None."""
        with self._pending_lock:
            row = self._pending.get(key)
        if row is None:
            con = self._reader()
            with self._read_lock:
                row = con.execute(
                    "SELECT key, model, text, prompt_tokens, completion_tokens, finish_reason, created "
                    "FROM responses WHERE key = ?",
                    (key,),
                ).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return Completion(
            text=row[2], prompt_tokens=row[3], completion_tokens=row[4], finish_reason=row[5], cached=True
        )

    def put(self, key: str, model: str, completion: Completion) -> None:
        """Store an answer; the writer thread commits it within milliseconds."""
        self._raise_writer_error()
        self._reader()
        row: _Row = (
            key,
            model,
            completion.text,
            completion.prompt_tokens,
            completion.completion_tokens,
            completion.finish_reason,
            time.time(),
        )
        with self._pending_lock:
            self._pending[key] = row
        self._queue.put(row)

    def forget(self, key: str) -> None:
        """Drop one answer (e.g. a reply the stage could not use), so the next run asks again."""
        self.flush()
        with self._pending_lock:
            self._pending.pop(key, None)
        con = self._reader()
        with self._read_lock:
            con.execute("DELETE FROM responses WHERE key = ?", (key,))

    def __len__(self) -> int:
        self.flush()
        con = self._reader()
        with self._read_lock:
            return con.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def flush(self) -> None:
        """Block until every `put` so far is committed."""
        if self._writer is not None and self._writer.is_alive():
            self._queue.join()
        self._raise_writer_error()

    def close(self) -> None:
        """Commit what is pending and close the file. The cache can be used again afterwards (it reopens)."""
        with self._open_lock:
            writer, self._writer = self._writer, None
            if writer is not None and writer.is_alive():
                self._queue.put(_STOP)
                writer.join()
            con, self._read = self._read, None
            if con is not None:
                with self._read_lock:
                    con.close()
        self._raise_writer_error()

    def _raise_writer_error(self) -> None:
        if self._writer_error is not None:
            raise DoctuneError(
                f"{self.path}: cannot write the response cache ({self._writer_error}); answers committed "
                "before this are kept: fix the cause (disk full? read-only?) and run again, or use --no-cache"
            )

    def _write_loop(self) -> None:
        con = _connect(self.path)
        try:
            while True:
                batch = [self._queue.get()]
                while True:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                rows = [item for item in batch if item is not _STOP]
                try:
                    if rows and self._writer_error is None:
                        self._commit(con, rows)
                except sqlite3.Error as exc:
                    log.error("%s: could not write %d cached answers: %s", self.path, len(rows), exc)
                    self._writer_error = exc
                finally:
                    for _ in batch:
                        self._queue.task_done()
                if len(rows) != len(batch):
                    return
        finally:
            con.close()

    def _commit(self, con: sqlite3.Connection, rows: list[_Row]) -> None:
        con.execute("BEGIN IMMEDIATE")
        try:
            con.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            con.execute("COMMIT")
        except sqlite3.Error:
            con.execute("ROLLBACK")
            raise
        with self._pending_lock:
            for row in rows:
                if self._pending.get(row[0]) is row:
                    del self._pending[row[0]]


@dataclass
class _InFlight:
    """One request on its way to the backend, and how many callers wait for its answer."""

    task: asyncio.Task[Completion]
    waiters: int = 0


class CachedLLM:
    """An LLM whose answers come from the cache when it has them, and whose identical requests in flight
    share one answer (module docstring). `cache=None`: a transparent wrapper.

    `identity` names the model in the cache key (default: the inner model's name); backends whose answers
    depend on more than the name (an adapter's weights) pass something that changes with them.
    """

    def __init__(self, inner: LLM, cache: ResponseCache | None, *, identity: str | None = None):
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        self.identity = identity or inner.name
        self._in_flight: dict[str, _InFlight] = {}

    def key_for(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        stop: list[str] | None = None,
    ) -> str:
        params = {"max_tokens": max_tokens, "temperature": temperature, "stop": stop}
        return cache_key(self.identity, messages, params, json_schema)

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        stop: list[str] | None = None,
    ) -> Completion:
        if self.cache is None:
            return await self.inner.chat(
                messages, max_tokens=max_tokens, temperature=temperature, json_schema=json_schema, stop=stop
            )
        key = self.key_for(
            messages, max_tokens=max_tokens, temperature=temperature, json_schema=json_schema, stop=stop
        )
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        params = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "json_schema": json_schema,
            "stop": stop,
        }
        return await self._shared(self.cache, key, messages, params)

    async def _shared(
        self, cache: ResponseCache, key: str, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> Completion:
        """The answer of the request in flight for `key`, started here if there is none."""
        loop = asyncio.get_running_loop()
        flight = self._in_flight.get(key)
        joined = flight is not None and flight.task.get_loop() is loop and not flight.task.done()
        if flight is None or not joined:
            flight = _InFlight(loop.create_task(self._ask_and_store(cache, key, messages, params)))
            self._in_flight[key] = flight
            flight.task.add_done_callback(lambda _task, f=flight: self._landed(key, f))
        flight.waiters += 1
        try:
            reply = await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():  # every caller gave up: so does the request
                flight.task.cancel()
        if not joined:
            return reply
        cache.coalesced += 1
        return dataclasses.replace(reply, cached=True)

    async def _ask_and_store(
        self, cache: ResponseCache, key: str, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> Completion:
        reply = await self.inner.chat(messages, **params)
        cache.put(key, self.identity, reply)
        return reply

    def _landed(self, key: str, flight: _InFlight) -> None:
        if self._in_flight.get(key) is flight:
            del self._in_flight[key]

    def forget(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        stop: list[str] | None = None,
    ) -> None:
        """Drop the cached answer of this request (one the stage could not use), so a re-run asks again."""
        if self.cache is not None:
            self.cache.forget(
                self.key_for(
                    messages,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    json_schema=json_schema,
                    stop=stop,
                )
            )

    async def preflight(self) -> None:
        await self.inner.preflight()

    async def count_tokens(self, text: str) -> int | None:
        """Tokens of `text` under the inner model's tokenizer; None when it has none here (a server)."""
        count = getattr(self.inner, "count_tokens", None)
        return await count(text) if count is not None else None

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            if self.cache is not None:
                self.cache.close()
