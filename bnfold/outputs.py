"""Where bnfold may write, and folder outputs as one transaction.

The rule, decided here and nowhere else (:func:`check_destination`): bnfold writes only regular
files that it creates itself (a temp file or temp folder beside the destination, renamed into
place). It refuses, before any work and again just before each rename:

- a destination that exists and is not a regular file: a folder, a symbolic link, a FIFO, a
  device or a socket (renaming over ``/dev/null`` would replace the device node; a symlink would
  be replaced, not written through, which is not what its owner meant either);
- a destination that is one of the files the command reads (:func:`protected_files`): an input
  model, or an external-data file an input model references (overwriting it would leave the
  input unloadable);
- a destination whose folder is not a writable folder (the nearest existing folder above it).

A command with several outputs in one folder (``compile``, ``quantize``) builds them in a temp
folder beside the destination (:func:`staged_folder`) and moves them into place at the end, with
SIGINT/SIGTERM held back during the moves, so that the folder shows all of the new outputs or
none of them; never a new folded model beside an old library and manifest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from bnfold.errors import BnfoldError

# Reading a model to find its external-data files costs a parse; a model file larger than this
# is taken to hold its tensors inline (external data exists to keep the .onnx file small).
_PARSE_LIMIT_BYTES = 256 << 20


def protected_files(*models: Path) -> list[Path]:
    """``models`` and the external-data files they reference: files bnfold must never write.

    A model that cannot be read protects only itself (loading it will give the real error).
    """
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    files: list[Path] = []
    for model in models:
        files.append(model)
        try:
            if not model.is_file() or model.stat().st_size > _PARSE_LIMIT_BYTES:
                continue
            proto = onnx.load_model(str(model), load_external_data=False)
            tensors = list(_get_all_tensors(proto))
        except Exception:  # not a model (yet): nothing more to protect
            continue
        for tensor in tensors:
            if uses_external_data(tensor):
                location = {e.key: e.value for e in tensor.external_data}.get("location", "")
                if location and "\0" not in location:
                    files.append(model.parent / location)
    return files


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return os.path.samefile(a, b)  # hard links, bind mounts
    except (OSError, ValueError):
        return False


def check_destination(path: Path, protected: Iterable[Path] = ()) -> None:
    """Raise :class:`BnfoldError` unless bnfold may (over)write ``path`` (module docstring)."""
    try:
        st: os.stat_result | None = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # (the folder check below says which)
        st = None
    except OSError as e:  # a name too long, a symlink loop...
        raise BnfoldError(f"{path}: cannot write there ({e.strerror})") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise BnfoldError(
                f"{path}: is a symbolic link; bnfold writes only regular files it creates"
            )
        if stat.S_ISDIR(st.st_mode):
            raise BnfoldError(f"{path}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise BnfoldError(
                f"{path}: is not a regular file (a device, FIFO or socket); bnfold writes only "
                "regular files it creates"
            )
    for other in protected:
        if _same_file(path, other):
            raise BnfoldError(f"{path}: would overwrite {other}, which this command reads")
    # Fail before the work, not after it: the nearest existing folder above the destination
    # (where the rest will be created) must be a writable folder.
    here = Path(os.path.abspath(path))
    folder = next((p for p in here.parents if os.path.lexists(p)), Path("/"))
    if not folder.is_dir():
        raise BnfoldError(f"{path}: cannot write there, {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BnfoldError(f"{path}: cannot write there, no write permission on {folder}")


def check_side_output(path: Path, folder: Path, *inputs: Path | None) -> None:
    """Check a file a command writes about a compiled ``folder`` (``run -o``, ``deploy
    --json``): never over one of the folder's own files or an input."""
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    check_destination(path, [*entries, *(p for p in inputs if p is not None)])


def check_folder(outdir: Path, names: Iterable[str], protected: Iterable[Path] = ()) -> None:
    """Check an output folder and the outputs ``names`` that a command writes into it."""
    if os.path.lexists(outdir) and not outdir.is_dir():
        raise BnfoldError(f"{outdir}: exists and is not a folder")
    protected = list(protected)
    for name in names:
        check_destination(outdir / name, protected)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block (they are delivered when it ends).

    A few renames are then all-or-nothing for an interrupt; only SIGKILL (or a power cut) can
    still stop them half-way.

    The block runs with Python-level handlers that only note the signal; the previous handlers
    come back at the end and a noted signal is raised again then, once. (Blocking the signal
    with ``pthread_sigmask`` is not enough: it masks only the calling thread, and once
    onnxruntime or TVM have started their thread pools the kernel delivers the signal to one
    of those, whose note the interpreter then acts on in the main thread anyway.) Outside the
    main thread, where handlers cannot be set, the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def note(signum: int, frame: object) -> None:
        pending.append(signum)

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        # None: set outside Python, and could not be put back; SIG_IGN: the signal does
        # nothing here anyway (e.g. a background job of a shell), so it stays ignored.
        if handler is not None and handler is not signal.SIG_IGN:
            old[sig] = signal.signal(sig, note)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


def remove_tree(path: Path) -> None:
    """Remove a temp folder bnfold made, with SIGINT/SIGTERM held back until it is gone.

    The clean-up runs last (after the renames, or on the way out of a failure): an interrupt
    that lands while it runs would otherwise stop it half-way and leave the temp folder behind.
    """
    with signals_deferred():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(outdir: Path, protected: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temp folder beside ``outdir``; on success move its contents into ``outdir``.

    If the block raises (an error, an interrupt) the temp folder is removed and ``outdir`` is
    untouched. If ``outdir`` does not exist the temp folder is renamed onto it (one rename);
    otherwise each entry replaces the one of the same name, ``manifest.json`` last and the old
    manifest removed first, with SIGINT/SIGTERM deferred. Only the names the command wrote are
    replaced; nothing else in ``outdir`` is touched.
    """
    protected = list(protected)
    # Beside the real folder (OUTDIR may be a symlink to another file system): the moves at the
    # end are renames, which work only within one file system.
    parent = Path(os.path.realpath(outdir)).parent
    parent.mkdir(parents=True, exist_ok=True)
    staging: Path | None = None
    try:
        with signals_deferred():  # an interrupt lands once the folder's name is known
            staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", suffix=".tmp", dir=parent))
        umask = os.umask(0)  # mkdtemp makes 0700; the folder gets what mkdir would give
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        yield staging
        _commit(staging, outdir, protected)
    finally:
        if staging is not None:
            remove_tree(staging)


_LAST = "manifest.json"  # what marks a compile folder as complete: it moves in last


def _commit(staging: Path, outdir: Path, protected: list[Path]) -> None:
    names = sorted(os.listdir(staging), key=lambda n: (n == _LAST, n))
    for name in names:
        if not (staging / name).is_dir():
            check_destination(outdir / name, protected)
        elif os.path.lexists(outdir / name) and (
            os.path.islink(outdir / name) or not (outdir / name).is_dir()
        ):
            raise BnfoldError(f"{outdir / name}: exists and is not a folder")
    trash = staging / ".replaced"
    with signals_deferred():
        if not os.path.lexists(outdir):
            try:
                os.rename(staging, outdir)  # all at once
                return
            except OSError:  # created meanwhile: move entry by entry
                pass
        if os.path.lexists(outdir / _LAST) and _LAST in names:
            # The old manifest goes first: until the new one is in, the folder is not a
            # complete compile output rather than a mix that claims to be one.
            os.replace(outdir / _LAST, staging / ".old-manifest")
        for name in names:
            src, dst = staging / name, outdir / name
            if src.is_dir() and dst.is_dir():  # a folder output (layerwise/): swap it whole
                trash.mkdir(exist_ok=True)
                os.replace(dst, trash / name)
            os.replace(src, dst)
