"""Terminal chat with a fine-tuned model, in-process or through any OpenAI-compatible server.

```
doctune chat --model models/tiny --adapter runs/my-chatbot/adapter      # in-process (the serve engine)
doctune chat --endpoint http://127.0.0.1:8000/v1 --model docs            # a running `doctune serve`, vLLM, ...
```

Replies stream as they are written; the conversation is kept and sent with each question. Commands:
`/reset` forgets the conversation, `/system TEXT` sets the system prompt (`/system` alone goes back to the
default), `/exit` (or Ctrl-D) leaves; Ctrl-C stops a reply. In-process, an adapter's own chat template and the
system prompt it was trained with are used (see serve/models.py); through an endpoint, the server does that.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator
from typing import Any, Protocol, TextIO

DEFAULT_IDLE_TIMEOUT = 60.0  # seconds without a new piece of the reply before an endpoint is given up on
HELP = "commands: /reset (new conversation), /system TEXT (system prompt), /exit (or Ctrl-D); Ctrl-C stops a reply"


class ReplyFailed(Exception):
    """One reply could not be produced (the message says why); the chat goes on."""


class ChatBackend(Protocol):
    name: str
    system_prompt: str | None  # what the model gets when the user sets none (None: unknown or none)

    def stream(
        self, messages: list[dict[str, str]], *, max_tokens: int | None, temperature: float
    ) -> Generator[str, None, None]: ...

    def close(self) -> None: ...


class LocalBackend:
    """The model in this process, through the same engine as `doctune serve`."""

    def __init__(self, base: str, adapter: str | None = None, *, dtype: str = "auto", device: str = "auto"):
        from transformers.utils import logging as hf_logging

        from doctune.serve.engine import Engine

        hf_logging.disable_progress_bar()
        self.name = "adapter" if adapter else "base"
        self.engine = Engine.load(
            base, {"adapter": adapter} if adapter else None, served_name="base", dtype=dtype, device=device
        )
        self.system_prompt = self.engine.model(self.name).system_prompt

    def stream(
        self, messages: list[dict[str, str]], *, max_tokens: int | None, temperature: float
    ) -> Generator[str, None, None]:
        from doctune.serve.requests import Delta, Failed, RequestRejected

        try:
            request = self.engine.prepare(self.name, messages, max_tokens=max_tokens, temperature=temperature)
        except RequestRejected as exc:
            raise ReplyFailed(exc.message) from None
        with self.engine.start_sync(request) as events:
            for event in events:
                if isinstance(event, Delta):
                    yield event.text
                elif isinstance(event, Failed):
                    raise ReplyFailed(event.message)

    def close(self) -> None:
        self.engine.close()


class EndpointBackend:
    """Any OpenAI-compatible server, through the official client. `idle_timeout`: seconds the server may stay
    silent (before its first token or between two) before the reply is given up on; a slow server that keeps
    writing is waited for. `api_key_env` only names the key's variable in hints."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        api_key_env: str | None = None,
    ):
        import openai

        self.name = model
        self.system_prompt = None
        self.idle_timeout = idle_timeout
        self.api_key_env = api_key_env
        # httpx's read timeout is per read: a stream that stops for idle_timeout seconds ends, a long one does not
        timeout = openai.Timeout(idle_timeout, connect=min(10.0, idle_timeout))
        # no retries: a retried timeout would make the user wait several times idle_timeout for one line
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=timeout
        )

    def stream(
        self, messages: list[dict[str, str]], *, max_tokens: int | None, temperature: float
    ) -> Generator[str, None, None]:
        import httpx2
        import openai

        try:
            chunks = self.client.chat.completions.create(
                model=self.name,
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                temperature=temperature,
                **({"max_tokens": max_tokens} if max_tokens else {}),
            )
            with chunks:
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        except openai.APIStatusError as exc:
            raise ReplyFailed(self._status_message(exc)) from None
        except (openai.APITimeoutError, httpx2.TimeoutException):
            raise ReplyFailed(
                f"no answer from {self.url} for {self.idle_timeout:g} s (is the server hung or "
                "overloaded? raise --timeout for a slow one)"
            ) from None
        except openai.APIConnectionError as exc:
            raise ReplyFailed(f"cannot reach {self.url} ({exc.message})") from None
        except httpx2.HTTPError as exc:  # the connection broke in the middle of the stream
            raise ReplyFailed(f"{self.url}: the reply broke off ({type(exc).__name__})") from None

    @property
    def url(self) -> str:
        return str(self.client.base_url).rstrip("/")

    def _status_message(self, exc: Any) -> str:
        """The server's error in one line, with what to do for the usual mistakes (as `generate` says them)."""
        from doctune.llm.openai_backend import _server_message

        text = f"{exc.status_code}: {_server_message(exc)}"
        base = self.url
        if exc.status_code == 401:
            where = f"${self.api_key_env}" if self.api_key_env else "no variable (placeholder key sent)"
            return f"{text} (check the API key: it comes from {where}; name its variable with --api-key-env)"
        if exc.status_code == 404 and not base.endswith("/v1"):
            return f"{text} (check that --endpoint ends in /v1: did you mean {base}/v1?)"
        if exc.status_code == 404:
            return f"{text} (check --model: the name the server gives the model)"
        return text

    def close(self) -> None:
        self.client.close()


def run_chat(
    backend: ChatBackend,
    *,
    read_line: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
) -> None:
    """The read-reply loop. Returns on /exit or end of input."""
    history: list[dict[str, str]] = []
    out.write(f"chatting with {backend.name}. {HELP}\n")
    if system is None and backend.system_prompt:
        out.write(f"system prompt (from the adapter): {backend.system_prompt}\n")
    while True:
        try:
            line = read_line("you> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history.clear()
            out.write("(conversation reset)\n")
            continue
        if text == "/system" or text.startswith("/system "):
            system = text.removeprefix("/system").strip() or None
            out.write(f"(system prompt: {system})\n" if system else "(system prompt: the default)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        question = {"role": "user", "content": text}
        messages = ([{"role": "system", "content": system}] if system else []) + [*history, question]
        answer = _reply(backend, messages, out, max_tokens=max_tokens, temperature=temperature)
        if answer is not None:
            history += [question, {"role": "assistant", "content": answer}]


def _reply(
    backend: ChatBackend,
    messages: list[dict[str, str]],
    out: TextIO,
    *,
    max_tokens: int | None,
    temperature: float,
) -> str | None:
    """Stream one reply to `out`; the text (also when stopped with Ctrl-C), or None when it failed."""
    out.write(f"{backend.name}> ")
    out.flush()
    parts: list[str] = []
    pieces = backend.stream(messages, max_tokens=max_tokens, temperature=temperature)
    try:
        for piece in pieces:
            parts.append(piece)
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    except ReplyFailed as exc:
        out.write(f"\nerror: {exc}\n")
        return None
    finally:
        pieces.close()  # a stopped reply frees its slot in the engine / closes the HTTP stream
    out.write("\n")
    return "".join(parts)
