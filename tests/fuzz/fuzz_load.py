"""Long-run fuzz target for bnfold's input handling (hypothesis, or atheris when installed).

Run from the repository root::

    python -m tests.fuzz.fuzz_load --examples 20000              # hypothesis (default)
    python -m tests.fuzz.fuzz_load --examples 2000 --real .cache/models/ppocr_cls.onnx \\
        --seeds ppocr_cls                                       # mutations of a real model
    python -m tests.fuzz.fuzz_load --engine atheris --examples 20000   # coverage-guided

Each example is one case checked against the contract of ``tests/fuzz/harness.py`` (exit 0 with
a valid, equivalent output, or exit 2 with one line and nothing left behind; never a traceback,
another exit code or a hang). With hypothesis, an example is either a corpus case
(``family/seed/index`` with a fresh index: ``corpus.make_case`` reproduces it) or raw byte edits
of a seed drawn by hypothesis itself. Failing cases are copied to ``--keep`` and listed at the
end; the exit status is 1 if there was any.

atheris (``pip install atheris``, a separate venv: docs/hardening.md) drives the same cases from
its coverage-guided byte stream and stops at the first failure, as libFuzzer does.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.fuzz import corpus, harness


class Run:
    """Counts and failures of one fuzz run."""

    def __init__(self, work: Path, keep: Path | None, timeout: float, inspect_every: int) -> None:
        self.work, self.keep, self.timeout = work, keep, timeout
        self.inspect_every = inspect_every
        self.count = 0
        self.codes: collections.Counter[tuple[str, int | None]] = collections.Counter()
        self.failures: list[str] = []
        self.slowest = (0.0, "")
        self.t0 = time.perf_counter()

    def check(self, case: corpus.Case) -> harness.Outcome:
        """Fold (and every so often inspect) ``case``; record the outcome."""
        root = self.work / f"c{self.count}"
        self.count += 1
        outcome = harness.fold_case(case, root, self.timeout)
        outcomes = [outcome]
        if self.count % self.inspect_every == 0:
            outcomes.append(harness.inspect_case(case, root, self.timeout))
        family = case.name.split("/")[0]
        self.codes[(family, outcome.code)] += 1
        self.slowest = max(self.slowest, (outcome.seconds, case.name))
        bad = [o for o in outcomes if not o.ok]
        if bad:
            self.failures += [o.describe() for o in bad]
            if self.keep is not None:
                shutil.copytree(root, self.keep / case.name.replace("/", "_"), symlinks=True)
        shutil.rmtree(root, ignore_errors=True)
        if self.count % 1000 == 0:
            rate = self.count / (time.perf_counter() - self.t0)
            print(f"{self.count} cases, {len(self.failures)} failures, {rate:.0f}/s", flush=True)
        return bad[0] if bad else outcome

    def summary(self) -> str:
        seconds = time.perf_counter() - self.t0
        lines = [f"{self.count} cases in {seconds:.0f} s, {len(self.failures)} failures"]
        by_family: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for (family, code), n in sorted(self.codes.items(), key=str):
            by_family[family][f"exit {code}"] = n
        lines += [f"  {family:<12} {codes}" for family, codes in sorted(by_family.items())]
        lines.append(f"  slowest case: {self.slowest[1]} ({self.slowest[0]:.2f} s)")
        lines += [f"  FAIL {f}" for f in self.failures[:50]]
        return "\n".join(lines)


def byte_edit_case(
    seed: str, cut: float, edits: list[tuple[float, int]], index: int
) -> corpus.Case:
    """Seed ``seed`` with ``edits`` (relative position, new byte) applied, cut at ``cut``."""
    data = bytearray(corpus._bytes(corpus.seed_model(seed)))
    for pos, value in edits:
        data[min(int(pos * len(data)), len(data) - 1)] = value
    data = data[: max(1, int(cut * len(data)))]
    return corpus.Case(f"hbytes/{seed}/{index}", {corpus.MODEL: bytes(data)})


def run_hypothesis(run: Run, examples: int, families: list[str], seeds: list[str]) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    kinds = [*families, "hbytes"]
    # Every example draws the same things; the family goes round outside hypothesis (whose own
    # choice would favour a few), and picks what is used: the case index (above the suite's)
    # for a corpus family, the cut and byte edits for "hbytes".
    draws = st.tuples(
        st.sampled_from(seeds),
        st.integers(0, 2**32 - 1),
        st.one_of(st.just(1.0), st.floats(0.0, 1.0)),
        st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=12),
    )

    def case(seed: str, salt: int, cut: float, edits: list[tuple[float, int]]) -> corpus.Case:
        kind = kinds[run.count % len(kinds)]
        if kind == "hbytes":
            return byte_edit_case(seed, cut, edits, run.count)
        return corpus.make_case(kind, seed, 10_000 + (run.count << 32) + salt)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # a fuzz run: no shrinking, every failure is kept and listed
        suppress_health_check=list(HealthCheck),
    )
    @given(draws)
    def one(drawn: tuple[str, int, float, list[tuple[float, int]]]) -> None:
        run.check(case(*drawn))

    one()


def run_atheris(run: Run, examples: int, families: list[str], seeds: list[str]) -> None:
    import atheris  # type: ignore[import-not-found]

    with atheris.instrument_imports():  # coverage feedback from bnfold's own code
        for module in ("bnfold.ir", "bnfold.pipeline", "bnfold.passes.fold_bn", "bnfold.cli"):
            importlib.import_module(module)

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        seed = fdp.PickValueInList(seeds)
        if fdp.ConsumeBool():
            case = corpus.make_case(fdp.PickValueInList(families), seed, fdp.ConsumeUInt(4))
        else:
            cut = fdp.ConsumeProbability() if fdp.ConsumeBool() else 1.0
            edits = [
                (fdp.ConsumeProbability(), fdp.ConsumeUInt(1))
                for _ in range(fdp.ConsumeIntInRange(0, 12))
            ]
            case = byte_edit_case(seed, cut, edits, run.count)
        outcome = run.check(case)
        if not outcome.ok:
            raise AssertionError(outcome.describe())

    flags = [f"-runs={examples}", "-rss_limit_mb=8192", "-max_len=256"]
    atheris.Setup([sys.argv[0], *flags], one_input)
    atheris.Fuzz()


ENGINES: dict[str, Callable[[Run, int, list[str], list[str]], None]] = {
    "hypothesis": run_hypothesis,
    "atheris": run_atheris,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="How many cases to run.")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="hypothesis")
    parser.add_argument("--families", nargs="*", default=list(corpus.FAMILIES))
    parser.add_argument("--real", nargs="*", default=[], type=Path, help="Real ONNX seeds.")
    parser.add_argument("--seeds", nargs="*", help="Only these seeds (file stems for --real).")
    parser.add_argument("--timeout", type=float, default=30.0, help="Seconds per case.")
    parser.add_argument("--inspect-every", type=int, default=5, help="Also inspect 1 in N.")
    parser.add_argument("--keep", type=Path, help="Copy failing cases here.")
    args = parser.parse_args(argv)
    for path in args.real:
        corpus.add_file_seed(path.stem, path)
    seeds = args.seeds or sorted(corpus.SEEDS)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bnfold-fuzz-") as work:
        run = Run(Path(work), args.keep, args.timeout, args.inspect_every)
        try:
            ENGINES[args.engine](run, args.examples, args.families, seeds)
        finally:
            print(run.summary(), flush=True)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
