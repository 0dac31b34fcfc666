"""A small BN CNN with real labels: scikit-learn's digits, fp32 vs int8 accuracy on held-out digits.

    python -m benchmarks.digits [--out out/digits] [--epochs 15]

The 1797 8x8 digits are split 70/30 (stratified, seeded). The CNN (Conv-BN-ReLU x2, max-pool,
depthwise Conv-BN-ReLU6, pointwise Conv-BN-ReLU, global average pool, Linear) trains in a few
seconds on the CPU and is exported with every BatchNormalization kept, as an exporter would
leave it. It is then quantized by bnfold from 100 training digits, and both models classify the
held-out digits.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

logger = logging.getLogger(__name__)

SEED = 0
CALIBRATION_SAMPLES = 100


def digits_split(seed: int = SEED) -> dict[str, np.ndarray]:
    """``x_train, y_train, x_test, y_test``: float32 (N, 1, 8, 8) in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, d.target, test_size=0.3, random_state=seed, stratify=d.target
    )
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}


def train(data: dict[str, np.ndarray], epochs: int = 15, seed: int = SEED) -> Any:
    """Train the CNN; returns the torch module in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    def block(cin: int, cout: int, k: int, groups: int = 1, act: type = nn.ReLU) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            act(),
        )

    model = nn.Sequential(
        block(1, 16, 3),
        block(16, 32, 3),
        nn.MaxPool2d(2),
        block(32, 32, 3, groups=32, act=nn.ReLU6),
        block(32, 64, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    x = torch.from_numpy(data["x_train"])
    y = torch.from_numpy(data["y_train"]).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def export(model: Any, dest: Path) -> onnx.ModelProto:
    """Export with every BatchNormalization kept (eval mode, PRESERVE, no constant folding)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 1, 8, 8),), str(dest), dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE, opset_version=17,
            input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=False,
        )  # fmt: skip
    proto = onnx.load(str(dest))
    n_bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    if n_bn != 4:
        raise RuntimeError(f"the export has {n_bn} BatchNormalization nodes, expected 4")
    return proto


def build(out: Path, epochs: int = 15) -> tuple[Path, dict[str, np.ndarray]]:
    """Train and export the CNN to ``out/digits_cnn.onnx``; returns it and the data split."""
    import torch

    torch.set_num_threads(2)
    data = digits_split()
    t0 = time.perf_counter()
    model = train(data, epochs)
    logger.info("trained in %.1f s", time.perf_counter() - t0)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "digits_cnn.onnx"
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp_path = Path(tmp) / path.name
        export(model, tmp_path)
        tmp_path.replace(path)
    with torch.no_grad():
        acc = (model(torch.from_numpy(data["x_test"])).argmax(1).numpy() == data["y_test"]).mean()
    logger.info("torch test accuracy %.4f", acc)
    return path, data


def run(out: Path, epochs: int = 15) -> list[dict[str, Any]]:
    """Quantize the digits CNN three ways; accuracy of fp32 and int8 on the held-out digits."""
    from bnfold.quant.quantize import quantize
    from bnfold.quant.report import evaluate, plot_sqnr

    path, data = build(out, epochs)
    calib = [{"x": data["x_train"][i : i + 1]} for i in range(CALIBRATION_SAMPLES)]
    test = [{"x": data["x_test"][i : i + 64]} for i in range(0, len(data["x_test"]), 64)]
    rows = []
    for tag, kw in (
        ("per-channel", {}),
        ("per-tensor, no CLE, no bias correction", {"per_channel": False, "cle": False,
                                                    "bias_correction": False}),
        ("per-tensor + CLE + bias correction", {"per_channel": False}),
    ):  # fmt: skip
        model, report = quantize(path, calib, **kw)
        acc = evaluate(path, model, report, test, labels=data["y_test"])
        o = acc.outputs[0]
        name = tag.split(",")[0].replace(" + ", "_").replace(" ", "_")
        plot_sqnr(report, acc, out / f"sqnr_{name}.png")
        rows.append({
            "config": tag, "test_samples": o.samples, "accuracy_fp32": o.accuracy_fp32,
            "accuracy_int8": o.accuracy_int8, "top1_agreement": o.top1,
            "cosine": o.cosine_mean, "counts": report.counts(),
        })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/digits"))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")  # fmt: skip
    rows = run(args.out, args.epochs)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| config | test digits | fp32 accuracy | int8 accuracy | top-1 agreement | cosine |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['test_samples']} | {r['accuracy_fp32']:.4f} | "
            f"{r['accuracy_int8']:.4f} | {r['top1_agreement']:.4f} | {r['cosine']:.5f} |"
        )
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
