"""CLI commands for lowering: ``bnfold compile``, ``bnfold run``, ``bnfold targets``.

Registered explicitly by :mod:`bnfold.cli` through :data:`COMMANDS`. Nothing heavy is imported
here at module level (tvm takes seconds to import; onnx a fraction of one).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import click

from bnfold.cli.progress import StepDisplay
from bnfold.cli.quant import quant_options
from bnfold.cli.types import ShapeType, tolerance_options
from bnfold.errors import BnfoldError, CheckFailed
from bnfold.quant.options import INT8_MODEL, INT8_OUTPUTS, QuantOptions
from bnfold.targets import TARGETS


class TargetType(click.ParamType):
    """``NAME`` or ``NAME:CPU`` (``x86``, ``arm64:cortex-a72``, ``cuda:sm_90``)."""

    name = "TARGET"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from bnfold import targets

        try:
            targets.get(value)
        except BnfoldError as e:
            self.fail(str(e), param, ctx)
        return value


@click.command("compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-t",
    "--target",
    "target",
    type=TargetType(),
    default="x86",
    show_default=True,
    help=f"Target: one of {', '.join(TARGETS)}, optionally with a CPU or CUDA arch "
    "(arm64:cortex-a72, cuda:sm_90). `bnfold targets` lists them.",
)
@click.option(
    "-o",
    "--output",
    "outdir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the artifact, model.folded.onnx and manifest.json.",
)
@click.option(
    "--shape",
    "shapes",
    type=ShapeType(),
    multiple=True,
    help="Concrete shape of an input with dynamic dimensions, e.g. x:1x3x48x320. Repeatable.",
)
@click.option(
    "--inputs",
    type=click.Path(dir_okay=False, path_type=Path),
    help="An .npz (one array per input name) to verify with; it also gives the shapes "
    "of dynamic inputs that --shape does not.",
)
@click.option(
    "--random",
    "n_random",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Number of random input sets to verify with when --inputs is absent.",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Compare the artifact with the unfolded model in onnxruntime (optimizations "
    "off), where this machine can run the target.",
)
@click.option(
    "--no-schedule",
    is_flag=True,
    help="CPU targets: keep TVM's unscheduled default loops instead of bnfold's schedules "
    "(much slower; for comparison).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads the artifact runs with, stored in the manifest and used by `bnfold run` "
    "and bnfold.runtime.load (default: this machine's cores for x86, all of the device's "
    "cores for other CPU targets).",
)
@click.option(
    "--db",
    "database",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Use the tuned schedules that `bnfold tune --db DIR` chose (those measured faster "
    "than bnfold's own; the other functions keep bnfold's rules). CPU targets; the choice was "
    "measured with tune's --threads: compile with the same.",
)
@click.option("--int8", "int8", is_flag=True,
              help="Quantize to int8 first (needs --calib; the options of `bnfold quantize`), "
                   "then compile the QDQ model with integer conv/matmul kernels.")
@click.option("--integer/--no-integer", default=True, show_default=True,
              help="QDQ models on CPU targets: integer arithmetic for the quantized conv/matmul "
                   "groups (--no-integer: TVM's float fake-quantization).")
@click.option("--max-lsb", type=click.IntRange(min=0), default=1, show_default=True,
              help="QDQ models: the verification gate, every quantized tensor within this many "
                   "quantization steps of onnxruntime's, layer by layer.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a self-contained HTML page of the compile (fold report, "
                   "verification, steps, schedule rules, int8 SQNR plot), e.g. report.html.")
@quant_options
@tolerance_options(atol=0.0, rtol=1e-4, what="the verification gate")
def compile_cmd(
    model: Path,
    target: str,
    outdir: Path,
    shapes: tuple[tuple[str, tuple[int, ...]], ...],
    inputs: Path | None,
    n_random: int,
    verify: bool,
    no_schedule: bool,
    threads: int | None,
    database: Path | None,
    int8: bool,
    integer: bool,
    max_lsb: int,
    report: Path | None,
    atol: float,
    rtol: float,
    **quant: Any,
) -> None:
    """Fold MODEL, compile it with TVM for a target and write a deployable folder.

    OUTDIR gets the library (model.so; CUDA adds model.fatbin), model.folded.onnx and
    manifest.json. By default the artifact is then run (natively, or for arm64 under qemu) and
    compared with the ORIGINAL model in onnxruntime; exit code 1 if it fails the gate
    max abs error <= ATOL + RTOL x max|reference|.

    With --int8 MODEL is first quantized (like `bnfold quantize`: OUTDIR also gets
    model.int8.onnx, quant_report.json and sqnr.png), and the QDQ model is compiled with
    integer kernels. A QDQ model (from --int8 or given) is verified layer by layer: each
    quantized tensor within --max-lsb steps of onnxruntime's on the same layer inputs.
    """
    from bnfold import artifact
    from bnfold.cli.fold import check_output_path
    from bnfold.cli.quant import run_quantize
    from bnfold.html_report import write_compile_report
    from bnfold.lower import compiler as lower
    from bnfold.outputs import check_folder, protected_files, staged_folder

    options = QuantOptions(**quant)
    if not int8 and options.calib_path is not None:
        raise click.UsageError("--calib is for --int8 (quantize, then compile)")
    if not model.is_file():
        raise BnfoldError(f"{model}: no such model file")
    protected = protected_files(model)
    if report is not None:
        check_output_path(report, model)
    names = (lower.FOLDED, lower.FOLDED + ".data", artifact.MANIFEST,
             *(INT8_OUTPUTS if int8 else ()))  # fmt: skip
    check_folder(outdir, names, protected)
    # The outputs are one transaction: built in a temp folder beside OUTDIR and moved in at the
    # end, so an error or interrupt leaves OUTDIR as it was (never a new folded model beside
    # an old model.so and manifest). A failed verification still moves them in: the manifest
    # records the failure.
    failed: CheckFailed | None = None
    display = StepDisplay()
    with staged_folder(outdir, protected) as stage, contextlib.closing(display):
        source = model
        if int8:
            run_quantize(model, stage, options, shown_as=outdir)
            source = stage / INT8_MODEL
        try:
            manifest = lower.compile_model(source, target, stage, dict(shapes), verify,
                                           inputs=inputs, atol=atol, rtol=rtol, random=n_random,
                                           schedule=not no_schedule, threads=threads,
                                           database=database, fold=not int8, integer=integer,
                                           max_lsb=max_lsb, progress=display)  # fmt: skip
        except CheckFailed as e:
            failed = CheckFailed(str(e).replace(str(stage), str(outdir)))
        _relocate_manifest(stage, outdir)
    # What OUTDIR holds now (paths relocated), read back once for the page and the lines below.
    manifest = artifact.load(outdir)
    if report is not None:
        write_compile_report(report, outdir, manifest)
    if failed is not None:
        _echo_verification(manifest.verification)
        raise failed
    c, tvm_target = manifest.compile, manifest.tvm_target
    cpu = tvm_target.get("mcpu") or tvm_target.get("arch")
    click.echo(f"compiled {model} for {manifest.spec} ({cpu}) in {c['seconds']:.1f} s, "
               f"peak RSS {c['peak_rss_mb']:.0f} MB")  # fmt: skip
    n_threads = manifest.threads
    click.echo(f"  threads  {n_threads if n_threads is not None else 'all of the device cores'}")
    for role, name in manifest.files.items():
        click.echo(f"  {role:<8} {outdir / name}")
    click.echo(f"  folded   {outdir / lower.FOLDED}")
    click.echo(f"  manifest {outdir / artifact.MANIFEST}")
    if report is not None:
        click.echo(f"  report   {report}")
    q = c.get("int8")
    if q and q.get("integer"):
        click.echo(f"  int8     {q['integer_groups']} of {q['quantize_groups']} quantized groups "
                   f"in integer arithmetic ({q['kernel_groups']} with bnfold's int8 kernels)")
    elif q:
        click.echo(f"  int8     float fake-quantization: {q['why']}")
    _echo_verification(manifest.verification)


def _relocate_manifest(staged: Path, final: Path) -> None:
    """Rewrite the paths a manifest built in the staging folder records (an int8 ``source``)
    to where the folder ends up."""
    from bnfold import artifact

    if not (staged / artifact.MANIFEST).is_file():
        return

    def fix(obj: Any) -> Any:
        if isinstance(obj, str) and obj.startswith(str(staged)):
            return str(final) + obj[len(str(staged)) :]
        if isinstance(obj, dict):
            return {k: fix(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [fix(v) for v in obj]
        return obj

    artifact.save(artifact.Manifest(**fix(artifact.load(staged).to_dict())), staged)


def _echo_verification(v: dict[str, Any]) -> None:
    if v.get("status") == "not verified":
        click.echo(f"not verified: {v.get('why', '?')}")
        return
    how = f" ({v['how']})" if v.get("how") else ""
    if "max_lsb" in v:
        click.echo(f"int8 verification against the QDQ model in onnxruntime{how}, inputs "
                   f"{v.get('inputs')}:")  # fmt: skip
        click.echo(f"  layer by layer: {v['tensors']} quantized tensors, max difference "
                   f"{v['max_lsb']} LSB ({v['worst']}), {v['tensors_off_by_one']} off by 1 "
                   f"somewhere; worst fraction of elements off {v['max_off_fraction']:.2%}")
        click.echo("  end to end (not gated: rounding differences compound through layers):")
        click.echo(v["end_to_end"]["table"])
        click.echo(f"{'PASS' if v['status'] == 'passed' else 'FAIL'}: {v['gate']}")
        return
    click.echo(f"verification against the unfolded model in onnxruntime{how}, inputs "
               f"{v.get('inputs')}:")  # fmt: skip
    click.echo(v.get("table", ""))


@click.command("run")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--inputs",
    type=click.Path(dir_okay=False, path_type=Path),
    help="An .npz with one array per input name (default: seeded random inputs).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the outputs to this .npz (one array per output name).",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Run this many times and report the median latency.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads to run with (default: the manifest's, from `bnfold compile --threads`).",
)
def run_cmd(
    outdir: Path, inputs: Path | None, output: Path | None, repeat: int, threads: int | None
) -> None:
    """Run a compiled model folder (from `bnfold compile`) on inputs and show its outputs.

    x86 (and arm64 on an ARM machine) runs in this process; arm64 on x86 runs under
    qemu-aarch64-static (the runner is built and cached on first use, which takes a minute);
    CUDA needs a GPU.
    """
    import zipfile

    import numpy as np

    from bnfold import runtime
    from bnfold.atomic import atomic_path

    if output is not None:  # never over the inputs file or the compiled folder's own files
        from bnfold.outputs import check_side_output

        check_side_output(output, outdir, inputs)
    model = runtime.load(outdir, threads=threads)
    if inputs is not None:  # .npz or .npy, as verify reads them
        from bnfold.check import load_arrays

        feeds = load_arrays(inputs, [s.name for s in model.inputs])
    else:
        rng = np.random.default_rng(0)
        feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in model.inputs}
    times, outs = [], {}
    for _ in range(repeat):
        start = time.perf_counter()
        outs = model.run(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    how = "emulated, qemu" if isinstance(model, runtime.QemuModel) else "native"
    if model.threads is not None:
        how += f", {model.threads} thread{'s' if model.threads != 1 else ''}"
    click.echo(f"{outdir} ({model.target}, {how}): median {statistics.median(times):.2f} ms "
               f"over {repeat} run(s)")  # fmt: skip
    for name, a in outs.items():
        stats = f"min {a.min():.4g} max {a.max():.4g} mean {a.mean():.4g}" if a.size else "empty"
        click.echo(f"  {name}: {a.dtype}{list(a.shape)} {stats}")
    if output is not None:
        # What np.savez does, by hand: np.savez(f, **outs) breaks on an output named like
        # one of its own parameters ('file', 'allow_pickle').
        with atomic_path(output, suffix=".npz") as tmp, zipfile.ZipFile(tmp, "w") as z:
            for name, a in outs.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(a), allow_pickle=False)
        click.echo(f"wrote {output}")


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def targets_cmd(as_json: bool) -> None:
    """List the targets, and whether this machine can build and run each (and why not)."""
    rows = []
    for name, target in TARGETS.items():
        build, run = target.can_build(), target.can_run()
        rows.append({
            "name": name, "summary": target.summary, "default": target.spec,
            "cpus": list(target.cpus), "build": build.ok, "build_note": build.why,
            "run": run.ok, "run_note": run.why, "debian_packages": list(target.debian_packages),
        })  # fmt: skip
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']:<7} {r['summary']}")
        click.echo(f"        build here: {'yes' if r['build'] else 'no'}"
                   + (f": {r['build_note']}" if r["build_note"] else ""))  # fmt: skip
        click.echo(f"        run here:   {'yes' if r['run'] else 'no'}"
                   + (f": {r['run_note']}" if r["run_note"] else ""))  # fmt: skip
        if r["cpus"]:
            click.echo(f"        cpu/arch:   {', '.join(r['cpus'])} (as {r['name']}:CPU)")


@click.command("tune")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-t", "--target", "target", type=TargetType(), default="x86", show_default=True,
              help="A CPU target this machine can run (tuning measures here); with --tracker, "
                   "any CPU target for the device's CPU (x86:CPU, arm64:cortex-a72).")  # fmt: skip
@click.option("--trials", type=click.IntRange(min=0), default=64, show_default=True,
              help="Measured trials in all (about 1.5 s each on 2 cores); 0: no search, only "
                   "choose among the records already in --db.")  # fmt: skip
@click.option("--trials-per-task", type=click.IntRange(min=1), default=None,
              help="Trials per tuned function (default 32, or --trials if fewer); "
                   "--trials / this many functions are tuned, those with the most time to "
                   "gain first.")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads to measure with (default: this machine's cores, as compile's "
                   "default; with --tracker, the device's default thread pool); compile with "
                   "the same --threads.")  # fmt: skip
@click.option("--db", "database", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="MetaSchedule database folder (created/extended).")  # fmt: skip
@click.option("--shape", "shapes", type=ShapeType(), multiple=True,
              help="Concrete shape of an input with dynamic dimensions. Repeatable.")  # fmt: skip
@click.option("--tracker", metavar="HOST:PORT",
              help="Measure everything on a device from this TVM RPC tracker (`bnfold serve "
                   "--tracker`) instead of here; needs --key.")  # fmt: skip
@click.option("--key", help="Device key: the tracker queue to take the device from.")
@click.option("--session-timeout", type=click.FloatRange(min=0, min_open=True),
              default=60, show_default=True, metavar="S",
              help="With --tracker: seconds one RPC session may last (one function's timing, "
                   "or one MetaSchedule measurement).")  # fmt: skip
def tune_cmd(
    model: Path,
    target: str,
    trials: int,
    trials_per_task: int | None,
    threads: int | None,
    database: Path,
    shapes: tuple[tuple[str, tuple[int, ...]], ...],
    tracker: str | None,
    key: str | None,
    session_timeout: float,
) -> None:
    """Tune MODEL's slowest fused functions with MetaSchedule into a database for `compile --db`.

    First times bnfold's own schedule of every fused function, then spends the trials on the
    functions with the most time to gain, then times the best records against bnfold's
    schedules the same way: a record is chosen only where it is faster (where bnfold's rules
    decline a function, its record is always taken). The choice goes to DB/bnfold_choice.json;
    `compile --db` applies only the chosen records. Needs psutil, cloudpickle and xgboost-cpu.

    Everything is measured on this machine, or with --tracker HOST:PORT --key KEY on a device
    the TVM RPC tracker hands out (bnfold's schedules and the records are cross-linked,
    uploaded and timed there, and the search uses MetaSchedule's RPC runner).
    """
    from bnfold.lower import tune

    if not model.is_file():
        raise BnfoldError(f"{model}: no such model file")
    display = StepDisplay()
    try:
        summary = tune.tune_model(model, target, database, trials, shapes=dict(shapes),
                                  trials_per_task=trials_per_task, threads=threads,
                                  tracker=tracker, key=key, session_timeout=session_timeout,
                                  progress=display)  # fmt: skip
    finally:
        display.close()
    threads_note = f"{summary['threads']} thread{'s' if summary['threads'] != 1 else ''}"
    click.echo(f"tuned {summary['tuned']} of {summary['tasks']} functions of {model} for "
               f"{summary['target']}: {summary['trials']} trials ({summary['trials_per_task']} "
               f"per function), timed with {threads_note}, in {summary['seconds']:.0f} s -> "
               f"{summary['database']}")  # fmt: skip
    click.echo(tune.table(summary["functions"], summary["measured_on"]))
    click.echo(f"  choice   {summary['choice_file']}")
    click.echo(f"  use it: bnfold compile {model} -t {target} --db {database} "
               f"--threads {summary['threads']} -o OUTDIR")  # fmt: skip


COMMANDS = (compile_cmd, run_cmd, targets_cmd, tune_cmd)
