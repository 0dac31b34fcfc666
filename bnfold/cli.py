"""The ``bnfold`` command line. Only this module prints; everything heavy is imported lazily.

Exit codes: 0 ok, 1 a check failed (accuracy or latency gate), 2 bad input or usage, 3 internal
error (a bug in bnfold: please report it); 130 / 143 interrupted by SIGINT / SIGTERM (temp files
removed). docs/hardening.md has the whole contract.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import click

from bnfold import __version__
from bnfold.cli_deploy import COMMANDS as DEPLOY_COMMANDS
from bnfold.cli_lower import COMMANDS as LOWER_COMMANDS
from bnfold.cli_quant import COMMANDS as QUANT_COMMANDS
from bnfold.cli_types import max_size_option, shape_option, tolerance_options
from bnfold.errors import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_INTERNAL,
    BnfoldError,
    one_line,
)

REPORT_URL = "https://github.com/bnfold/bnfold/issues"

model_arg = click.argument("model", type=click.Path(dir_okay=False, path_type=Path))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold")
@click.option("-v", "--verbose", count=True, help="Log what each step does (-vv for debug).")
def cli(verbose: int) -> None:
    """Fold BatchNormalization exactly, verify it, and compile ONNX models for edge devices."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _check_output_path(out: Path, *inputs: Path) -> None:
    """Refuse, before any work, an output bnfold may not write (bnfold.outputs has the rule):
    never an input, an input's external data, a device, FIFO, symlink or folder."""
    from bnfold.outputs import check_destination, protected_files

    check_destination(out, protected_files(*inputs))


@cli.command()
@model_arg
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the folded model (written atomically).",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the fold report as JSON to this file.",
)
@click.option("--no-forward", is_flag=True, help="Do not fold BNs into the following Conv/Gemm.")
@click.option(
    "--no-affine",
    is_flag=True,
    help="Keep BNs that cannot fold as BatchNormalization instead of Mul+Add.",
)
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Write tensors to MODEL.data beside the output (default: as the input was).",
)
@max_size_option
def fold(
    model: Path,
    output: Path,
    report: Path | None,
    no_forward: bool,
    no_affine: bool,
    external_data: bool | None,
    max_size: int | None,
) -> None:
    """Fold every foldable BatchNormalization of MODEL and write the result.

    Prints every BN with what happened to it: folded backward (into the Conv/Gemm/MatMul that
    produces it), forward (into the Conv/Gemm that consumes it), rewritten as Mul+Add, or kept,
    with the reason.
    """
    from bnfold import ir as bir
    from bnfold import pipeline
    from bnfold.atomic import write_json

    _check_output_path(output, model)
    # With external data the output's tensors go to OUTPUT.data: never an input's file either.
    _check_output_path(output.with_name(output.name + ".data"), model)
    if report:
        _check_output_path(report, model, output)
    t0 = time.perf_counter()
    folded, rep = pipeline.fold(
        bir.load(model, max_size_bytes=max_size), forward=not no_forward, to_affine=not no_affine
    )
    rep.source = str(model)
    bir.save(folded, output, external_data=external_data)
    rep.total_ms = (time.perf_counter() - t0) * 1e3
    if report:
        write_json(report, rep.to_dict())
    click.echo(rep.table())
    click.echo(f"wrote {output}" + (f" and {report}" if report else ""))


@cli.command()
@model_arg
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of tables.")
@click.option("--brief", is_flag=True, help="Omit the per-op counts and the per-BN table.")
@max_size_option
def inspect(model: Path, as_json: bool, brief: bool, max_size: int | None) -> None:
    """Show MODEL's inputs, outputs, op counts, and every BN with whether and how it can fold."""
    import collections

    import onnx

    from bnfold import ir as bir
    from bnfold import pipeline
    from bnfold.check import graph_inputs

    proto = bir.load_proto(model, max_size_bytes=max_size)
    ops = collections.Counter(n.op_type for n in proto.graph.node)

    def shape(vi: onnx.ValueInfoProto) -> str:
        dims = vi.type.tensor_type.shape.dim
        return "x".join(str(d.dim_value) if d.dim_value > 0 else (d.dim_param or "?") for d in dims)

    def dtype(vi: onnx.ValueInfoProto) -> str:
        return onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()

    inputs = [(i.name, shape(i), dtype(i)) for i in graph_inputs(proto)]
    outputs = [(o.name, shape(o), dtype(o)) for o in proto.graph.output]
    _, rep = pipeline.fold(bir.from_proto(proto, source=str(model)))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "model": str(model),
                    "opset": bir.default_opset(proto),
                    "ir_version": proto.ir_version,
                    "producer": proto.producer_name,
                    "inputs": inputs,
                    "outputs": outputs,
                    "ops": dict(ops.most_common()),
                    "fold": rep.to_dict(),
                },
                indent=2,
                sort_keys=True,
            )
        )
        return
    click.echo(
        f"{model}: opset {bir.default_opset(proto)}, IR {proto.ir_version}, "
        f"producer {proto.producer_name or '?'} {proto.producer_version}, "
        f"{len(proto.graph.node)} nodes, {len(proto.graph.initializer)} initializers"
    )
    for kind, rows in (("input", inputs), ("output", outputs)):
        for name, shp, dt in rows:
            click.echo(f"  {kind:<6} {name}: {dt}[{shp}]")
    if not brief:
        click.echo("ops: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    click.echo("")
    click.echo("what fold would do:")
    click.echo(rep.summary() if brief else rep.table())


@cli.command()
@click.argument("reference", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--inputs",
    type=click.Path(dir_okay=False, path_type=Path),
    help=".npz with one array per input name (or .npy for one input).",
)
@click.option(
    "--random",
    "n_random",
    type=click.IntRange(min=1),
    default=None,
    help="Use this many random input sets instead (default 1 when --inputs is absent).",
)
@shape_option
@tolerance_options(atol=1e-6, rtol=1e-5)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the metrics as JSON to this file.",
)
@max_size_option
def verify(
    reference: Path,
    candidate: Path,
    inputs: Path | None,
    n_random: int | None,
    shapes: tuple[tuple[str, tuple[int, ...]], ...],
    atol: float,
    rtol: float,
    seed: int,
    json_out: Path | None,
    max_size: int | None,
) -> None:
    """Run REFERENCE and CANDIDATE in onnxruntime (optimizations off) and compare their outputs.

    PASS when every output is finite and max abs error <= ATOL + RTOL x max|reference|; exit
    code 1 on FAIL.
    """
    from bnfold import check
    from bnfold.atomic import write_json

    if json_out:
        _check_output_path(json_out, reference, candidate)
    if inputs is not None and n_random is not None:
        raise click.UsageError("give --inputs or --random, not both")
    for p in (reference, candidate):
        if not p.is_file():
            raise BnfoldError(f"{p}: no such file")
    result = check.verify(
        reference,
        candidate,
        inputs=inputs,
        random=n_random or 1,
        shapes=dict(shapes),
        atol=atol,
        rtol=rtol,
        seed=seed,
        max_size_bytes=max_size,
    )
    if json_out:
        write_json(json_out, result.to_dict())
    click.echo(result.table())
    if not result.passed:
        sys.exit(EXIT_CHECK_FAILED)


# Commands defined in their own modules, registered explicitly (those modules import nothing
# heavy at module level, so start-up stays fast).
for _command in (*LOWER_COMMANDS, *QUANT_COMMANDS, *DEPLOY_COMMANDS):
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
