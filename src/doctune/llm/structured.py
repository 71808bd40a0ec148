"""JSON out of a model's reply: strict parse, then repair (json-repair), then light schema validation.

Servers that honour `response_format` return pure JSON; others wrap it in prose or ``` fences, leave trailing
commas or use single quotes. `parse_json_reply` takes what is usable from all of these; `validate` checks the
subset of JSON schema that doctune's schemas use and says what is wrong, one line per problem.
"""

from __future__ import annotations

import json
import re
from typing import Any

import json_repair


class ReplyParseError(ValueError):
    """A reply holds no usable JSON. The message says why, in one line."""


def parse_json_reply(text: str) -> Any:
    """The JSON value in a model's reply: pure JSON as it is, anything else repaired into an object or array.

    >>> parse_json_reply('{"a": 1}')
    {'a': 1}
    >>> parse_json_reply('Sure! Here it is:\\n```json\\n{"a": [1, 2,],}\\n```')
    {'a': [1, 2]}
    >>> parse_json_reply("{'question': 'Why?', 'answer': 'Because.'}")
    {'question': 'Why?', 'answer': 'Because.'}
    >>> parse_json_reply("I cannot answer that.")
    Traceback (most recent call last):
    ...
    doctune.llm.structured.ReplyParseError: no JSON object or array in the reply (21 chars: 'I cannot answer that.')
    """
    if not isinstance(text, str):
        raise ReplyParseError(f"reply is {type(text).__name__}, not text")
    stripped = text.strip().lstrip("\ufeff")
    if not stripped:
        raise ReplyParseError("reply is empty")
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    try:
        value = json_repair.loads(stripped)
    except (ValueError, RecursionError) as exc:
        raise ReplyParseError(f"reply is not JSON and could not be repaired ({exc})") from None
    if isinstance(value, dict | list):
        return value
    preview = stripped if len(stripped) <= 60 else stripped[:57] + "..."
    raise ReplyParseError(f"no JSON object or array in the reply ({len(stripped)} chars: {preview!r})")


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _is_type(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(name, object))


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Problems of `value` against `schema`, one line each (empty: valid).

    Checks type, enum, const, required, properties, additionalProperties (false), items, minItems, maxItems,
    minLength, maxLength, pattern, minimum, maximum. Other keywords are ignored.

    >>> schema = {"type": "object", "required": ["score"],
    ...           "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}}}
    >>> validate({"score": 4}, schema)
    []
    >>> validate({"score": 9}, schema)
    ['$.score: 9 is above the maximum 5']
    >>> validate({"grade": "A"}, schema)
    ["$: missing required key 'score'"]
    """
    problems: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_is_type(value, k) for k in kinds):
            return [f"{path}: expected {' or '.join(kinds)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} is not one of {schema['enum']!r}")
    if "const" in schema and value != schema["const"]:
        problems.append(f"{path}: {value!r} is not {schema['const']!r}")
    if isinstance(value, dict):
        problems += _validate_object(value, schema, path)
    elif isinstance(value, list):
        problems += _validate_array(value, schema, path)
    elif isinstance(value, str):
        problems += _validate_string(value, schema, path)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{path}: {value} is above the maximum {schema['maximum']}")
    return problems


def _validate_object(value: dict[str, Any], schema: dict[str, Any], path: str) -> list[str]:
    problems = [
        f"{path}: missing required key {key!r}" for key in schema.get("required", []) if key not in value
    ]
    properties = schema.get("properties", {})
    for key, item in value.items():
        if key in properties:
            problems += validate(item, properties[key], f"{path}.{key}")
        elif schema.get("additionalProperties") is False:
            problems.append(f"{path}: unexpected key {key!r}")
    return problems


def _validate_array(value: list[Any], schema: dict[str, Any], path: str) -> list[str]:
    problems = []
    if "minItems" in schema and len(value) < schema["minItems"]:
        problems.append(f"{path}: {len(value)} items, fewer than minItems {schema['minItems']}")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        problems.append(f"{path}: {len(value)} items, more than maxItems {schema['maxItems']}")
    items = schema.get("items")
    if isinstance(items, dict):
        for i, item in enumerate(value):
            problems += validate(item, items, f"{path}[{i}]")
    return problems


def _validate_string(value: str, schema: dict[str, Any], path: str) -> list[str]:
    problems = []
    if "minLength" in schema and len(value) < schema["minLength"]:
        problems.append(f"{path}: {len(value)} chars, shorter than minLength {schema['minLength']}")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        problems.append(f"{path}: {len(value)} chars, longer than maxLength {schema['maxLength']}")
    if "pattern" in schema and re.search(schema["pattern"], value) is None:
        problems.append(f"{path}: does not match the pattern {schema['pattern']!r}")
    return problems


# Text a JSON string holds without escapes: no control character, quote or backslash.
SAFE_CHAR = r'[^\x00-\x1f"\\]'
XGRAMMAR_MAX_REPEAT = 128  # xgrammar 0.2.8 fails to compile a repetition bound above this


def text_pattern(max_chars: int, min_chars: int = 1, suffix: str = "") -> str:
    r"""A `pattern` for min_chars..max_chars escape-free characters, which in-process constrained decoding can
    always close (xgrammar applies a pattern to the raw text between the quotes, so the reply stays strict
    JSON). Bounds above 128 are written as whole hundreds and a rest (rounded down to the hundred): xgrammar
    compiles that form and Python's `re` checks it in linear time. `suffix` (a regex) must follow the text.

    >>> print(text_pattern(64))
    ^[^\x00-\x1f"\\]{1,64}$
    >>> print(text_pattern(50, suffix=r"\?"))
    ^[^\x00-\x1f"\\]{1,50}\?$
    >>> print(text_pattern(400))
    ^(?:[^\x00-\x1f"\\]{100}){0,3}[^\x00-\x1f"\\]{1,100}$
    """
    if max_chars <= XGRAMMAR_MAX_REPEAT:
        return f"^{SAFE_CHAR}{{{min(min_chars, max_chars)},{max_chars}}}{suffix}$"
    if min_chars > 100:
        raise ValueError(f"min_chars {min_chars} above 100 needs a bound of at most {XGRAMMAR_MAX_REPEAT}")
    hundreds = max_chars // 100
    return f"^(?:{SAFE_CHAR}{{100}}){{0,{hundreds - 1}}}{SAFE_CHAR}{{{min_chars},100}}{suffix}$"
