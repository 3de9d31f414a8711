"""One root error class; the CLI maps each subclass to an exit code and prints one line."""

from __future__ import annotations


class EdgecError(Exception):
    """Root of every error edgec raises on purpose. The message says what went wrong and what to do."""

    exit_code: int = 2


class UsageError(EdgecError):
    """Bad input from the user: a file, an option, a profile name. Exit code 2."""

    exit_code = 2


class GateFailure(EdgecError):
    """A check the user asked for failed (latency budget, accuracy floor, parity). Exit code 1."""

    exit_code = 1


class InfraError(EdgecError):
    """The environment cannot do the job: an SDK, device or tool is missing or unreachable. Exit code 3."""

    exit_code = 3


class SdkMissing(InfraError):
    """A vendor SDK (TensorRT, TVM, ...) is not installed or cannot run on this machine."""
