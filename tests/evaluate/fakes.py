"""The in-process LLM of the judge tests (tests/support/fake_llm.py)."""

from tests.support.fake_llm import ScriptedLLM

__all__ = ["ScriptedLLM"]
