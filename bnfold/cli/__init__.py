"""The ``bnfold`` command line: the group, the command registry and the exit-code contract.

Only ``bnfold.cli`` prints; every command module imports the library inside its commands, so
that ``bnfold --help`` starts fast.

Exit codes: 0 ok, 1 a check failed (accuracy or latency gate), 2 bad input or usage, 3 internal
error (a bug in bnfold: please report it); 130 / 143 interrupted by SIGINT / SIGTERM (temp files
removed). docs/hardening.md has the whole contract.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from typing import NoReturn

import click

from bnfold import __version__
from bnfold.cli import deploy, fold, lower, quant
from bnfold.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, BnfoldError, one_line

REPORT_URL = "https://github.com/bnfold/bnfold/issues"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold")
@click.option("-v", "--verbose", count=True, help="Log what each step does (-vv for debug).")
def cli(verbose: int) -> None:
    """Fold BatchNormalization exactly, verify it, and compile ONNX models for edge devices."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


# Every command, by the module that defines it, registered explicitly (those modules import
# nothing heavy at module level, so start-up stays fast).
COMMANDS = (*fold.COMMANDS, *lower.COMMANDS, *quant.COMMANDS, *deploy.COMMANDS)
for _command in COMMANDS:
    cli.add_command(_command)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind (removing temp files on the way), exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _unwind_on_signals() -> Iterator[None]:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` for the duration of a command.

    Python's default SIGTERM kills the process on the spot, leaving temp files behind; its
    SIGINT raises KeyboardInterrupt, which click turns into ``Abort`` (exit 2, "bad input").
    A signal that is ignored (``nohup``, background jobs) stays ignored.
    """
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, _raise_interrupted)
    except ValueError:  # not the main thread: signals are not ours to handle
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _warnings_to_log() -> Iterator[None]:
    """Route Python warnings raised during a command to the log (shown with ``-v``).

    They come from libraries (numpy on NaN data, matplotlib, Pillow...), name no problem the
    user can act on, and would break the contract's stderr: one line on exit 2, nothing on
    exit 0. bnfold's own warnings go through logging, not through this.
    """
    log = logging.getLogger("bnfold.warnings")

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: object = None, line: str | None = None) -> None:  # fmt: skip
        log.info("%s: %s (%s:%d)", category.__name__, message, filename, lineno)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn every failure into one line and an exit code."""
    try:
        with _unwind_on_signals(), _warnings_to_log():
            cli.main(args=argv, prog_name="bnfold", standalone_mode=False)
    except Interrupted as e:
        click.echo(f"interrupted ({e})", err=True)
        sys.exit(128 + e.signum)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        if isinstance(e, click.exceptions.NoArgsIsHelpError):
            e.show()  # `bnfold` alone prints the help
        else:  # a usage error is one line, like every other bad input
            _error_line(f"error: {' '.join(e.format_message().split())}")
        # Every ClickException is bad input or usage; click's own default code is 1, which here
        # would read as "a check failed".
        sys.exit(EXIT_BAD_INPUT if e.exit_code != 0 else 0)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except BnfoldError as e:
        _error_line(f"error: {e}")
        sys.exit(e.exit_code)
    except MemoryError as e:
        # A model or input that declares more data than this machine holds (a huge input
        # shape): the input is the problem, not bnfold.
        _error_line(f"error: out of memory ({e or 'the model or its inputs are too large'})")
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            _internal_error(e)
        # The file system said no (permissions, a full disk, a read-only mount): bad input.
        where = f"{e.filename}: " if e.filename else ""
        _error_line(f"error: {where}{e.strerror or e}")
        sys.exit(EXIT_BAD_INPUT)
    except BaseException as e:
        _internal_error(e)


# Errors of the environment, not of bnfold: exit 2 with the file and the reason. (ENOENT is not
# one: a file bnfold itself should have written and did not is a bug.)
_ENVIRONMENT_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENAMETOOLONG,
    errno.EFBIG,
}


def _error_line(message: str) -> None:
    """Print an error message: the one place, so that each is one sanitized line."""
    click.echo(one_line(message), err=True)


def _internal_error(e: BaseException) -> NoReturn:
    """A bug: one line, exit 3; the traceback only with BNFOLD_DEBUG=1."""
    if os.environ.get("BNFOLD_DEBUG"):
        raise e
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    _error_line(
        f"internal error: {type(e).__name__}: {msg} (set BNFOLD_DEBUG=1 for the traceback "
        f"and report it at {REPORT_URL})"
    )
    sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
