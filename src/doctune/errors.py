"""Typed errors. Library code raises these; the CLI turns each into one line and an exit code."""


class DoctuneError(Exception):
    """Base class of every error doctune reports to a user. The message is one line that says what to do."""

    exit_code = 1


class ConfigError(DoctuneError):
    """doctune.yaml or a command-line override is wrong. `problems` holds one line per wrong key."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class InputError(DoctuneError):
    """An input file the stage needs is missing or unusable (names the file and what to do)."""

    exit_code = 3


class LLMError(DoctuneError):
    """A model backend failed in a way retrying will not fix (unreachable server, bad key, unknown model)."""

    exit_code = 4


class FailureRateError(DoctuneError):
    """A stage finished, but more items failed than `max_failure_rate` allows."""

    exit_code = 5
