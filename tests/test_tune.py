"""``bnfold tune`` and ``compile --db``: a tuned record is used only where it is measured faster.

The planning and the decision rule are plain functions (tested without TVM); the end-to-end test
tunes one function of a tiny model with MetaSchedule (half a minute; needs psutil, cloudpickle and
xgboost-cpu), then checks that ``compile --db`` applies exactly the records the choice file names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

from bnfold.lower import tune
from bnfold.lower.tune import Function, decide, plan

# A conv, a pool and a dense layer: the smallest model with something to tune.
TINY = """
<ir_version: 8, opset_import: ["" : 17]>
tiny (float[1,4,8,8] x) => (float[1,16] y) <
    float[8,4,1,1] w = {1, -1, 2, 0.5, 1, 1, 0, -2, 1, 0.25, -1, 2, 1, 1, -1, 0.5,
                        2, 1, 1, 1, -1, 0, 1, 2, 0.5, 1, -1, 1, 1, 2, 1, -0.5},
    float[8,16] fc = {LOTS}
> {
    c = Conv (x, w)
    r = Relu (c)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    y = MatMul (f, fc)
}
""".replace("{LOTS}", "{" + ", ".join(str((i % 7) - 3) for i in range(128)) + "}")


def _fn(name: str, ms: float, gflop: float, weight: int = 1, rule: str = "bnfold_conv") -> Function:
    return Function(name, name, weight, rule, ms, flops=gflop * 1e9)


def test_plan_spends_the_trials_where_the_time_can_be_gained() -> None:
    functions = [
        # The heaviest, but already at the best FLOP rate of the model: nothing to gain.
        _fn("conv1x1", 1.0, 0.1, weight=3),
        _fn("depthwise", 0.7, 0.006),  # ~8 GFLOP/s against 100: almost all of it to gain
        _fn("unscheduled", 0.5, 0.0, rule="unscheduled"),
        _fn("tiny", 0.01, 0.0),
    ]
    chosen, per_task = plan(functions, 64)
    assert [f.function for f in chosen] == ["depthwise", "unscheduled"]
    assert per_task == 32
    chosen, per_task = plan(functions, 10)  # fewer trials than the default per function
    assert [f.function for f in chosen] == ["depthwise"] and per_task == 10
    chosen, per_task = plan(functions, 9, trials_per_task=3)
    assert [f.function for f in chosen] == ["depthwise", "unscheduled", "tiny"]
    assert per_task == 3
    assert len(plan(functions, 1000)[0]) == len(functions)
    assert plan(functions, 0) == ([], 0)


def test_decide_takes_a_record_only_where_it_is_measurably_faster() -> None:
    assert decide("bnfold_conv:conv1x1", 1.0, 0.9) == "tuned"
    assert decide("bnfold_conv:conv1x1", 1.0, 0.99) == "bnfold"  # within the margin
    assert decide("bnfold_conv:conv1x1", 1.0, 3.0) == "bnfold"
    assert decide("bnfold_conv:conv1x1", 1.0, None) == "bnfold"
    # Where bnfold's rules decline, the record wins unless it is clearly slower.
    assert decide("unscheduled", 1.0, 1.01) == "tuned"
    assert decide("unscheduled", 1.0, 1.5) == "bnfold"
    assert decide("unscheduled", 1.0, None) == "bnfold"


def _set_choice(db: Path, chosen: str) -> dict[str, Any]:
    """Rewrite the choice file: every function with a record chooses ``chosen``."""
    path = db / tune.CHOICE_FILE
    choice = json.loads(path.read_text())
    for entry in choice["workloads"].values():
        if entry["record"]:
            entry["chosen"] = chosen
    path.write_text(json.dumps(choice))
    return choice


def _tuned(choice: dict[str, Any]) -> int:
    """Functions that should take a record under ``choice`` (the compiled module holds one
    PrimFunc per workload, however often it is called)."""
    return sum(1 for e in choice["workloads"].values() if e["chosen"] == "tuned")


@pytest.mark.slow
@pytest.mark.tvm
def test_tune_writes_a_choice_and_compile_applies_only_it(tmp_path: Path) -> None:
    """`bnfold tune --trials 1` on a tiny model, then `compile --db` (about 30 s)."""
    pytest.importorskip("tvm")
    pytest.importorskip("onnxscript")
    if tune.missing_packages():
        pytest.skip(f"MetaSchedule needs {', '.join(tune.missing_packages())}")
    from bnfold.cli.lower import tune_cmd
    from bnfold.lower import compiler as lower

    path = tmp_path / "tiny.onnx"
    onnx.save(onnx.parser.parse_model(TINY), path)
    db = tmp_path / "db"
    result = CliRunner().invoke(
        tune_cmd, [str(path), "--trials", "1", "--threads", "1", "--db", str(db)]
    )
    assert result.exit_code == 0, result.output
    assert "bnfold ms" in result.output and "chosen" in result.output  # the table

    choice = json.loads((db / tune.CHOICE_FILE).read_text())
    assert choice["format"] == tune.CHOICE_FORMAT
    entries = list(choice["workloads"].values())
    assert {e["function"] for e in entries} >= {"mean", "matmul"}
    searched = [e for e in entries if e["record"]]
    assert len(searched) == 1  # one trial: the function with the most to gain, only
    for e in entries:
        assert e["threads"] == 1 and e["bnfold_ms"] > 0
        assert e["chosen"] == decide(e["rule"], e["bnfold_ms"], e["tuned_ms"])

    # compile --db applies exactly the chosen records: as tuned, then forced both ways.
    for forced in (None, "tuned", "bnfold"):
        if forced is not None:
            choice = _set_choice(db, forced)
        m = lower.compile_model(path, "x86", tmp_path / f"out_{forced}", database=db, threads=1)
        assert m.verification["status"] == "passed"
        assert m.compile["schedule_rules"].get("tuned:database", 0) == _tuned(choice), forced
        assert m.compile["tuning_database"] == str(db)
    assert _tuned(_set_choice(db, "tuned")) >= 1

    # --trials 0: no search, the choice is made again from the records already there.
    result = CliRunner().invoke(tune_cmd, [str(path), "--trials", "0", "--threads", "1",
                                           "--db", str(db)])  # fmt: skip
    assert result.exit_code == 0, result.output
    again = json.loads((db / tune.CHOICE_FILE).read_text())
    assert sum(1 for e in again["workloads"].values() if e["record"]) == 1
    assert all(
        e["chosen"] == decide(e["rule"], e["bnfold_ms"], e["tuned_ms"])
        for e in again["workloads"].values()
    )


@pytest.mark.tvm
def test_tune_refuses_bad_arguments(tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    from bnfold.errors import BnfoldError

    with pytest.raises(BnfoldError, match="trials must be >= 0"):
        tune.tune_model(tmp_path / "m.onnx", "x86", tmp_path / "db", -1)
    with pytest.raises(BnfoldError, match="CPU targets only"):
        tune.tune_model(tmp_path / "m.onnx", "cuda", tmp_path / "db", 1)
    (tmp_path / tune.CHOICE_FILE).write_text("{}")
    with pytest.raises(BnfoldError, match=r"not a bnfold\.tune_choice/1 file"):
        tune.read_choice(tmp_path)


def _tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(onnx.parser.parse_model(TINY), path)
    return path


def _tune_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m bnfold tune ARGS`` in a fresh process: MetaSchedule configures its loggers
    once per process, and a second search under pytest (whose capture handlers it copies
    without names) fails in its logging setup, not in bnfold."""
    return subprocess.run([sys.executable, "-m", "bnfold", "tune", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def _skip_without_tracker_tuning() -> None:
    pytest.importorskip("tvm")
    pytest.importorskip("onnxscript")
    pytest.importorskip("tornado")  # TVM's tracker needs it; apache-tvm does not declare it
    if tune.missing_packages():
        pytest.skip(f"MetaSchedule needs {', '.join(tune.missing_packages())}")


def _measured_through(db: Path, measured_on: str) -> dict[str, Any]:
    """The choice file, checked to say every time in it was measured on ``measured_on``."""
    choice = json.loads((db / tune.CHOICE_FILE).read_text())
    assert choice["measured_on"] == measured_on
    assert {e["measured_on"] for e in choice["workloads"].values()} == {measured_on}
    entries = list(choice["workloads"].values())
    assert sum(1 for e in entries if e["record"]) == 1  # the search's record, timed there
    for e in entries:
        assert e["threads"] == 1 and e["bnfold_ms"] > 0
        assert e["chosen"] == decide(e["rule"], e["bnfold_ms"], e["tuned_ms"])
    return choice


def _compile_applies(path: Path, target: str, db: Path, out: Path) -> None:
    """`compile --db` with every record chosen: the records apply and the compiled model
    matches onnxruntime (compile's own verification, under qemu for arm64)."""
    from bnfold.lower import compiler as lower

    choice = _set_choice(db, "tuned")
    assert _tuned(choice) >= 1
    m = lower.compile_model(path, target, out, database=db, threads=1)
    assert m.verification["status"] == "passed", m.verification
    assert m.compile["schedule_rules"].get("tuned:database", 0) == _tuned(choice)


@pytest.mark.slow
@pytest.mark.tvm
def test_tune_measures_on_a_device_from_the_tracker(tmp_path: Path) -> None:
    """`bnfold tune --tracker --key`: bnfold's schedules, the search (MetaSchedule's RPCRunner)
    and the choice are all timed on a server taken from a TVM tracker (about 40 s)."""
    _skip_without_tracker_tuning()
    from bnfold.testing.rpc import free_port, start_server, start_tracker, stop, wait_free

    path = _tiny(tmp_path)
    db = tmp_path / "db"
    tracker, addr = start_tracker()
    procs = [tracker]
    try:
        procs.append(start_server(free_port(), addr, "edge"))
        wait_free(addr, "edge", 1)
        result = _tune_cli(str(path), "--trials", "2", "--trials-per-task", "2", "--threads",
                           "1", "--db", str(db), "--tracker", addr, "--key", "edge",
                           "--session-timeout", "30")  # fmt: skip
    finally:
        stop(procs)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    where = f"tracker {addr} key edge"
    assert f"times measured on: {where}" in result.stdout, result.stdout
    _measured_through(db, where)
    _compile_applies(path, "x86", db, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.tvm
@pytest.mark.qemu
def test_tune_arm64_on_an_emulated_device_from_the_tracker(tmp_path: Path) -> None:
    """`bnfold tune -t arm64 --tracker --key` against the emulated aarch64 RPC server (qemu):
    cross-linked libraries timed on the device (its TVM has no random fill for MetaSchedule's
    arguments: filled from here); then `compile --db` for arm64 applies them (about 40 s)."""
    _skip_without_tracker_tuning()
    from bnfold.device import emulate
    from bnfold.targets import get
    from bnfold.testing.rpc import free_port, start_tracker, stop, wait_free

    root = Path(os.environ.get(emulate.ROOT_ENV) or emulate.default_root())
    why = emulate.why_not_ready(root)
    if why:
        if os.environ.get(emulate.ROOT_ENV):
            pytest.fail(f"{emulate.ROOT_ENV} is set but unusable: {why}")
        pytest.skip(why)
    if not get("arm64").can_build():
        pytest.skip(get("arm64").can_build().why)
    path = _tiny(tmp_path)
    db = tmp_path / "db"
    tracker, addr = start_tracker()
    procs: list[Any] = [tracker]
    try:
        server, _ = emulate.start_server(port=free_port(), tracker=addr, key="aarch64",
                                         root=root, stderr=subprocess.DEVNULL)  # fmt: skip
        procs.append(server)
        wait_free(addr, "aarch64", 1)
        result = _tune_cli(str(path), "-t", "arm64", "--trials", "2", "--trials-per-task", "2",
                           "--threads", "1", "--db", str(db), "--tracker", addr, "--key",
                           "aarch64")  # fmt: skip
    finally:
        stop(procs)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    where = f"tracker {addr} key aarch64"
    assert f"times measured on: {where}" in result.stdout and "for arm64" in result.stdout
    _measured_through(db, where)
    _compile_applies(path, "arm64", db, tmp_path / "out")


@pytest.mark.tvm
def test_tune_tracker_needs_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--tracker without --key (or --key alone) is one line on stderr and exit 2, before any
    work."""
    pytest.importorskip("tvm")
    from bnfold.cli import main

    path = _tiny(tmp_path)
    db = tmp_path / "db"
    for extra, message in (
        (["--tracker", "127.0.0.1:9190"], "--tracker needs --key"),
        (["--key", "edge"], "--key needs --tracker"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["tune", str(path), "--db", str(db), *extra])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not db.exists()
