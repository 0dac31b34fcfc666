"""``bnfold fold``, ``inspect`` and ``verify``: the commands that work on ONNX models alone.

Registered explicitly by :mod:`bnfold.cli` through :data:`COMMANDS`. Nothing heavy is imported
at module level, so that ``bnfold --help`` starts fast.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from bnfold.cli.types import max_size_option, shape_option, tolerance_options
from bnfold.errors import EXIT_CHECK_FAILED, BnfoldError

model_arg = click.argument("model", type=click.Path(dir_okay=False, path_type=Path))


def check_output_path(out: Path, *inputs: Path) -> None:
    """Refuse, before any work, an output bnfold may not write (bnfold.outputs has the rule):
    never an input, an input's external data, a device, FIFO, symlink or folder."""
    from bnfold.outputs import check_destination, protected_files

    check_destination(out, protected_files(*inputs))


@click.command("fold")
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
    help="Also write the fold report to this file: JSON, or a self-contained HTML page when "
    "the name ends in .html.",
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

    check_output_path(output, model)
    # With external data the output's tensors go to OUTPUT.data: never an input's file either.
    check_output_path(output.with_name(output.name + ".data"), model)
    if report:
        check_output_path(report, model, output)
    t0 = time.perf_counter()
    folded, rep = pipeline.fold(
        bir.load(model, max_size_bytes=max_size), forward=not no_forward, to_affine=not no_affine
    )
    rep.source = str(model)
    bir.save(folded, output, external_data=external_data)
    rep.total_ms = (time.perf_counter() - t0) * 1e3
    if report and report.suffix.lower() in (".html", ".htm"):
        from bnfold.html_report import write_fold_report

        write_fold_report(report, str(model), rep.to_dict())
    elif report:
        write_json(report, rep.to_dict())
    click.echo(rep.table())
    click.echo(f"wrote {output}" + (f" and {report}" if report else ""))


@click.command("inspect")
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
    # Model-local functions run as nodes of the graph; their own ops are listed per function.
    functions = {
        f"{f.domain}.{f.name}": collections.Counter(n.op_type for n in f.node)
        for f in proto.functions
    }

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
                    "functions": {k: dict(c.most_common()) for k, c in functions.items()},
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
        + (f", model-local functions: {len(functions)}" if functions else "")
    )
    for kind, rows in (("input", inputs), ("output", outputs)):
        for name, shp, dt in rows:
            click.echo(f"  {kind:<6} {name}: {dt}[{shp}]")
    if not brief:
        click.echo("ops: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
        for name, fops in functions.items():
            listed = ", ".join(f"{k} {v}" for k, v in fops.most_common())
            click.echo(f"  function {name}: {listed}")
    click.echo("")
    click.echo("what fold would do:")
    click.echo(rep.summary() if brief else rep.table())


@click.command("verify")
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
@click.option(
    "--per-layer",
    is_flag=True,
    help="Also compare every intermediate tensor (paired by name, or by the tensor map that "
    "bnfold fold writes) and name the first layer past the gate.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --per-layer: write a PNG of the per-layer error.",
)
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
    per_layer: bool,
    plot: Path | None,
) -> None:
    """Run REFERENCE and CANDIDATE in onnxruntime (optimizations off) and compare their outputs.

    PASS when every output is finite and max abs error <= ATOL + RTOL x max|reference|; exit
    code 1 on FAIL.
    """
    from bnfold import check
    from bnfold.atomic import write_json

    if json_out:
        check_output_path(json_out, reference, candidate)
    if plot:
        if not per_layer:
            raise click.UsageError("--plot needs --per-layer")
        check_output_path(plot, reference, candidate, *([json_out] if json_out else []))
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
        per_layer=per_layer,
    )
    if json_out:
        write_json(json_out, result.to_dict())
    if plot:
        from bnfold.per_layer import plot as plot_layers

        plot_layers(result.layers, plot, f"{reference.name} vs {candidate.name}")
    click.echo(result.table())
    if not result.passed:
        sys.exit(EXIT_CHECK_FAILED)


COMMANDS = (fold, inspect, verify)
