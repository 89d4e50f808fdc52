"""Exception types raised by the library.

The CLI turns every `MeissonicError` into one line on stderr and exit code 1. Messages say what was
expected and what to run next; they never need a traceback to be understood.
"""

from __future__ import annotations


class MeissonicError(Exception):
    """Base class: a problem the user can fix. `str(err)` is the whole message."""


class InputError(MeissonicError):
    """Bad user input: a missing or malformed file, a flag value out of range."""


class ConfigError(MeissonicError):
    """A configuration that does not validate. Collects every problem before raising."""

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class ModelFormatError(MeissonicError):
    """A model folder or checkpoint that does not have the expected layout or keys."""


class OutputExistsError(MeissonicError):
    """The output already exists and the command was not told to overwrite it."""
