"""Exceptions with the exit codes the command line maps them to."""

from __future__ import annotations

__all__ = ["StampclfError", "InputError", "ModelError", "DeviceError"]


class StampclfError(Exception):
    """Base class of every error stampclf raises on purpose.

    The message is one line that names the offending file, dataset or value.
    """

    exit_code = 1


class InputError(StampclfError, ValueError):
    """Bad input data or usage (exit code 2)."""

    exit_code = 2


class ModelError(StampclfError):
    """A model file or model card that cannot be used (exit code 2)."""

    exit_code = 2


class DeviceError(StampclfError):
    """The requested execution device cannot be used (exit code 2)."""

    exit_code = 2
