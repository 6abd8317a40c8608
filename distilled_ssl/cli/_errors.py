"""The one table that turns library errors into one-line CLI messages and exit codes.

Only :class:`~distilled_ssl.errors.DistilledSSLError` subclasses are caught, and OSErrors in which the
disk or file system refuses (no space, read-only, permission, name too long, a file in the way; as a
:class:`~distilled_ssl.errors.StorageError`): anything else is a bug and keeps its traceback. Ctrl-C
says how to resume (exit code 130).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from ..errors import (
    ArtifactError,
    ConfigError,
    DataError,
    DeviceError,
    DistilledSSLError,
    DivergenceError,
    HubError,
    OutputExistsError,
    StorageError,
)
from ..io import storage_error

INTERRUPTED = 130

# (library error, exit code, what the user is told to look at); the first row that matches wins.
# Every library error exits 1, as before the table existed (scripts may test for it).
ERROR_TABLE: tuple[tuple[type[DistilledSSLError], int, str], ...] = (
    (ConfigError, 1, "a config value, option or name"),
    (DataError, 1, "the source or downstream data"),
    (ArtifactError, 1, "a run-directory artifact or set folder"),
    (OutputExistsError, 1, "an output folder that already exists"),
    (StorageError, 1, "the disk or file system (space, permissions, names)"),
    (HubError, 1, "the Hugging Face Hub"),
    (DeviceError, 1, "the requested device"),
    (DivergenceError, 1, "training diverged"),
    (DistilledSSLError, 1, "a library error"),
)


def exit_code(exc: DistilledSSLError) -> int:
    """The exit code of a library error (the first matching row of :data:`ERROR_TABLE`)."""
    return next(code for cls, code, _ in ERROR_TABLE if isinstance(exc, cls))


def one_line(exc: BaseException) -> str:
    """The error's message on a single line."""
    return " ".join(str(exc).split("\n")).strip() or type(exc).__name__


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one-line CLI errors; Ctrl-C says how to resume."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DistilledSSLError as exc:
            error = click.ClickException(one_line(exc))
            error.exit_code = exit_code(exc)
            raise error from exc
        except OSError as exc:
            storage = storage_error(exc)
            if storage is None:
                raise
            error = click.ClickException(one_line(storage))
            error.exit_code = exit_code(storage)
            raise error from exc
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished work is saved; run the same command again to "
                       "resume", err=True)
            sys.exit(INTERRUPTED)

    return wrapper
