"""Atomic file output: every file bnfold writes goes to a temp file first, then is renamed.

A reader (or a user who interrupts bnfold) therefore sees either the old file, no file, or the
complete new file; never a half-written one. ``os.replace`` is atomic on POSIX when source and
destination are on the same file system, which is why the temp file lives beside the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnfold.outputs import check_destination, signals_deferred


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    check_destination(target)  # only regular files bnfold creates: never a device, FIFO, link
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:  # from here on, an interrupt (a signal raises anywhere) removes the temp file
        # An interrupt between creating the file and knowing its name would leave it behind:
        # SIGINT/SIGTERM wait until the name is known.
        with signals_deferred():
            fd, tmp_name = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent
            )
            tmp = Path(tmp_name)
            os.close(fd)
        # mkstemp creates 0600; outputs get the mode a plain open() would give (0666 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        # BaseException too: a KeyboardInterrupt must not leave the temp file behind either.
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsync'ed before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable across runs) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
