"""Packaged prompt templates and the loader that lets a user's YAML replace them.

Templates use the seed recipe's placeholders (`{num_questions}`, `{language}`, ...). Only the named
placeholders are filled, so literal braces (JSON examples in a prompt) are left alone.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import yaml

from doctune.errors import ConfigError


def packaged_prompts(name: str) -> dict[str, str]:
    """The templates of `src/doctune/prompts/{name}.yaml`."""
    text = resources.files("doctune.prompts").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def load_prompts(name: str, override: str | Path | None = None) -> dict[str, str]:
    """Packaged templates of `name`, with any same-named key of the user's YAML (e.g. the seed's
    generation_config.yaml) taking their place. A missing file or non-text template is a ConfigError."""
    prompts = packaged_prompts(name)
    if override is None:
        return prompts
    path = Path(override)
    if not path.is_file():
        raise ConfigError([f"{path}: prompt file not found"], source="prompts")
    try:
        user = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(
            [f"{path}: not valid YAML ({str(exc).splitlines()[0]})"], source="prompts"
        ) from None
    if not isinstance(user, dict):
        raise ConfigError([f"{path}: expected a mapping of template names to text"], source="prompts")
    for key, value in user.items():
        if key in prompts:
            if not isinstance(value, str):
                raise ConfigError(
                    [f"{path}: {key} must be text, got {type(value).__name__}"], source="prompts"
                )
            prompts[key] = unescape_format_braces(value)
    return prompts


def unescape_format_braces(template: str) -> str:
    """The seed's templates were written for `str.format`, so literal braces are doubled; `fill` replaces
    only named placeholders, so turn `{{`/`}}` back into single braces.

    >>> unescape_format_braces('Answer as [{{"Question": ..., "Answer": ...}}] in {language}.')
    'Answer as [{"Question": ..., "Answer": ...}] in {language}.'
    """
    return template.replace("{{", "{").replace("}}", "}")


def fill(template: str, **values: object) -> str:
    """Replace `{name}` for each given name; other braces stay as they are.

    >>> fill('Write {num_questions} pairs as [{"Question": ...}] in {language}.', num_questions=3, language="French")
    'Write 3 pairs as [{"Question": ...}] in French.'
    """
    if not values:
        return template
    pattern = re.compile(r"\{(" + "|".join(re.escape(k) for k in values) + r")\}")
    return pattern.sub(lambda m: str(values[m.group(1)]), template)
