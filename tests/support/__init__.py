"""Test helpers shared by tests and bench scripts (import as `tests.support....` from the repo root)."""
