"""Run one fuzz case through ``bnfold.cli.main`` in this process and check the contract.

The contract (docs/hardening.md) for ``bnfold fold IN -o OUT --report R``:

* exit 0: ``OUT`` (and ``R``) exist, nothing else is left in the output folder, ``OUT`` passes
  ``onnx.checker`` (full check), every tensor's data matches its dims, it holds no NaN/Inf the
  input did not, and where the input runs in onnxruntime the output runs too and computes the
  same outputs (random inputs, wherever the input's outputs are finite);
* exit 2: exactly one non-empty line on stderr, starting ``error:``, and the output folder is
  empty (no output, no temp file);
* never any other exit code, never a traceback, never a warning printed, never a hang.

Running in-process keeps a case at a few milliseconds (a ``python -m bnfold`` process pays about
half a second of imports). What a real process would print is reproduced: ``sys.stderr`` goes to
a buffer, file descriptor 2 to a temp file (C++ code writing to stderr is caught too), the root
logger gets no handler but the one ``bnfold.cli`` installs, and Python warnings that a real
process would show are counted as stderr output. A hang is caught by ``SIGALRM`` (Python code)
and, as a backstop for code stuck in C, ``faulthandler`` kills the process with a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import io
import logging
import os
import signal
import tempfile
import time
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper

from bnfold.cli import main
from tests.fuzz.corpus import Case

# Warnings a real process shows by default (the others are filtered out unless in __main__).
_HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
MAX_FEED_ELEMENTS = 1_000_000


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case that ran past its time limit."""


@dataclasses.dataclass
class Outcome:
    """What one ``bnfold`` invocation did, and what of it breaks the contract."""

    case: str
    argv: list[str]
    code: int | None
    stderr: str
    seconds: float
    timed_out: bool = False
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        err = " | ".join(self.stderr.strip().splitlines()[-3:])
        return f"{self.case}: exit {self.code} ({self.seconds:.2f}s): {self.problems} [{err}]"


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def run_main(argv: list[str], timeout: float = 10.0) -> tuple[int | None, str, float, bool]:
    """``bnfold.cli.main(argv)`` as a process would run it: (exit code, stderr, seconds, hung)."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = []
    fired: list[bool] = []

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        fired.append(True)
        raise CaseTimeout(f"case ran past {timeout} s")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    err = io.StringIO()
    code: int | None = None
    with tempfile.TemporaryFile() as c_err:
        saved_fd = os.dup(2)
        os.dup2(c_err.fileno(), 2)
        faulthandler.dump_traceback_later(timeout * 6 + 30, exit=True, file=saved_fd)
        t0 = time.perf_counter()
        try:
            with (
                contextlib.redirect_stderr(err),
                contextlib.redirect_stdout(io.StringIO()),
                warnings.catch_warnings(record=True) as caught,
            ):
                warnings.simplefilter("default")
                signal.setitimer(signal.ITIMER_REAL, timeout)
                try:
                    main(argv)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) or e.code is None else 1
                    code = 0 if code is None else code
                except CaseTimeout:
                    fired.append(True)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            seconds = time.perf_counter() - t0
            faulthandler.cancel_dump_traceback_later()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            signal.signal(signal.SIGALRM, old_handler)
            root.handlers = saved_handlers
            root.setLevel(saved_level)
        c_err.seek(0)
        c_text = c_err.read().decode("utf-8", "replace")
    shown = [w for w in caught if not issubclass(w.category, _HIDDEN_WARNINGS)]
    stderr = err.getvalue() + c_text
    stderr += "".join(f"{w.category.__name__}: {w.message}\n" for w in shown)
    return code, stderr, seconds, bool(fired)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def check_bad_input(code: int | None, stderr: str, out_dir: Path) -> list[str]:
    """Exit 2: one line ``error: ...``, and nothing at all in the output folder."""
    problems = []
    lines = _lines(stderr)
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    elif not lines[0].startswith("error: "):
        problems.append(f"stderr line does not start with 'error: ': {lines[0]!r}")
    left = _files(out_dir)
    if left:
        problems.append(f"left files behind: {left}")
    return problems


def _nonfinite(model: onnx.ModelProto) -> int:
    """NaN/Inf values in the float initializers and Constant values of the main graph."""
    count = 0
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute]
    for t in tensors:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, 11):
            with contextlib.suppress(Exception):
                count += int(np.count_nonzero(~np.isfinite(onnx.numpy_helper.to_array(t))))
    return count


def _feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray] | None:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        except Exception:
            return None
        shape = [d.dim_value if d.dim_value > 0 else 2 for d in tt.shape.dim]
        if int(np.prod(shape, dtype=np.float64)) > MAX_FEED_ELEMENTS:
            return None
        if dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(bool)
        elif np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[vi.name] = rng.integers(0, 3, shape).astype(dtype)
        else:
            return None
    return feeds


def _session(path: Path) -> Any:  # an onnxruntime.InferenceSession (imported lazily)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def compare_in_onnxruntime(original: Path, folded: Path) -> list[str]:
    """Where ``original`` runs in onnxruntime, ``folded`` must run and compute the same."""
    try:
        ref_sess = _session(original)
        proto = onnx.load(str(original))
        feeds = _feeds(proto)
        if feeds is None:
            return []
        ref = ref_sess.run(None, feeds)
    except Exception:
        return []  # the input itself does not run: nothing to compare against
    try:
        got = _session(folded).run(None, feeds)
    except Exception as e:
        return [f"folded model fails in onnxruntime, the input runs: {str(e).splitlines()[0]}"]
    if len(ref) != len(got):
        return [f"{len(got)} outputs, the input has {len(ref)}"]
    problems = []
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            problems.append(f"output {i}: shape {b.shape}, the input's is {a.shape}")
            continue
        if a.dtype.kind != "f":
            if not np.array_equal(a, b):
                problems.append(f"output {i} ({a.dtype}) differs")
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        finite = np.isfinite(a64)
        b64[~finite] = 0.0  # compared only where the input's output is finite
        if np.any(finite & ~np.isfinite(b64)):
            problems.append(f"output {i}: NaN/Inf where the input's output is finite")
            continue
        if not np.any(finite):
            continue
        scale = float(np.max(np.abs(a64[finite])))
        err = float(np.max(np.abs(a64 - b64)[finite]))
        rtol = 1e-2 if a.dtype == np.float16 else 1e-4
        if err > rtol * scale + 1e-5:
            problems.append(f"output {i}: max abs err {err:.3g} vs max|ref| {scale:.3g}")
    return problems


def check_output(model_path: Path, out: Path, compare: bool = True) -> list[str]:
    """Exit 0: the output is a valid model with sound tensors, equivalent to the input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnx on odd external-data keys of the input
        return _check_output(model_path, out, compare)


def _check_output(model_path: Path, out: Path, compare: bool) -> list[str]:
    try:
        proto = onnx.load(str(out))
    except Exception as e:
        return [f"output does not load: {str(e).splitlines()[0]}"]
    problems = []
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        problems.append(f"output fails onnx.checker: {str(e).splitlines()[0]}")
    for t in proto.graph.initializer:
        try:
            array = onnx.numpy_helper.to_array(t)
            if tuple(array.shape) != tuple(t.dims):
                raise ValueError(f"shape {array.shape}")
        except Exception as e:
            problems.append(f"output tensor {t.name!r} does not match its dims: {e}")
    try:
        before = _nonfinite(onnx.load(str(model_path)))
    except Exception:
        before = 0
    if _nonfinite(proto) > before:
        problems.append(f"output holds {_nonfinite(proto)} NaN/Inf values, the input {before}")
    if compare and not problems:
        problems += compare_in_onnxruntime(model_path, out)
    return problems


def fold_case(case: Case, root: Path, timeout: float = 10.0, compare: bool = True) -> Outcome:
    """Materialize ``case`` under ``root`` and run ``bnfold fold`` on it; check the contract."""
    model = case.materialize(root)
    out_dir = root / "out"
    out_dir.mkdir()
    out, report = out_dir / "folded.onnx", out_dir / "fold.json"
    argv = ["fold", str(model), "-o", str(out), "--report", str(report), *case.options]
    code, stderr, seconds, hung = run_main(argv, timeout)
    outcome = Outcome(case.name, argv, code, stderr, seconds, hung)
    outcome.problems = contract(code, stderr, hung, out_dir)
    if code == 0 and not outcome.problems:
        extra = set(_files(out_dir)) - {"folded.onnx", "folded.onnx.data", "fold.json"}
        if extra:
            outcome.problems.append(f"unexpected files in the output folder: {sorted(extra)}")
        if not out.is_file() or not report.is_file():
            outcome.problems.append("exit 0 without the output model and report")
        else:
            outcome.problems += check_output(model, out, compare)
    return outcome


def inspect_case(case: Case, root: Path, timeout: float = 10.0) -> Outcome:
    """Run ``bnfold inspect --json`` on an already materialized ``case``: exit 0 or 2."""
    model = root / "in" / "m.onnx"
    empty = root / "inspect-out"
    empty.mkdir(exist_ok=True)
    shared = case.options if case.options[:1] == ("--max-size",) else ()  # the rest is fold's
    argv = ["inspect", str(model), "--json", *shared]
    code, stderr, seconds, hung = run_main(argv, timeout)
    outcome = Outcome(case.name, argv, code, stderr, seconds, hung)
    outcome.problems = contract(code, stderr, hung, empty)
    if code == 0 and _lines(stderr):
        outcome.problems.append("exit 0 with output on stderr")
    return outcome


def contract(code: int | None, stderr: str, hung: bool, out_dir: Path) -> list[str]:
    """The exit-code part of the contract: 0, or 2 with one line; no traceback, no hang."""
    problems = []
    if hung:
        problems.append("hang (time limit)")
    if "Traceback" in stderr:
        problems.append("traceback on stderr")
    if code == 2:
        problems += check_bad_input(code, stderr, out_dir)
    elif code == 0:
        if _lines(stderr):
            problems.append(f"exit 0 but stderr says: {_lines(stderr)[:2]}")
    else:
        problems.append(f"exit code {code}")
    return problems
