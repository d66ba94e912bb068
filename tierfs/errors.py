"""The one exception type for user-facing errors, and the exit codes it carries.

Every command that fails for a reason the operator can act on raises `TierfsError`; the CLI
prints its message on one line and exits with its code. The codes are part of the interface
(documented in docs/EXIT_CODES.md) and are never renumbered.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes of every `tierfs` command."""

    OK = 0
    PROBLEMS_FOUND = 1
    USAGE = 2
    CONFIG = 3
    NOT_A_FILESYSTEM = 4
    ALREADY_EXISTS = 5
    BUSY = 6
    NOT_MOUNTED = 7
    VERSION = 8
    MOUNT_FAILED = 9
    IO = 10
    TIMEOUT = 11
    VERIFY_FAILED = 12
    INTERNAL = 70
    INTERRUPTED = 130


class TierfsError(Exception):
    """An error the operator can act on: a one-line message and an exit code."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.INTERNAL) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message
