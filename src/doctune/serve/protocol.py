"""The OpenAI chat-completions wire format: the request the server accepts, and the JSON it answers with.

Requests are validated strictly, as OpenAI does: an unknown field or a value of the wrong type is a 400 that
names the field. Accepted: model, messages (system, developer, user, assistant; text content), temperature,
top_p, max_tokens / max_completion_tokens, stop, seed, stream, stream_options.include_usage, response_format
(text, json_object, json_schema), n (1 only), user (ignored).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from doctune.serve.requests import RequestRejected


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchema(_Strict):
    name: str = Field(max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    n: int = 1
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def messages_as_dicts(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them; developer is OpenAI's newer name for system."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]

    def json_schema(self) -> dict[str, Any] | None:
        rf = self.response_format
        if rf is None or rf.type != "json_schema":
            return None
        if rf.json_schema is None:
            raise RequestRejected(
                "response_format: type json_schema needs a json_schema object with name and schema",
                param="response_format",
            )
        return rf.json_schema.schema_


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Validate a request body; RequestRejected (400) with one line naming the first bad field."""
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        message, param = _describe(exc.errors()[0])
        raise RequestRejected(message, param=param) from None


def _describe(err: dict[str, Any]) -> tuple[str, str | None]:
    loc = ".".join(str(part) for part in err["loc"])
    param = str(err["loc"][0]) if err["loc"] else None
    if err["type"] == "json_invalid":
        return f"the body is not valid JSON ({err['ctx'].get('error', 'parse error')})", None
    if err["type"] in ("model_type", "model_attributes_type") and not err["loc"]:
        return "the body must be a JSON object", None
    if err["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {loc}", param
    if err["type"] == "missing":
        return f"{loc}: required field is missing", param
    message = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {message}", param


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    cid: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    cid: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk_body(
    cid: str, created: int, model: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def models_body(entries: list[tuple[str, str | None]], created: int) -> dict[str, Any]:
    """`entries`: (name, parent or None) for the base and each adapter."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "doctune", "parent": parent}
            for name, parent in entries
        ],
    }
