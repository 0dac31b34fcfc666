"""The HTML report (``fold --report x.html``, ``compile --report x.html``): one self-contained page,
every name escaped, checked once in a real headless browser (Debian's chromium-headless-shell,
which ``make test`` installs)."""

from __future__ import annotations

import html.parser
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold import html_report, pipeline
from bnfold.cli import cli
from bnfold.testing import parse

# Two BNs: one after a conv (folds backward), one after a Relu whose output is also a graph
# output (kept as Mul+Add); the second is named like markup.
MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
m (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,4,8,8] r) <
    float[4,3,3,3] w = {W}, float[4] g = {G}, float[4] b = {B}, float[4] mu = {B}, float[4] v = {G}
> {
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    n = BatchNormalization (c, g, b, mu, v)
    r = Relu (n)
    y = BatchNormalization <epsilon = 1e-3> (r, g, b, mu, v)
}
"""


def _model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)

    def vals(n: int, lo: float, hi: float) -> str:
        return "{" + ", ".join(f"{v:.5f}" for v in rng.uniform(lo, hi, n)) + "}"

    proto = parse(MODEL.replace("{W}", vals(108, -1, 1)).replace("{G}", vals(4, 0.5, 1.5))
                  .replace("{B}", vals(4, -0.5, 0.5)))  # fmt: skip
    for node in proto.graph.node:
        if node.output[0] == "y":
            node.name = "<script>alert(1)</script>"
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    return path


class _Checker(html.parser.HTMLParser):
    """Collects tags and text; a stray '<script' in the text means something was not escaped."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_fold_page_lists_every_bn_with_its_outcome_and_escapes_names(tmp_path: Path) -> None:
    _, rep = pipeline.fold(_model(tmp_path))
    page = html_report.render(title="m.onnx", fold=rep.to_dict())
    parsed = _Checker()
    parsed.feed(page)
    text = " ".join(parsed.text)
    assert "script" not in parsed.tags  # the node name is text, not markup
    assert "<script>alert(1)</script>" in text
    for r in rep.batchnorms:
        assert r.node in text
    assert "folded backward" in text and "affine" in text
    assert "http" not in page  # self-contained: nothing to fetch


def test_cli_fold_writes_html_by_the_report_suffix(tmp_path: Path) -> None:
    model = _model(tmp_path)
    res = CliRunner().invoke(cli, ["fold", str(model), "-o", str(tmp_path / "f.onnx"),
                                   "--report", str(tmp_path / "r.html")])  # fmt: skip
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "BatchNormalization" in page


@pytest.mark.tvm
def test_cli_compile_report_has_the_verification_and_steps(tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    model = _model(tmp_path)
    out, page_path = tmp_path / "out", tmp_path / "report.html"
    res = CliRunner().invoke(cli, ["compile", str(model), "-o", str(out), "--report",
                                   str(page_path)])  # fmt: skip
    assert res.exit_code == 0, res.output
    page = page_path.read_text()
    for want in ("Verification", "PASS", "Compile", "build", "Schedule rules", "Fold"):
        assert want in page, want


def _browser() -> str | None:
    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


def _open_in_browser(page: Path, shot: Path) -> tuple[list[str], bytes]:
    """Load ``page`` in headless chromium: (its console lines, the screenshot's bytes)."""
    proc = subprocess.run(
        [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return console, shot.read_bytes() if shot.is_file() else b""


@pytest.mark.slow
def test_page_loads_in_a_real_browser_without_console_errors(tmp_path: Path) -> None:
    if _browser() is None:
        pytest.skip("no chromium here (make test installs chromium-headless-shell)")
    _, rep = pipeline.fold(_model(tmp_path))
    page = tmp_path / "report.html"
    html_report.write_fold_report(page, "m.onnx", rep.to_dict())
    console, png = _open_in_browser(page, tmp_path / "shot.png")
    assert console == []
    assert png.startswith(b"\x89PNG") and len(png) > 5000  # a page with content, not blank
    # The check can fail: a page that logs to the console is caught.
    noisy = tmp_path / "noisy.html"
    noisy.write_text("<!DOCTYPE html><html><body><script>console.error('x')</script></body></html>")
    console, _ = _open_in_browser(noisy, tmp_path / "noisy.png")
    assert console
