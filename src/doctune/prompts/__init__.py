"""Packaged prompt templates and the loader that lets a user's YAML replace them.

Templates use the seed recipe's placeholders (`{num_questions}`, `{language}`, ...). Only the named
placeholders are filled, so literal braces (JSON examples in a prompt) are left alone.
"""

from __future__ import annotations

import difflib
import logging
import re
from importlib import resources
from pathlib import Path

import yaml

from doctune.errors import ConfigError

log = logging.getLogger(__name__)
STAGES = ("generate", "curate", "eval")  # the packaged prompt files


def packaged_prompt_file(name: str) -> Path:
    """`src/doctune/prompts/{name}.yaml`, where this installation keeps it."""
    return Path(str(resources.files("doctune.prompts").joinpath(f"{name}.yaml")))


def packaged_prompts(name: str) -> dict[str, str]:
    """The templates of `src/doctune/prompts/{name}.yaml`."""
    return yaml.safe_load(packaged_prompt_file(name).read_text(encoding="utf-8"))


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
    _check_keys(path, name, user, prompts)
    for key, value in user.items():
        if key in prompts:
            if not isinstance(value, str):
                raise ConfigError(
                    [f"{path}: {key} must be text, got {type(value).__name__}"], source="prompts"
                )
            prompts[key] = unescape_format_braces(value)
    return prompts


def _check_keys(path: Path, name: str, user: dict, prompts: dict[str, str]) -> None:
    """A key that looks meant as a template (…_template, …prompt…, or close to a template name) but is none of
    the packaged ones is a misspelling: ConfigError naming it and the expected keys. Other keys (the seed's
    generation_config.yaml holds settings too, and the templates of other stages) are ignored, with a log line."""
    known = {key for stage in STAGES for key in packaged_prompts(stage)}
    unknown = [str(k) for k in user if k not in known]
    misspelt = [
        k for k in unknown if "template" in k or "prompt" in k or difflib.get_close_matches(k, known, 1, 0.8)
    ]
    if misspelt:
        close = {k: difflib.get_close_matches(k, known, 1, 0.6) for k in misspelt}
        hints = "; ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        raise ConfigError(
            [f"{path}: unknown template key {hints}; the {name} templates are: {', '.join(sorted(prompts))}"],
            source="prompts",
        )
    if unknown:
        log.info("%s: keys that are no %s template are ignored: %s", path, name, ", ".join(unknown))


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
