"""The fold report: what happened to every BatchNormalization, and what each pass cost."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from bnfold.passes._util import Record


@dataclasses.dataclass
class PassStat:
    """One pipeline step: its name, whether it changed the model, its time and node counts."""

    name: str
    modified: bool
    ms: float
    nodes_before: int
    nodes_after: int
    changed: int
    declined: int


@dataclasses.dataclass
class FoldReport:
    """Everything ``bnfold fold`` did, one record per BatchNormalization.

    ``batchnorms`` holds exactly one record per BN of the input: ``folded`` (``direction``
    backward/forward, ``into`` the absorbing nodes), ``affine`` (rewritten as Mul+Add; ``reason``
    says why it could not fold) or ``kept`` (``reason`` says why). ``affine_ops`` lists the
    constant Mul/Add/Sub/Div that folded too; ``pads`` every Pad, ``folded`` into its Conv/pool or
    ``kept`` (``reason`` says why). ``merges`` has one record per sum of parallel branches:
    ``merged`` (``into`` the conv, ``detail`` the branches) or ``kept`` (``reason``).
    """

    source: str
    bn_before: int = 0
    bn_after: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    batchnorms: list[Record] = dataclasses.field(default_factory=list)
    affine_ops: list[Record] = dataclasses.field(default_factory=list)
    pads: list[Record] = dataclasses.field(default_factory=list)
    merges: list[Record] = dataclasses.field(default_factory=list)
    passes: list[PassStat] = dataclasses.field(default_factory=list)
    pass_ms: float = 0.0
    total_ms: float = 0.0

    def counts(self) -> dict[str, int]:
        """BN outcomes: folded_backward, folded_forward, affine, kept."""
        c: collections.Counter[str] = collections.Counter()
        for r in self.batchnorms:
            c[f"folded_{r.direction}" if r.action == "folded" else r.action] += 1
        return {k: c.get(k, 0) for k in ("folded_backward", "folded_forward", "affine", "kept")}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``--report`` file)."""
        d = dataclasses.asdict(self)
        d["counts"] = self.counts()
        return d

    def summary(self) -> str:
        """Two lines of totals: BN outcomes, node counts and time."""
        c = self.counts()
        return (
            f"BN: {self.bn_before} -> {self.bn_after}  (folded backward {c['folded_backward']}, "
            f"forward {c['folded_forward']}, as Mul+Add {c['affine']}, kept {c['kept']}); "
            f"constant Mul/Add folded: {len(self.affine_ops)}" + self._merge_summary() + "\n"
            f"nodes: {self.nodes_before} -> {self.nodes_after}; pass time {self.pass_ms:.1f} ms, "
            f"total {self.total_ms:.1f} ms"
        )

    def _merge_summary(self) -> str:
        if not self.merges:
            return ""
        merged = sum(1 for r in self.merges if r.action == "merged")
        return f"; branches merged: {merged}, kept: {len(self.merges) - merged}"

    def table(self) -> str:
        """A plain-text table of every BN, then totals (what the CLI prints)."""
        rows = [("BatchNormalization", "result", "into / reason")]
        for r in self.batchnorms:
            if r.action == "folded":
                rows.append((r.node, f"folded {r.direction}", ", ".join(r.into)))
            else:
                rows.append((r.node, r.action, r.reason or ""))
        for r in self.merges:
            # Parallel-branch sums (merge_branches) below the BNs, in the same three columns.
            into = f"{r.detail} into {', '.join(r.into)}" if r.into else f"{r.detail}: {r.reason}"
            rows.append((r.node, f"{r.action} branches", into))
        w0 = min(max(len(r[0]) for r in rows), 48)
        w1 = max(len(r[1]) for r in rows)

        def fit(name: str) -> str:
            # Exporters' names share long prefixes; the tail is what tells two nodes apart.
            return name if len(name) <= w0 else "…" + name[-(w0 - 1) :]

        lines = [f"{fit(a):<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
        lines.insert(1, "-" * min(w0 + w1 + 40, 120))
        lines.append("")
        lines.append(self.summary())
        return "\n".join(lines)
