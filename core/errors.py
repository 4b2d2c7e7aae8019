"""The project's error type for problems the user can fix.

A :class:`PipeError` is caused by input: a table, a path, a config value, a cache in a
state that a command can name. The CLI prints its message (which says what to do next)
and exits 2, without a traceback. Any other exception is a bug in this project or in a
library and is shown with its traceback, so it gets reported rather than mistaken for
bad input.

This module imports nothing from the project: every layer may raise these.
"""
from __future__ import annotations


class PipeError(Exception):
    """An error the user can fix; the message names the item and what to do next."""

    exit_code = 2


class InputError(PipeError, ValueError):
    """A bad value given by the user (an option, a file, a column).

    Also a ``ValueError``, so code that validates with ``except ValueError`` keeps working.
    """


class MissingFileError(PipeError, FileNotFoundError):
    """A file the user named, or that a command needs, does not exist."""
