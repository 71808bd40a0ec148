"""The server's front door, as plain ASGI middleware: API key and body size, before any route runs.

- With an API key, every path but /health needs `Authorization: Bearer KEY` (what the openai client sends).
  A browser opening the chat page gets HTTP Basic's login prompt instead (any user name, the key as password);
  the browser then sends those credentials with the page's own requests. Keys are compared as SHA-256
  digests with `hmac.compare_digest` (constant time, length hidden), and never logged.
- A body over `max_body_bytes` is refused with 413, whether it declares its length or streams chunks; the
  route gets the body already read, so no handler ever holds more than the limit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from doctune.serve.protocol import error_body

OPEN_PATHS = frozenset({"/health"})
PAGE_PATHS = frozenset({"/", "/index.html"})


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def presented_key(authorization: str) -> str:
    """The key in an Authorization header: a Bearer token, or the password of HTTP Basic.

    >>> presented_key("Bearer sk-123"), presented_key("Basic " + base64.b64encode(b"me:sk-123").decode())
    ('sk-123', 'sk-123')
    """
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return ""
        return decoded.partition(":")[2]
    return ""


async def send_json(
    send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()
) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class Guard:
    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self._key_digest = _digest(api_key) if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # first value of each header
        if self._key_digest is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            challenge = (
                [(b"www-authenticate", b'Basic realm="doctune"')] if scope["path"] in PAGE_PATHS else []
            )
            await send_json(
                send,
                401,
                error_body(
                    "Missing or incorrect API key: send `Authorization: Bearer KEY` with the key this server "
                    "was started with (--api-key-env)",
                    param=None,
                    code="invalid_api_key",
                ),
                challenge,
            )
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = presented_key(headers.get(b"authorization", b"").decode("latin-1"))
        return hmac.compare_digest(_digest(given), self._key_digest)

    async def _too_large(self, send: Any) -> None:
        await send_json(
            send,
            413,
            error_body(
                f"The request body is larger than this server accepts ({self.max_body_bytes} bytes)",
                code="request_too_large",
            ),
            [(b"connection", b"close")],
        )
