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


def one_line(text: str, limit: int = 2000) -> str:
    """``text`` made safe for a one-line message on a terminal.

    Names in a model (tensors, nodes, producer) and paths are user-controlled: a newline in one
    would break the one-line contract, and an escape sequence (ESC, CSI, BEL...) would be
    obeyed by the terminal. Control characters (C0, DEL, C1) and Unicode line/paragraph
    separators are shown as escapes (``\\n``, ``\\x1b``); runs of whitespace in the rest are
    kept as they are. Very long messages are cut to ``limit`` characters.
    """
    out = []
    for ch in text:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F or ch in "\u2028\u2029":
            out.append(repr(ch)[1:-1] if ch in "\n\r\t" else f"\\x{code:02x}" if code < 0x100
                       else f"\\u{code:04x}")  # fmt: skip
        else:
            out.append(ch)
    line = "".join(out)
    return line if len(line) <= limit else line[: limit - 3] + "..."
