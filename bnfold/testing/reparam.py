"""Small torch models with parallel branches, exported with their BatchNormalizations, for the
merge_branches tests and benchmarks/reparam.py (needs torch, imported lazily).

- :func:`repvgg` is RepVGG-A0-like (Ding et al. 2021): each block is
  ``ReLU(BN(Conv3x3(x)) + BN(Conv1x1(x)) [+ BN(x)])``, the identity branch where the stride is 1
  and the channels stay; widths and depths are parameters (A0: 48/96/192/384/1280, 1/2/4/14/1).
- :func:`mobileone` is MobileOne-like (Vasu et al. 2023): a depthwise block of ``k`` 3x3 branches,
  a 1x1 "scale" branch and a BN identity, then a pointwise block of ``k`` 1x1 branches and a BN
  identity, each summed and ReLU'd.

:func:`export` writes the ONNX model as the TorchScript exporter does with
``training=TrainingMode.PRESERVE`` on an eval() model: BNs stay BatchNormalization nodes (EVAL
would fuse them into the convs and leave nothing to test).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _nn() -> Any:
    import torch

    return torch.nn


def _conv_bn(c_in: int, c_out: int, k: int, stride: int, groups: int = 1) -> Any:
    nn = _nn()
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    )


def _branch_block(branches: Sequence[Any], identity: Any | None) -> Any:
    nn = _nn()

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branches = nn.ModuleList(branches)
            self.identity = identity

        def forward(self, x: Any) -> Any:
            out = self.branches[0](x)
            for b in self.branches[1:]:
                out = out + b(x)
            if self.identity is not None:
                out = out + self.identity(x)
            return nn.functional.relu(out)

    return Block()


def _randomize_bn(model: Any, seed: int) -> None:
    """Trained-looking BN statistics (fresh ones are the identity map and would hide errors)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.2
            m.running_mean = torch.randn(c, generator=g) * 0.2
            m.running_var = torch.rand(c, generator=g) + 0.5


def _head(c_in: int, classes: int) -> list[Any]:
    nn = _nn()
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]


def repvgg(
    widths: Sequence[int] = (48, 96, 192, 384, 1280),
    depths: Sequence[int] = (1, 2, 4, 14, 1),
    classes: int = 1000,
    seed: int = 0,
) -> Any:
    """A RepVGG-like classifier (training-time form: three branches per block)."""
    nn = _nn()
    layers, c_in = [], 3
    for width, depth in zip(widths, depths, strict=True):
        for i in range(depth):
            stride = 2 if i == 0 else 1
            identity = nn.BatchNorm2d(c_in) if stride == 1 and c_in == width else None
            layers.append(_branch_block(
                [_conv_bn(c_in, width, 3, stride), _conv_bn(c_in, width, 1, stride)], identity
            ))  # fmt: skip
            c_in = width
    model = nn.Sequential(*layers, *_head(c_in, classes))
    _randomize_bn(model, seed)
    return model.eval()


def mobileone(
    widths: Sequence[int] = (32, 64, 128),
    k: int = 3,
    classes: int = 100,
    seed: int = 0,
) -> Any:
    """A MobileOne-like classifier: a stem, then per width a strided depthwise+pointwise pair
    and a stride-1 pair (the latter with identity branches)."""
    nn = _nn()
    layers = [_branch_block([_conv_bn(3, widths[0], 3, 2)], None)]
    c = widths[0]
    for width in widths:
        for stride in (2, 1):
            dw_id = nn.BatchNorm2d(c) if stride == 1 else None
            dw = [_conv_bn(c, c, 3, stride, c) for _ in range(k)] + [_conv_bn(c, c, 1, stride, c)]
            layers.append(_branch_block(dw, dw_id))
            pw_id = nn.BatchNorm2d(c) if c == width else None
            layers.append(_branch_block([_conv_bn(c, width, 1, 1) for _ in range(k)], pw_id))
            c = width
    model = nn.Sequential(*layers, *_head(c, classes))
    _randomize_bn(model, seed)
    return model.eval()


def export(model: Any, path: str | Path, shape: Sequence[int], opset: int = 17) -> None:
    """Write ``model`` (eval mode) as ONNX with its BatchNormalization nodes kept."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        torch.onnx.export(
            model.eval(),
            (torch.randn(*shape),),
            str(path),
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            do_constant_folding=False,
        )
