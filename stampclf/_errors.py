"""Exceptions with the exit codes the command line maps them to."""

from __future__ import annotations

__all__ = ["StampclfError", "InputError", "OutputError", "ModelError", "DeviceError", "open_failure", "check_choice"]


class StampclfError(Exception):
    """Base class of every error stampclf raises on purpose.

    The message is one line that names the offending file, dataset or value.
    """

    exit_code = 1


class InputError(StampclfError, ValueError):
    """Bad input data or usage (exit code 2)."""

    exit_code = 2


class OutputError(StampclfError):
    """The output cannot be written: no such folder, no permission, disk full, read-only file system (exit code 2)."""

    exit_code = 2


class ModelError(StampclfError):
    """A model file or model card that cannot be used (exit code 2)."""

    exit_code = 2


class DeviceError(StampclfError):
    """The requested execution device cannot be used (exit code 2)."""

    exit_code = 2


def check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise `InputError` naming *value* unless it is one of *choices* (``unknown prep 'gpu'; choose one of ...``)."""
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def open_failure(
    path: object, exc: OSError, what: str = "file", error: type[StampclfError] = InputError
) -> StampclfError | None:
    """The one-line error for a *path* that could not be opened, or None if *exc* is another failure.

    Covers the cases every reader shares: missing, a directory, no permission.
    """
    if isinstance(exc, FileNotFoundError):
        return error(f"{path}: {what} does not exist")
    if isinstance(exc, IsADirectoryError):
        return error(f"{path}: is a directory, not a {what}")
    if isinstance(exc, PermissionError):
        return error(f"{path}: no permission to read the {what}")
    return None
