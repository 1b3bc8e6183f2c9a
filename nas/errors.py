"""The errors of `nas`: one root, a few kinds, each with its exit code at the CLI.

    NasError
    ├── InputError      the user's input is wrong; nothing was written (exit code 2)
    │     SpecError, DataError, SearchError, StateError, TrackingError, ResultsError,
    │     ExportError: the module that found the problem, for whoever catches narrowly
    └── SearchFailed    the search itself failed; finished trials are kept (exit code 1)

`Interrupted` is what a signal handler raises (SIGTERM, ...): like KeyboardInterrupt, a
BaseException, so that no `except Exception` swallows it and every run closes as KILLED.

A message names what is wrong and how to go on, in one line. Where it names a setting it
names the library's parameter, in backticks (`max_trials`); the CLI shows the flag
(`--max-trials`) instead (`NasError.render`), so the library speaks no flags.
"""

from __future__ import annotations

import re
from typing import Callable

__all__ = ["NasError", "InputError", "SearchFailed", "Interrupted", "SearchError", "DataError",
           "render"]

_PARAMETER = re.compile(r"`(\w+)`")


def render(text: str, name_of: Callable[[str], str]) -> str:
    """`text` with every parameter it names in backticks as `name_of(parameter)` calls it
    (the CLI: its flag; the library: the parameter's name)."""
    return _PARAMETER.sub(lambda m: name_of(m.group(1)), text)


class NasError(Exception):
    """Every error `nas` raises on purpose. Its message names each parameter it is about
    in backticks; `str()` shows them as parameters, `render` as the caller calls them."""

    def __init__(self, message: str = ""):
        self.message = message
        super().__init__(self.render(lambda name: name))

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with every parameter as `name_of(parameter)` calls it."""
        return render(self.message, name_of)


class InputError(NasError, ValueError):
    """The user's input is wrong (a flag, a spec, the data, a store); nothing was written."""


class SearchError(InputError):
    """The search cannot start as asked (the user's input); nothing was written."""


class DataError(InputError):
    """The pipeline's data is missing or unusable; the message says which and why."""


class SearchFailed(NasError, RuntimeError):
    """The search stopped because too many trials failed; `errors` says which and why."""

    def __init__(self, message: str, errors: list[str]):
        super().__init__(message)
        self.errors = errors


class Interrupted(BaseException):
    """Raised by the signal handlers so runs close as KILLED (like KeyboardInterrupt)."""
