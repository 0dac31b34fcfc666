"""Capture what a third-party library prints, so that only bnfold's own lines reach the user.

TVM's ONNX importer writes in three ways that bypass ``logging``: Python ``print`` to stdout
("Error converting operator Pad, ..."), ``warnings.warn`` ("Renaming name x.1 to x_1"), and
its C++ logger, straight to file descriptor 2 ("BlockBuilder destroyed with remaining blocks!",
when a builder of an aborted import is destroyed). :func:`captured` takes all three for the
duration of a block: ``sys.stdout``/``sys.stderr`` are swapped, warnings are recorded, and
descriptors 1 and 2 point at a temporary file. The text is returned for the caller to log.

Only the calling thread should write to stdout/stderr meanwhile: descriptors are per process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator


@dataclasses.dataclass
class Captured:
    """What was written inside :func:`captured` (filled in when the block ends)."""

    text: str = ""

    def lines(self) -> list[str]:
        """The non-empty lines, stripped."""
        return [line.strip() for line in self.text.splitlines() if line.strip()]


@contextlib.contextmanager
def _descriptors(sink: io.BufferedRandom) -> Iterator[None]:
    saved: list[tuple[int, int]] = []
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
            except OSError:  # closed descriptor: nothing to protect
                continue
            os.dup2(sink.fileno(), fd)
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def captured() -> Iterator[Captured]:
    """Capture stdout, stderr (Python objects and descriptors 1 and 2) and warnings."""
    out = Captured()
    text = io.StringIO()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with (
        tempfile.TemporaryFile() as sink,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        try:
            with (
                _descriptors(sink),
                contextlib.redirect_stdout(text),
                contextlib.redirect_stderr(text),
            ):
                yield out
        finally:
            sink.seek(0)
            raw = sink.read().decode("utf-8", "replace")
            notes = "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
            out.text = text.getvalue() + raw + notes
