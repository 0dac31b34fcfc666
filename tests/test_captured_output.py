"""captured(): what a library prints, by any route, is taken for bnfold to log; nothing leaks."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

from bnfold.captured_output import captured


def test_every_route_is_captured_and_the_streams_come_back(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with captured() as out:
        print("print")
        sys.stderr.write("sys.stderr\n")
        warnings.warn("a warning", UserWarning, stacklevel=1)
        os.write(1, b"fd 1\n")
        os.write(2, b"fd 2\n")  # what a C++ logger does
    assert sorted(out.lines()) == sorted(
        ["print", "sys.stderr", "fd 1", "fd 2", "UserWarning: a warning"]
    )
    assert capfd.readouterr() == ("", "")
    print("after")
    os.write(2, b"after\n")
    assert capfd.readouterr() == ("after\n", "after\n")


def test_an_exception_still_restores_the_streams(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError), captured() as out:
        os.write(2, b"before the error\n")
        raise RuntimeError("boom")
    assert out.lines() == ["before the error"]
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
