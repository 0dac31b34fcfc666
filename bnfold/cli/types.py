"""Click parameter types and options shared by the CLI modules (cli, cli_lower, cli_quant)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

import click

from bnfold.errors import BnfoldError


class ShapeType(click.ParamType):
    """``NAME:1x3x224x224``: the concrete shape of a model input with dynamic dimensions."""

    name = "NAME:DxDxD"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        from bnfold.check import parse_shape

        try:
            return parse_shape(value)
        except BnfoldError as e:
            self.fail(str(e), param, ctx)


SIZE_UNITS = {
    "": 1,
    "B": 1,
    **{p: 1024**i for i, p in enumerate("KMGT", 1)},
    **{f"{p}IB": 1024**i for i, p in enumerate("KMGT", 1)},
    **{f"{p}B": 1000**i for i, p in enumerate("KMGT", 1)},
}


class SizeType(click.ParamType):
    """``500M``: a size in bytes. K/M/G/T (or KiB...) are powers of 1024, KB/MB/GB/TB of 1000."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).upper() if match else ""
        if not match or unit not in SIZE_UNITS:
            self.fail(f"'{value}' is not a size (e.g. 500M, 2G, 1048576)", param, ctx)
        size = int(float(match.group(1)) * SIZE_UNITS[unit])
        if size <= 0:
            self.fail(f"'{value}' is not a positive size", param, ctx)
        return size


class ToleranceType(click.FloatRange):
    """A finite number >= 0: a NaN tolerance makes a gate that can never pass, an infinite one
    a gate that can never fail, and a negative one is meaningless."""

    name = "TOLERANCE"

    def __init__(self) -> None:
        super().__init__(min=0)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


SHAPE = ShapeType()
max_size_option = click.option(
    "--max-size",
    type=SizeType(),
    default=None,
    help="Refuse a model (with its external data) larger than this, before reading it, "
    "e.g. 500M or 2G. Default: no limit.",
)
shape_option = click.option(
    "--shape",
    "shapes",
    type=SHAPE,
    multiple=True,
    help="Concrete shape of an input with dynamic dimensions, e.g. input:1x3x224x224. Repeatable.",
)


F = TypeVar("F", bound=Callable[..., Any])


def tolerance_options(atol: float, rtol: float, what: str = "the gate") -> Callable[[F], F]:
    """``--atol`` and ``--rtol`` of a PASS/FAIL gate ``max_abs <= atol + rtol x max|ref|``."""

    def decorate(f: F) -> F:
        f = click.option(
            "--rtol",
            type=ToleranceType(),
            default=rtol,
            show_default=True,
            help=f"Tolerance relative to max|reference output| of {what}.",
        )(f)
        return click.option(
            "--atol",
            type=ToleranceType(),
            default=atol,
            show_default=True,
            help=f"Absolute tolerance of {what}.",
        )(f)

    return decorate
