"""The server's security promises: loopback by default, the API key on every endpoint but /health, size limits,
and a server that still answers correct requests after a flood of garbage. All traffic stays on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from doctune.config import ServeConfig
from doctune.serve.app import create_app

from .helpers import running, wait_idle

KEY = "sk-test-6f1d0c3b9a"
HI = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def keyed_server(engine):
    with running(create_app(engine, api_key=KEY, max_body_bytes=4096)) as srv:
        yield srv


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/unknown"),
        ("DELETE", "/v1/models"),
    ],
)
def test_every_endpoint_but_health_needs_the_key(keyed_server, method, path):
    url = keyed_server.url + path
    body = {"model": "tiny", "messages": HI, "max_tokens": 2}
    for headers in (
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": f"Bearer {KEY[:-1]}"},
        {"x": KEY},
    ):
        response = httpx.request(method, url, headers=headers, json=body if method == "POST" else None)
        assert response.status_code == 401, (method, path, headers)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert KEY not in response.text
    with_key = httpx.request(
        method, url, headers={"authorization": f"Bearer {KEY}"}, json=body if method == "POST" else None
    )
    assert with_key.status_code != 401


def test_health_needs_no_key(keyed_server):
    assert httpx.get(keyed_server.url + "/health").json() == {"status": "ok"}


def test_openai_client_with_and_without_the_key(keyed_server):
    good = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, max_retries=0)
    bad = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sk-wrong", max_retries=0)
    assert good.chat.completions.create(model="tiny", messages=HI, max_tokens=3).usage.completion_tokens >= 1
    assert list(good.chat.completions.create(model="docs", messages=HI, max_tokens=3, stream=True))
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=HI, max_tokens=3)


def test_the_chat_page_asks_a_browser_for_the_key(keyed_server):
    page = httpx.get(keyed_server.url + "/")
    assert page.status_code == 401
    assert page.headers["www-authenticate"].startswith("Basic")
    basic = "Basic " + base64.b64encode(f"anyone:{KEY}".encode()).decode()
    assert httpx.get(keyed_server.url + "/", headers={"authorization": basic}).status_code == 200
    assert httpx.get(keyed_server.url + "/v1/models", headers={"authorization": basic}).status_code == 200


def test_oversized_bodies_are_refused(keyed_server):
    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]})
    response = httpx.post(keyed_server.url + "/v1/chat/completions", content=big, headers=auth)
    assert response.status_code == 413
    assert "4096 bytes" in response.json()["error"]["message"]

    # Chunked upload (no Content-Length): counted as it arrives.
    with socket.create_connection(("127.0.0.1", keyed_server.port), timeout=10) as sock:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 1024
        sock.sendall(head.encode() + b"".join(b"400\r\n" + chunk + b"\r\n" for _ in range(6)) + b"0\r\n\r\n")
        reply = sock.recv(65536).decode("latin-1")
    assert reply.startswith("HTTP/1.1 413")


def test_max_tokens_over_the_cap_is_refused(keyed_server):
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="more than this server allows"):
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=1_000_000)


def _garbage_requests(rng: random.Random, n: int) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """Random method / path / body / content-type, none of them a valid chat request."""
    paths = ["/v1/chat/completions", "/v1/models", "/", "/health", "/v1/x", "/%00", "/v1/chat/completions/1"]
    values = [None, True, -1, 1e308, "", "tiny", "\u0000\ud7ff", [], {}, [1, "a"], {"role": 5}, "x" * 300]
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            body = rng.randbytes(rng.randrange(0, 3000))
        elif kind == 1:
            body = json.dumps(
                {
                    rng.choice(["model", "messages", "max_tokens", "stream", "stop", "n", "zz"]): rng.choice(
                        values
                    )
                    for _ in range(rng.randrange(1, 6))
                }
            ).encode()
        elif kind == 2:
            fields = {"model": rng.choice(["tiny", "docs", "nope", 3]), "messages": rng.choice([*values, HI])}
            fields[rng.choice(["max_tokens", "temperature", "top_p", "seed", "response_format", "stop"])] = (
                rng.choice(values)
            )
            body = json.dumps(fields).encode()
        else:
            body = ("{" * rng.randrange(1, 2000)).encode()
        method = rng.choice(["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH"])
        content_type = rng.choice(
            ["application/json", "text/plain", "application/x-www-form-urlencoded", "a/b;c=%"]
        )
        out.append((method, rng.choice(paths), body, {"content-type": content_type}))
    return out


async def _raw_garbage(port: int, rng: random.Random) -> None:
    """Bytes that are not HTTP at all, then hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        rng.choice(
            [
                rng.randbytes(200),
                b"GET / HTTP/9.9\r\n\r\n",
                b"POST /v1 HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
            ]
        )
    )
    await writer.drain()
    with contextlib.suppress(TimeoutError, ConnectionError):
        await asyncio.wait_for(reader.read(1024), timeout=5)
    writer.close()


@pytest.mark.slow
def test_200_concurrent_garbage_requests_leave_the_server_answering(engine):
    rng = random.Random(1234)
    requests = _garbage_requests(rng, 180)
    with running(create_app(engine, api_key=KEY, max_body_bytes=2048)) as srv:

        async def flood():
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
            auth = {"authorization": f"Bearer {KEY}"}
            async with httpx.AsyncClient(base_url=srv.url, limits=limits, timeout=60) as http:

                async def one(method, path, body, headers):
                    response = await http.request(method, path, content=body, headers={**headers, **auth})
                    return response.status_code

                statuses = await asyncio.gather(
                    *(one(*r) for r in requests), *(_raw_garbage(srv.port, rng) for _ in range(20))
                )
            return [s for s in statuses if s is not None]

        started = time.monotonic()
        statuses = asyncio.run(asyncio.wait_for(flood(), timeout=120))
        assert time.monotonic() - started < 120
        assert len(statuses) == 180
        assert not [s for s in statuses if s >= 500], sorted(set(statuses))
        assert {400, 404, 405} <= set(statuses)

        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        for model in ("tiny", "docs"):
            reply = client.chat.completions.create(model=model, messages=HI, max_tokens=4)
            assert reply.choices[0].finish_reason in ("stop", "length")
    wait_idle(engine)


def test_the_default_host_is_loopback():
    assert ServeConfig().host == "127.0.0.1"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses listening on `port`, from /proc/net/tcp (Linux)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc/net/tcp (Linux)"
)
def test_doctune_serve_binds_loopback_and_never_logs_the_key(tiny_model_dir, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "DOCTUNE_TEST_KEY": KEY, "NO_COLOR": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "doctune", "serve", "--model", str(tiny_model_dir), "--port", str(port)]
    command += ["--api-key-env", "DOCTUNE_TEST_KEY", "--verbose"]
    log_file = tmp_path / "serve.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, "doctune serve did not start"
            time.sleep(0.2)
        assert _listening_addresses(port) == {"127.0.0.1"}

        good = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        assert good.chat.completions.create(model=str(tiny_model_dir), messages=HI, max_tokens=3).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY + "x", max_retries=0
            ).models.list()
        with pytest.raises(openai.BadRequestError):
            good.chat.completions.create(model=str(tiny_model_dir), messages=HI, extra_body={"key": KEY})
    finally:
        process.terminate()
        process.wait(30)
    output = log_file.read_text()
    assert "127.0.0.1" in output
    assert KEY not in output
