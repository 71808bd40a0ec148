"""The terminal chat: history and commands against a real server, and `doctune chat` under a pseudo-terminal."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from doctune.chat import EndpointBackend, run_chat

from .helpers import ADAPTER_SYSTEM_PROMPT


class Recording:
    """A real backend that also keeps what each turn sent and got back."""

    def __init__(self, backend):
        self.backend = backend
        self.name = backend.name
        self.system_prompt = backend.system_prompt
        self.sent = []
        self.replies = []

    def stream(self, messages, **params):
        self.sent.append([dict(m) for m in messages])
        parts = []
        for piece in self.backend.stream(messages, **params):
            parts.append(piece)
            yield piece
        self.replies.append("".join(parts))

    def close(self):
        self.backend.close()


def scripted(lines):
    remaining = list(lines)

    def read_line(prompt):
        if not remaining:
            raise EOFError
        return remaining.pop(0)

    return read_line


def test_history_reset_and_system_prompt(server):
    backend = Recording(EndpointBackend(server.url + "/v1", "docs"))
    out = io.StringIO()
    script = ["first question", "second question", "/system Be terse.", "third", "/reset", "fourth", "/exit"]
    run_chat(backend, read_line=scripted(script), out=out, max_tokens=6)
    backend.close()

    first, second, third, fourth = backend.sent
    a1, a2, a3, _ = backend.replies
    assert first == [{"role": "user", "content": "first question"}]
    assert second == [
        *first,
        {"role": "assistant", "content": a1},
        {"role": "user", "content": "second question"},
    ]
    assert third == [
        {"role": "system", "content": "Be terse."},
        *second,
        {"role": "assistant", "content": a2},
        {"role": "user", "content": "third"},
    ]
    assert fourth == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "fourth"}]
    text = out.getvalue()
    assert f"docs> {a1}\n" in text and f"docs> {a3}\n" in text
    assert "(conversation reset)" in text and "(system prompt: Be terse.)" in text


def test_a_failed_reply_is_reported_and_the_chat_goes_on(server):
    out = io.StringIO()
    run_chat(EndpointBackend(server.url + "/v1", "nope"), read_line=scripted(["hi", "/help"]), out=out)
    text = out.getvalue()
    assert "error: 404: The model `nope` does not exist" in text
    assert "unknown command /help" in text


class Terminal:
    """A command under a pseudo-terminal: type lines, read the screen's text."""

    def __init__(self, command, env):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True, close_fds=True
        )
        os.close(slave)
        self.screen = ""

    def read_until(self, pattern, timeout=120.0):
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.screen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} after {timeout}s; screen:\n{self.screen[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data and self.process.poll() is not None:
                    raise AssertionError(f"exited before {pattern!r}; screen:\n{self.screen[-2000:]}")
                self.screen += data.decode("utf-8", errors="replace")
        return self.screen

    def type(self, line):
        self.screen = ""
        os.write(self.master, line.encode() + b"\r")

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        os.close(self.master)


@pytest.mark.slow
def test_doctune_chat_in_a_terminal(tiny_model_dir, adapter_dirs):
    command = [sys.executable, "-m", "doctune", "chat", "--model", str(tiny_model_dir)]
    command += ["--adapter", str(adapter_dirs["docs"]), "--max-tokens", "8"]
    env = {**os.environ, "TERM": "xterm", "NO_COLOR": "1"}
    terminal = Terminal(command, env)
    try:
        banner = terminal.read_until(r"you> ")
        assert "chatting with adapter" in banner
        assert f"system prompt (from the adapter): {ADAPTER_SYSTEM_PROMPT}" in banner

        terminal.type("What does the handbook say?")
        reply = terminal.read_until(r"adapter> .*\n[\s\S]*you> ")
        assert re.search(r"adapter> \S", reply)

        terminal.type("/system Answer in one word.")
        assert "(system prompt: Answer in one word.)" in terminal.read_until(r"you> ")
        terminal.type("And then?")
        terminal.read_until(r"adapter> [\s\S]*you> ")
        terminal.type("/reset")
        assert "(conversation reset)" in terminal.read_until(r"you> ")
        terminal.type("/exit")
        assert terminal.process.wait(30) == 0
    finally:
        terminal.close()


@pytest.mark.slow
def test_doctune_chat_through_an_endpoint(server):
    command = [sys.executable, "-m", "doctune", "chat", "--endpoint", server.url + "/v1", "--model", "docs"]
    terminal = Terminal([*command, "--max-tokens", "5"], {**os.environ, "TERM": "xterm", "NO_COLOR": "1"})
    try:
        assert "chatting with docs" in terminal.read_until(r"you> ", timeout=60)
        terminal.type("Hello?")
        assert re.search(r"docs> \S", terminal.read_until(r"docs> .*\n[\s\S]*you> ", timeout=60))
        terminal.type("/exit")
        assert terminal.process.wait(30) == 0
    finally:
        terminal.close()


# ---------------------------------------------------------------- an endpoint that is slow, silent or misaddressed


def _one_turn(backend) -> tuple[str, float]:
    out = io.StringIO()
    started = time.monotonic()
    run_chat(backend, read_line=scripted(["hi"]), out=out)
    return out.getvalue(), time.monotonic() - started


def test_a_server_that_never_answers_ends_the_reply_after_the_idle_timeout():
    from tests.support.fake_openai import FakeOpenAIServer

    with FakeOpenAIServer(reply=lambda req: "never sent", latency=30) as srv:
        text, seconds = _one_turn(EndpointBackend(srv.base_url, "fake-model", idle_timeout=0.5))
    assert "error: no answer from" in text and "for 0.5 s" in text and "--timeout" in text
    assert seconds < 5  # not 30 s, not retried


def test_a_slow_server_that_keeps_writing_is_waited_for():
    from tests.support.fake_openai import FakeOpenAIServer

    words = " ".join(f"w{i}" for i in range(8))
    with FakeOpenAIServer(reply=lambda req: words, stream_interval=0.15) as srv:
        text, seconds = _one_turn(EndpointBackend(srv.base_url, "fake-model", idle_timeout=0.6))
    assert seconds > 0.6  # longer in all than the idle timeout, never silent that long
    assert "error" not in text and "w0 w1 w2 w3 w4 w5 w6 w7" in text


def test_an_endpoint_without_v1_gets_the_url_it_probably_meant():
    from tests.support.fake_openai import FakeOpenAIServer

    with FakeOpenAIServer() as srv:
        root = srv.base_url.removesuffix("/v1")
        text, _ = _one_turn(EndpointBackend(root, "fake-model", idle_timeout=10))
    assert "error: 404" in text and f"did you mean {root}/v1?" in text


def test_a_keyed_server_says_how_to_give_the_key():
    from tests.support.fake_openai import FakeOpenAIServer

    with FakeOpenAIServer(api_key="sekrit") as srv:
        text, _ = _one_turn(EndpointBackend(srv.base_url, "fake-model", "wrong", api_key_env="MY_KEY"))
    assert "error: 401" in text and "$MY_KEY" in text and "--api-key-env" in text
    assert "wrong" not in text.split("error:")[1]
