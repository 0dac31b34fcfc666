"""``bnfold tune`` and ``compile --db``: a tuned record is used only where it is measured faster.

The planning and the decision rule are plain functions (tested without TVM); the end-to-end test
tunes one function of a tiny model with MetaSchedule (half a minute; needs psutil, cloudpickle and
xgboost-cpu), then checks that ``compile --db`` applies exactly the records the choice file names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

from bnfold import tune
from bnfold.tune import Function, decide, plan

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
    from bnfold import lower
    from bnfold.cli_lower import tune_cmd

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
