"""Helpers for tests against real TVM RPC on loopback: free ports, a tracker, bnfold's servers.

Each process is started on a free loopback port, in a process group of its own, and returned
once it accepts connections; stop them with :func:`stop`, which kills the group: TVM's tracker
runs in a worker process of its own that would outlive a killed parent (and keep listening).
The tracker needs ``tornado`` (which apache-tvm does not declare).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | subprocess.Popen[str],
              timeout: float = 30) -> None:  # fmt: skip
    """Return once something accepts connections on loopback ``port``.

    Raises:
        RuntimeError: ``proc`` exited first, or nothing listened within ``timeout`` seconds.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def start_server(port: int, tracker: str | None = None, key: str = "") -> subprocess.Popen[bytes]:
    """A bnfold RPC server subprocess on loopback (``bnfold.rpc.serve``), ready to accept;
    registered with ``tracker`` (``HOST:PORT``) under ``key`` when given."""
    code = (
        "import sys; from bnfold import rpc; "
        f"s = rpc.serve('127.0.0.1', {port}, tracker={tracker!r}, key={key!r}); "
        "s.thread.join()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        wait_port(port, proc)
    except RuntimeError:
        stop([proc])
        raise
    return proc


def start_tracker() -> tuple[subprocess.Popen[bytes], str]:
    """A TVM RPC tracker subprocess on loopback (``python -m tvm.exec.rpc_tracker``), ready to
    accept: (the process, its ``HOST:PORT``)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
         "--port", str(port), "--port-end", str(port + 1)],
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_port(port, proc)
    except RuntimeError:
        stop([proc])
        raise
    return proc, f"127.0.0.1:{port}"


def wait_free(tracker: str, key: str, count: int, timeout: float = 20) -> None:
    """Return once the tracker has ``count`` free servers under ``key`` (a server registers a
    moment after it listens).

    Raises:
        RuntimeError: Fewer within ``timeout`` seconds.
    """
    from tvm import rpc

    host, _, port = tracker.rpartition(":")
    client = rpc.connect_tracker(host, int(port))
    end = time.monotonic() + timeout
    queue: dict[str, int] = {}
    while time.monotonic() < end:
        queue = client.summary()["queue_info"].get(key, {})
        if queue.get("free") == count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"tracker {tracker}: {queue.get('free', 0)} free '{key}' server(s), "
                       f"expected {count}")  # fmt: skip


def stop(procs: Sequence[subprocess.Popen[bytes] | subprocess.Popen[str]]) -> None:
    """Kill the processes (with their process group, where they lead one: see above) and wait
    for them."""
    for p in procs:
        try:
            if os.getpgid(p.pid) == p.pid:
                os.killpg(p.pid, signal.SIGKILL)
                continue
        except ProcessLookupError:  # already gone (and reaped)
            continue
        p.kill()
    for p in procs:
        p.wait(timeout=10)
