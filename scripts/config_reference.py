"""Rewrite the configuration reference in README.md from the pydantic models (tests check it is current).

.venv/bin/python scripts/config_reference.py
"""

from pathlib import Path

from doctune.config import reference_markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def updated(readme: str) -> str:
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{reference_markdown()}{END}{tail}"


if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "README.md"
    path.write_text(updated(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"updated {path}")
