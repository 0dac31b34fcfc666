"""An aarch64 TVM RPC server on an x86 machine: a Debian arm64 userland run under qemu-user.

``bnfold deploy`` talks TVM RPC to a device. Without an ARM board at hand, the device can be an
aarch64 Python run by ``qemu-aarch64-static`` on this machine: :func:`build_root` makes a
minimal Debian 12 (bookworm) arm64 root with Python 3.11 (``debootstrap --foreign
--variant=minbase --include=python3``; the first stage only unpacks the essential packages, so
the ``--include``-d ones are unpacked here with ``dpkg-deb``) and adds the aarch64 wheels of the
TVM runtime (``apache-tvm`` without its compiler library, ``apache-tvm-ffi``, numpy,
ml_dtypes, typing_extensions; the versions installed on this host). :func:`start_server` runs
``tvm.rpc.server`` in that Python, in-process (TVM's ``python -m tvm.exec.rpc_server`` spawns
a new Python, which would need binfmt_misc, which is not set up here).

The server runs real aarch64 machine code, so deploying to it proves an ``arm64`` artifact
loads and computes the right numbers; its timings are of the emulator, not of any ARM CPU.

Build it with ``make arm64-root`` (installs debootstrap and qemu-user when missing) or ``python -m
bnfold.device.emulate build``; serve with ``bnfold serve --emulate arm64``. Building needs root
(debootstrap creates device nodes), Debian's ``dpkg-deb`` and GNU tar, and reaches a Debian mirror
and the Python package index.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from bnfold.errors import BnfoldError
from bnfold.rpc import LOOPBACK, parse_addr
from bnfold.runtime import _locked, cache_dir

logger = logging.getLogger(__name__)

ROOT_ENV = "BNFOLD_ARM64_ROOT"
# Debian 12: its python3 is 3.11, for which apache-tvm-ffi publishes an aarch64 wheel.
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
QEMU = "qemu-aarch64-static"
STAMP = ".bnfold-root.json"
SITE = "opt/bnfold/site-packages"
# The host's versions of these are installed into the root: TVM's RPC protocol must match.
WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions")
# A server only loads the runtime (TVM_USE_RUNTIME_LIB=1): the compiler library (230 MB) and
# the CUTLASS headers (26 MB) are dead weight. Prefixes of wheel members.
SKIPPED = ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty/")
# Nothing runs apt, man or a localized program in the root.
PRUNED = (
    "var/lib/apt/lists",
    "var/cache/apt/archives",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "debootstrap",
)
READY = "bnfold-rpc-server-listening"
SCRUBBED_ENV = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")

# Runs in the emulated Python, which has TVM but not bnfold. argv: host port port_end key
# [tracker_host tracker_port].
SERVER_CODE = f"""
import sys
from tvm.rpc import server
host, port, port_end, key = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tracker = (sys.argv[5], int(sys.argv[6])) if len(sys.argv) > 6 else None
bound = server._popen_start_rpc_server(host, port, port_end, tracker_addr=tracker, key=key)
print("{READY}", bound, flush=True)
server.PopenRPCServerState.current.thread.join()
"""
SMOKE_CODE = (
    "import platform, numpy, tvm; from tvm.rpc import server; "
    "print(platform.machine(), tvm.__version__)"
)


def default_root() -> Path:
    """``$BNFOLD_ARM64_ROOT``, else ``arm64-root`` in bnfold's cache (``$BNFOLD_CACHE``)."""
    env = os.environ.get(ROOT_ENV)
    return Path(env) if env else cache_dir() / "arm64-root"


def wanted_versions() -> dict[str, str]:
    """The versions the root must hold: those installed on this host."""
    try:
        return {name: importlib.metadata.version(name) for name in WHEELS}
    except importlib.metadata.PackageNotFoundError as e:
        raise BnfoldError(f"{e.name} is not installed here; pip install 'bnfold[tvm]'") from None


def root_info(root: Path | None = None) -> dict[str, Any] | None:
    """What :func:`build_root` recorded in ``root`` (None when it is not a finished root)."""
    path = (root or default_root()) / STAMP
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def why_not_ready(root: Path | None = None) -> str:
    """Empty when ``root`` is a finished root for this host's TVM and qemu is there, else why
    not (one line)."""
    root = root or default_root()
    info = root_info(root)
    if info is None:
        return f"no arm64 root at {root}: run `make arm64-root`"
    want = {k: v for k, v in wanted_versions().items() if k.startswith("apache-tvm")}
    have = {k: info.get("versions", {}).get(k) for k in want}
    if have != want:
        return f"the arm64 root at {root} holds {have}, this host has {want}: rebuild it"
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found; run `make cross-tools`"
    return ""


def python_command(root: Path, *, write_bytecode: bool = False) -> tuple[list[str], dict[str, str]]:
    """argv prefix and environment that run the root's aarch64 Python under qemu-user.

    Servers do not write into the root (``write_bytecode=False``); the build's smoke test does,
    so that the modules a server imports at start are compiled once (5 s -> 2 s start-up).
    """
    root = root.absolute()  # TVM's server chdirs into a temp folder
    info = root_info(root)
    python = f"python{info['python']}" if info else "python3"
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(PYTHONPATH=str(root / SITE), TVM_USE_RUNTIME_LIB="1")
    if write_bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return [QEMU, "-L", str(root), str(root / "usr" / "bin" / python), "-s"], env


# --- building the root -----------------------------------------------------------------------


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.is_file()), None
    )
    if found is None:
        raise BnfoldError(f"{name} not found; run `make arm64-root` (installs it with apt-get)")
    return found


def _run(cmd: list[str], what: str, log: Path | None = None, **kwargs: Any) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise BnfoldError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def _extract_debs(root: Path, log: Path) -> int:
    """Unpack the packages the debootstrap first stage downloaded but left packed (the ``base``
    set: python3 and what it needs). Returns how many."""
    dpkg_deb = _tool("dpkg-deb")
    paths = dict(
        line.split(" ", 1) for line in (root / "debootstrap" / "debpaths").read_text().split("\n")
        if " " in line
    )  # fmt: skip
    base = (root / "debootstrap" / "base").read_text().split()
    for package in base:
        deb = root / paths[package].lstrip("/")
        # --keep-directory-symlink: bookworm's /lib, /bin are symlinks into /usr; GNU tar
        # would otherwise replace them with directories.
        with subprocess.Popen([dpkg_deb, "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as p:
            _run(["tar", "-x", "--keep-directory-symlink", "-C", str(root)],
                 f"unpacking {deb.name}", log, stdin=p.stdout)  # fmt: skip
        if p.returncode != 0:
            raise BnfoldError(f"dpkg-deb could not read {deb.name} (exit {p.returncode})")
    return len(base)


def _install_wheels(root: Path, python: str, versions: dict[str, str], work: Path,
                    log: Path) -> None:  # fmt: skip
    wheels = work / "wheels"
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
          "--platform", "manylinux_2_28_aarch64", "--python-version", python,
          *(f"{k}=={v}" for k, v in versions.items()), "-d", str(wheels)],
         "pip download of the aarch64 wheels", log)  # fmt: skip
    site = root / SITE
    site.mkdir(parents=True)
    import zipfile

    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            for member in z.infolist():
                if member.filename.startswith(SKIPPED):
                    continue
                z.extract(member, site)
                if member.external_attr >> 16 & 0o111:  # zipfile drops the executable bit
                    (site / member.filename).chmod(0o755)


def _du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@contextlib.contextmanager
def _build_dir(root: Path) -> Iterator[Path]:
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_root(root: Path | None = None, *, mirror: str = MIRROR, force: bool = False) -> Path:
    """Build (or keep, when it is already built for this host's versions) the arm64 root.

    Idempotent: a finished root carries a stamp (``.bnfold-root.json``: versions, size, build
    time); it is built in a temp folder beside ``root`` and renamed into place, so an
    interrupted build leaves no half-built root. About 30 s and 230 MB here.

    Raises:
        BnfoldError: A tool is missing, not root, the mirror or the package index cannot be
            reached, or the built Python cannot import TVM under qemu.
    """
    root = (root or default_root()).absolute()
    versions = wanted_versions()
    with _locked(root.parent / f".{root.name}.lock"):
        info = root_info(root)
        if not force and info is not None and info.get("versions") == versions:
            logger.info("arm64 root %s is up to date", root)
            return root
        if os.geteuid() != 0:
            raise BnfoldError("building the arm64 root needs root (debootstrap creates device "
                              "nodes): run `make arm64-root` as root")  # fmt: skip
        debootstrap = _tool("debootstrap")
        qemu = _tool(QEMU)
        t0 = time.monotonic()
        with _build_dir(root) as work:
            new, log = work / "root", work / "build.log"
            logger.info("debootstrap %s arm64 (minbase + python3) from %s", SUITE, mirror)
            _run([debootstrap, "--arch=arm64", "--foreign", "--variant=minbase",
                  "--include=python3", SUITE, str(new), mirror], "debootstrap", log)  # fmt: skip
            count = _extract_debs(new, log)
            link = (new / "usr" / "bin" / "python3").readlink().name  # python3 -> python3.11
            python = link.removeprefix("python")
            logger.info("unpacked %d packages (Python %s); adding the aarch64 wheels", count,
                        python)  # fmt: skip
            _install_wheels(new, python, versions, work, log)
            for path in PRUNED:  # the packed .debs, apt's lists, docs, debootstrap's files
                shutil.rmtree(new / path, ignore_errors=True)
            stamp = {"suite": SUITE, "mirror": mirror, "python": python, "versions": versions,
                     "qemu": qemu}  # fmt: skip
            (new / STAMP).write_text(json.dumps(stamp))
            cmd, env = python_command(new, write_bytecode=True)
            out = _run([*cmd, "-c", SMOKE_CODE], "importing TVM in the emulated Python", log,
                       env=env, timeout=300).split()  # fmt: skip
            if out[:1] != ["aarch64"]:
                raise BnfoldError(f"the emulated Python is not aarch64: it reports {out}")
            stamp.update(seconds=round(time.monotonic() - t0, 1), bytes=_du(new))
            (new / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
            if root.exists():
                shutil.rmtree(root)
            os.replace(new, root)
    logger.info("arm64 root ready at %s: %.0f MB, %.0f s", root, stamp["bytes"] / 2**20,
                stamp["seconds"])  # fmt: skip
    return root


# --- serving ---------------------------------------------------------------------------------


def start_server(
    host: str = "127.0.0.1",
    port: int = 9090,
    port_end: int | None = None,
    *,
    tracker: str | None = None,
    key: str = "",
    root: Path | None = None,
    stderr: IO[Any] | int | None = None,
    timeout: float = 180,
) -> tuple[subprocess.Popen[str], int]:
    """Start a TVM RPC server in the emulated aarch64 Python; returns the process (stop it with
    ``terminate()``) and the port it listens on, once it accepts connections.

    Args:
        host, port, port_end: Listen on ``host``, the first free port in ``port..port_end-1``.
        tracker, key: Register with this tracker (``HOST:PORT``) under ``key``.
        root: The arm64 root (:func:`default_root` when None).
        stderr: Where the server's log goes (inherited when None).
        timeout: Seconds to wait for it to listen (importing TVM under qemu takes ~5 s).

    Raises:
        BnfoldError: No usable root, or the server exited or did not listen in time.
    """
    root = root or default_root()
    why = why_not_ready(root)
    if why:
        raise BnfoldError(why)
    if host not in LOOPBACK:
        logger.warning("TVM RPC has NO authentication: anyone who can reach %s:%d can upload and "
                       "run arbitrary code on this machine.", host, port)  # fmt: skip
    args = [host, str(port), str(port_end if port_end is not None else port + 1), key]
    if tracker:
        if not key:
            raise BnfoldError("--tracker needs --key (the device kind to register under)")
        args += [str(x) for x in parse_addr(tracker)]
    cmd, env = python_command(root)
    proc = subprocess.Popen([*cmd, "-c", SERVER_CODE, *args], stdout=subprocess.PIPE,
                            stderr=stderr, env=env, text=True)  # fmt: skip
    bound: list[int] = []
    ready = threading.Event()

    def read() -> None:  # then keep draining stdout, so the server never blocks on it
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(READY) and not bound:
                bound.append(int(line.split()[1]))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True, name="arm64-rpc-stdout").start()
    if not ready.wait(timeout) or not bound:
        code = proc.poll()
        if code is None:
            proc.kill()
            proc.wait()
        state = f"exited with {code}" if code is not None else f"did not listen in {timeout:.0f} s"
        raise BnfoldError(f"the emulated aarch64 RPC server {state} (on {host}:{port})")
    logger.info("aarch64 TVM RPC server (qemu-user) on %s:%d, pid %d", host, bound[0], proc.pid)
    return proc, bound[0]


def main(argv: list[str] | None = None) -> int:
    """``python -m bnfold.device.emulate build|info``: build the arm64 root, or show where it
    stands."""
    ap = argparse.ArgumentParser(prog="python -m bnfold.device.emulate",
                                 description=__doc__.split("\n")[0])  # fmt: skip
    ap.add_argument("action", choices=("build", "info"))
    ap.add_argument("--root", type=Path, help=f"default: ${ROOT_ENV} or $BNFOLD_CACHE/arm64-root")
    ap.add_argument("--mirror", default=MIRROR, help="Debian mirror (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    root = args.root or default_root()
    try:
        if args.action == "build":
            build_root(root, mirror=args.mirror, force=args.force)
        why = why_not_ready(root)
        if args.action == "info":
            print(json.dumps({"root": str(root), "ready": not why, "why": why,
                              "stamp": root_info(root)}, indent=2))  # fmt: skip
        elif why:
            raise BnfoldError(why)
        return 0 if not why else 1
    except BnfoldError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
