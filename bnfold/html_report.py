"""One self-contained HTML page of what bnfold did to a model (``fold`` / ``compile --report
x.html``): the fold report with every BN, Pad and branch sum and its reason, the verification
(per output, and per layer when it was asked for), the compile steps and schedule rules, and the
int8 SQNR plot when the model was quantized.

The page holds everything it shows (inline CSS, images as data URIs): it can be mailed or
attached to a CI run. It has no script. Every string that comes from the model (node and tensor
names are user-controlled) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bnfold.artifact import Manifest
from bnfold.atomic import write_bytes

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #116611; font-weight: 600; } .fail { color: #b00020; font-weight: 600; }
.muted { color: #666; } code { font-size: .95em; } img { max-width: 100%; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return _e(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: set[int] = frozenset()
           ) -> str:  # fmt: skip
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_num(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict(passed: bool | None) -> str:
    if passed is None:
        return '<span class="muted">not verified</span>'
    return '<span class="pass">PASS</span>' if passed else '<span class="fail">FAIL</span>'


def _fold_section(fold: Mapping[str, Any]) -> str:
    if "skipped" in fold:
        return f'<h2>Fold</h2><p class="muted">{_e(fold["skipped"])}</p>'
    c = fold.get("counts", {})
    parts = [
        "<h2>Fold</h2>",
        f"<p>BatchNormalization {_e(fold.get('bn_before'))} &rarr; {_e(fold.get('bn_after'))}: "
        f"folded backward {_e(c.get('folded_backward', 0))}, forward "
        f"{_e(c.get('folded_forward', 0))}, as Mul+Add {_e(c.get('affine', 0))}, kept "
        f"{_e(c.get('kept', 0))}. Nodes {_e(fold.get('nodes_before'))} &rarr; "
        f"{_e(fold.get('nodes_after'))}.</p>",
    ]

    def rows(records: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        out = []
        for r in records:
            action = r["action"] + (f" {r['direction']}" if r.get("direction") else "")
            why = ", ".join(r.get("into") or []) if r["action"] in ("folded", "merged") else ""
            detail = " ".join(x for x in (r.get("detail"), r.get("reason")) if x)
            out.append((r["node"], action, why or detail))
        return out

    for title, key in (("BatchNormalization", "batchnorms"), ("Parallel branches", "merges"),
                       ("Pad", "pads"), ("Constant Mul/Add", "affine_ops")):  # fmt: skip
        records = fold.get(key) or []
        if records:
            parts.append(f"<h3>{_e(title)}</h3>")
            parts.append(_table(("node", "result", "into / reason"), rows(records)))
    passes = fold.get("passes") or []
    if passes:
        parts.append("<h3>Passes</h3>")
        parts.append(_table(
            ("pass", "ms", "nodes before", "nodes after", "changed", "declined"),
            [(p["name"], p["ms"], p["nodes_before"], p["nodes_after"], p["changed"],
              p["declined"]) for p in passes],
            numeric={1, 2, 3, 4, 5},
        ))  # fmt: skip
    return "".join(parts)


def _verify_section(result: Mapping[str, Any] | None, note: str | None = None) -> str:
    parts = ["<h2>Verification</h2>"]
    if result is None:
        parts.append(f"<p>{_verdict(None)}{': ' + _e(note) if note else ''}</p>")
        return "".join(parts)
    parts.append(
        f"<p>{_verdict(result.get('passed'))} on {_e(result.get('samples'))} sample(s); gate "
        f"max_abs &le; {_num(result.get('atol'))} + {_num(result.get('rtol'))} &times; "
        f"max|ref|.{' ' + _e(note) if note else ''}</p>"
    )
    parts.append(_table(
        ("output", "max abs", "max rel", "max|ref|", "cosine", "top-1", "top-5", "result"),
        [(o["name"], o["max_abs"], o["max_rel"], o["max_ref"], o["cosine"], o.get("top1"),
          o.get("top5"), "PASS" if o.get("passed") else "FAIL") for o in result["outputs"]],
        numeric={1, 2, 3, 4, 5, 6},
    ))  # fmt: skip
    layers = result.get("layers")
    if layers:
        parts.append("<h3>Per layer (graph order)</h3>")
        first = layers.get("first_failure")
        if first:
            parts.append(f'<p class="fail">first layer past the gate: {_e(first)}</p>')
        parts.append(_table(
            ("tensor", "original", "op", "max abs", "max rel", "cosine", "result"),
            [(x["candidate"], x["reference"], x["op"], x.get("max_abs"), x.get("max_rel"),
              x.get("cosine"), "PASS" if x.get("passed") else "FAIL") for x in layers["layers"]],
            numeric={3, 4, 5},
        ))  # fmt: skip
    return "".join(parts)


def _compile_section(manifest: Manifest) -> str:
    c = manifest.compile
    parts = [
        "<h2>Compile</h2>",
        f"<p>Target <code>{_e(manifest.spec)}</code> ({_e(manifest.device)}), "
        f"{_num(c.get('seconds'))} s, peak RSS {_num(c.get('peak_rss_mb'))} MB, schedules: "
        f"{_e(c.get('schedules'))}.</p>",
    ]
    steps = c.get("steps") or {}
    if steps:
        parts.append(_table(("step", "seconds"), steps.items(), numeric={1}))
    rules = c.get("schedule_rules") or {}
    if rules:
        parts.append("<h3>Schedule rules (fused functions per rule)</h3>")
        parts.append(_table(("rule", "functions"), sorted(rules.items()), numeric={1}))
    if c.get("int8"):
        parts.append("<h3>int8</h3>")
        parts.append(
            _table(
                ("key", "value"),
                sorted((k, v) for k, v in c["int8"].items() if not isinstance(v, (list, dict))),
            )
        )
    return "".join(parts)


def _image(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<h2>{_e(title)}</h2><img alt="{_e(title)}" src="data:image/png;base64,{data}">'


def render(
    *,
    title: str,
    fold: Mapping[str, Any],
    verification: Mapping[str, Any] | None = None,
    verification_note: str | None = None,
    manifest: Manifest | None = None,
    images: Mapping[str, bytes] | None = None,
) -> str:
    """The page. ``fold``: ``FoldReport.to_dict()``; ``verification``:
    ``VerifyResult.to_dict()`` (None: not verified, ``verification_note`` says why);
    ``manifest``: a compile folder's manifest; ``images``: title -> PNG bytes (the SQNR plot)."""
    body = [f"<h1>bnfold: {_e(title)}</h1>"]
    if manifest is not None:
        body.append(_compile_section(manifest))
    body.append(_verify_section(verification, verification_note))
    body.append(_fold_section(fold))
    for name, png in (images or {}).items():
        body.append(_image(name, png))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>bnfold: {_e(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write_compile_report(path: Path, outdir: Path, manifest: Manifest) -> None:
    """Write the page of a ``bnfold compile`` folder (its manifest, and ``sqnr.png`` when the
    model was quantized there) to ``path``, atomically."""
    v = manifest.verification
    result = v.get("result") if v.get("status") in ("passed", "failed") else None
    note = v.get("why") if result is None else None
    if result is None and "max_lsb" in v:  # int8: layer by layer against the QDQ model
        note = (f"int8, layer by layer: {v.get('status')}, max difference {v.get('max_lsb')} "
                f"quantization steps in {v.get('worst')}")  # fmt: skip
    plot = outdir / "sqnr.png"
    images = {"int8: per-layer SQNR": plot.read_bytes()} if plot.is_file() else None
    page = render(title=str(manifest.source.get("path", outdir)),
                  fold=manifest.fold_report, verification=result,
                  verification_note=note, manifest=manifest, images=images)  # fmt: skip
    write_bytes(path, page.encode("utf-8"))


def write_fold_report(path: Path, title: str, fold: Mapping[str, Any]) -> None:
    """Write the page of ``bnfold fold`` (the fold report alone) to ``path``, atomically."""
    page = render(title=title, fold=fold, verification_note="bnfold fold does not run the model "
                  "(bnfold verify does)")  # fmt: skip
    write_bytes(path, page.encode("utf-8"))
