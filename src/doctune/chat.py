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
    """Any OpenAI-compatible server, through the official client."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None):
        import openai

        self.name = model
        self.system_prompt = None
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=2)

    def stream(
        self, messages: list[dict[str, str]], *, max_tokens: int | None, temperature: float
    ) -> Generator[str, None, None]:
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
            raise ReplyFailed(f"{exc.status_code}: {_api_message(exc.body) or exc.message}") from None
        except openai.APIConnectionError as exc:
            raise ReplyFailed(f"cannot reach {self.client.base_url} ({exc.message})") from None

    def close(self) -> None:
        self.client.close()


def _api_message(body: Any) -> str | None:
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
    return None


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
