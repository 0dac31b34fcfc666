"""Errors that carry a CLI exit code.

The CLI maps these to exit codes (documented in the README): 0 ok, 1 a check failed (accuracy or
latency gate), 2 bad input or usage, 3 internal error. Library code raises them with a message
that is complete on one line, because the CLI prints exactly that line.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class BnfoldError(Exception):
    """Bad input or usage: the model, a file or an option cannot be used as given (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class CheckFailed(BnfoldError):
    """A verification or latency gate failed (exit 1)."""

    exit_code = EXIT_CHECK_FAILED
