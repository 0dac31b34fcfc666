"""CLI commands for devices and speed: ``bnfold deploy``, ``bnfold serve``, ``bnfold bench``.

Registered explicitly by :mod:`bnfold.cli` through :data:`COMMANDS`. Nothing heavy is imported
here at module level (tvm takes seconds to import).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import click

from bnfold.cli.types import tolerance_options
from bnfold.errors import BnfoldError, CheckFailed


@click.command("deploy")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rpc", "rpc", metavar="HOST:PORT", help="A TVM RPC server (`bnfold serve`).")
@click.option("--tracker", metavar="HOST:PORT", help="A TVM RPC tracker; needs --key.")
@click.option("--key", help="Device key: the tracker queue to take a server from.")
@click.option(
    "--inputs",
    type=click.Path(dir_okay=False, path_type=Path),
    help="An .npz (one array per input, the compiled shapes or N x the compiled batch, run in N "
    "slices); random inputs when absent.",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Timed runs on the device (p50/p90/min).",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Untimed runs before timing.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the result as JSON.",
)
@click.option("--max-lsb", type=click.IntRange(min=0), default=1, show_default=True,
              help="int8 artifacts: the gate, every quantized tensor within this many "
                   "quantization steps of onnxruntime's, layer by layer (as in compile).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300,
              show_default=True, metavar="S",
              help="Seconds each RPC call (connect, upload, load, a run, the timing) may take "
                   "before deploy gives up (exit 2).")  # fmt: skip
@tolerance_options(atol=0.0, rtol=1e-4, what="the gate")
def deploy_cmd(
    outdir: Path,
    rpc: str | None,
    tracker: str | None,
    key: str | None,
    inputs: Path | None,
    repeat: int,
    warmup: int,
    json_out: Path | None,
    max_lsb: int,
    timeout: float,
    atol: float,
    rtol: float,
) -> None:
    """Run a `bnfold compile` folder on a device over TVM RPC, check it and time it there.

    Uploads OUTDIR's model.so to the server (--rpc, or one taken from --tracker by --key), loads
    it in the Relax VM on the device's CPU, runs it, downloads the outputs and compares them
    with the ORIGINAL (unfolded) model in onnxruntime on this host (model.folded.onnx if the
    original is gone; the output says so). Then times it on the device with TVM's
    time_evaluator. Exit code 1 if it fails the gate max abs error <= ATOL + RTOL x max|ref|.
    """
    from bnfold import atomic
    from bnfold.device import deploy

    if not rpc and not tracker:
        raise click.UsageError("give --rpc HOST:PORT, or --tracker HOST:PORT with --key")
    if json_out is not None:  # never over the inputs or the compiled folder's own files
        from bnfold.outputs import check_side_output

        check_side_output(json_out, outdir, inputs)
    result = deploy.deploy(
        outdir,
        rpc,
        key=key,
        tracker=tracker,
        inputs=inputs,
        atol=atol,
        rtol=rtol,
        warmup=warmup,
        repeat=repeat,
        max_lsb=max_lsb,
        timeout=timeout,
    )
    ref = "the original model" if not result.reference_note else "model.folded.onnx"
    click.echo(
        f"deployed {outdir} ({result.target}) to {result.device} over RPC: upload "
        f"{result.upload_s:.2f} s, load {result.load_s:.2f} s, "
        f"{'first run' if result.samples == 1 else f'{result.samples} runs'} {result.run_s:.2f} s"
    )
    if result.reference_note:
        click.echo(f"note: {result.reference_note}")
    lw = result.layerwise
    if lw is not None:
        click.echo(f"int8, layer by layer on the device (first input): {lw['tensors']} quantized "
                   f"tensors, max difference {lw['max_lsb']} LSB ({lw['worst']})")  # fmt: skip
        ref += " (end to end; not gated for int8: rounding differences compound)"
    click.echo(f"device outputs vs {ref} in onnxruntime on this host, inputs {result.inputs}:")
    click.echo(result.table)
    lat = result.latency_ms
    click.echo(
        f"on-device latency ({lat['samples']:.0f} runs): p50 {lat['p50']:.3f} ms  "
        f"p90 {lat['p90']:.3f} ms  min {lat['min']:.3f} ms"
    )
    if json_out is not None:
        atomic.write_json(json_out, result.to_dict())
    click.echo("PASS" if result.passed else "FAIL")
    if not result.passed and lw is not None:
        raise CheckFailed(f"int8 device outputs differ from onnxruntime by up to {lw['max_lsb']} "
                          f"quantization steps in {lw['worst']} (gate {max_lsb})")  # fmt: skip
    if not result.passed:
        raise CheckFailed(
            f"device outputs differ: worst max_abs/max|ref| = "
            f"{result.worst_ratio:.3g} (gate {atol:g} + {rtol:g} x max|ref|)"
        )


@click.command("serve")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but loopback exposes the server: see below.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=9090, show_default=True)
@click.option(
    "--port-end",
    type=click.IntRange(1, 65536),
    help="Try ports PORT..PORT_END-1 until one is free (default: only PORT).",
)
@click.option("--tracker", metavar="HOST:PORT", help="Register with this TVM RPC tracker.")
@click.option("--key", default="", help="Device key to register under (needed with --tracker).")
@click.option(
    "--emulate",
    type=click.Choice(["arm64"]),
    help="Serve from an aarch64 Python under qemu-user (the root `make arm64-root` builds; "
    "$BNFOLD_ARM64_ROOT), to deploy arm64 artifacts without a board.",
)
def serve_cmd(
    host: str, port: int, port_end: int | None, tracker: str | None, key: str, emulate: str | None
) -> None:
    """Start a TVM RPC server for `bnfold deploy` (runs until interrupted).

    With --emulate arm64 the server is an aarch64 Linux Python run by qemu-aarch64-static on
    this machine: arm64 artifacts run there as real aarch64 code, so `bnfold deploy` checks
    their outputs; its latencies are the emulator's, not an ARM CPU's.

    SECURITY: TVM RPC has no authentication and no encryption. Whoever reaches the port can
    upload and run arbitrary code as this user. It listens on 127.0.0.1 by default; bind
    another --host only on an isolated network (a lab VLAN, an SSH tunnel, a VPN), and prefer
    registering with a --tracker under a --key that only your clients know, so that
    clients take devices from the tracker instead of connecting to addresses directly.
    """
    from bnfold import rpc

    logging.getLogger("bnfold").setLevel(logging.INFO)
    if emulate:
        _serve_emulated(host, port, port_end, tracker, key)
        return
    state = rpc.serve(host, port, port_end, tracker=tracker, key=key)
    where = f", registered with {tracker} as '{key}'" if tracker else ""
    click.echo(f"TVM RPC server listening on {host}:{state.port}{where} (Ctrl-C stops it)")
    thread: threading.Thread = state.thread
    try:
        while thread.is_alive():
            thread.join(1.0)
    except BaseException as e:  # SIGINT/SIGTERM (bnfold.cli's Interrupted) or KeyboardInterrupt
        # TVM's listening thread is not a daemon and never returns: leave without joining it.
        click.echo("stopping the RPC server", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + int(getattr(e, "signum", signal.SIGINT)))


def _serve_emulated(
    host: str, port: int, port_end: int | None, tracker: str | None, key: str
) -> None:
    """``serve --emulate arm64``: run the server in the emulated Python until it exits or this
    process is interrupted (then stop it and exit 128 + signal)."""
    from bnfold.device import emulate

    proc, bound = emulate.start_server(host, port, port_end, tracker=tracker, key=key)
    where = f", registered with {tracker} as '{key}'" if tracker else ""
    click.echo(f"aarch64 TVM RPC server (qemu-user, emulated) listening on {host}:{bound}{where} "
               "(Ctrl-C stops it)")  # fmt: skip
    try:
        code = proc.wait()
    except BaseException as e:  # SIGINT/SIGTERM (bnfold.cli's Interrupted) or KeyboardInterrupt
        click.echo("stopping the RPC server", err=True)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise e
    raise BnfoldError(f"the emulated RPC server exited with {code}")


@click.command("bench")
@click.argument("model_or_outdir", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--target",
    default="x86",
    show_default=True,
    help="Target to compile for when given a model (must run on this host).",
)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Rounds of alternating blocks (each engine runs a block per round).",
)
@click.option(
    "--block",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Timed runs per engine per round.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the result as JSON.",
)
@click.option(
    "--max-latency-ms",
    type=click.FloatRange(min=0),
    help="Gate: exit 1 if the compiled model's median is above this.",
)
@click.option(
    "--max-ratio",
    type=click.FloatRange(min=0),
    help="Gate: exit 1 if compiled median / onnxruntime (ORT_ENABLE_ALL) median is above this.",
)
def bench_cmd(
    model_or_outdir: Path,
    target: str,
    threads: int,
    rounds: int,
    block: int,
    json_out: Path | None,
    max_latency_ms: float | None,
    max_ratio: float | None,
) -> None:
    """Time the compiled model against onnxruntime, fairly, on this machine.

    MODEL_OR_OUTDIR is a `bnfold compile` folder, or an ONNX model (compiled first into a
    temporary folder). Four engines each run in their own process, timed in alternating blocks
    (never two at once): onnxruntime on the original (ORT_ENABLE_ALL, and optimizations off),
    onnxruntime on the folded model (ORT_ENABLE_ALL) and the compiled artifact. Prints medians,
    p90 and ratios to onnxruntime. Exit code 1 if a gate fails.
    """
    from bnfold import atomic
    from bnfold.device import bench

    result = bench.bench(
        model_or_outdir, target=target, threads=threads, rounds=rounds, block=block
    )
    click.echo(bench.table(result))
    if json_out is not None:
        atomic.write_json(json_out, result)
    failures = bench.gate(result, max_latency_ms=max_latency_ms, max_ratio=max_ratio)
    if failures:
        raise CheckFailed("; ".join(failures))
    if max_latency_ms is not None or max_ratio is not None:
        click.echo("gates: PASS")


COMMANDS = (deploy_cmd, serve_cmd, bench_cmd)
