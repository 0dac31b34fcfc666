"""TVM RPC, the parts every command that talks to devices shares: addresses, sessions (direct or
through a tracker), the tracker's server count, and the server ``bnfold serve`` starts.

No authentication exists in TVM RPC: whoever reaches a server's port can run code as its user.
:func:`serve` warns when it binds anything but loopback. tvm is imported inside the functions.
"""

from __future__ import annotations

import logging
from typing import Any

from bnfold.errors import BnfoldError

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_addr(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST`` when ``default_port`` is given) -> ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, ""
    if not port:
        if default_port is None:
            raise BnfoldError(f"'{text}': expected HOST:PORT")
        return host, default_port
    try:
        number = int(port)
    except ValueError:
        raise BnfoldError(f"'{text}': the port must be a number") from None
    if not host or not 0 < number < 65536:
        raise BnfoldError(f"'{text}': expected HOST:PORT with a port in 1..65535")
    return host.strip("[]"), number


def connect(
    rpc: str | None = None,
    *,
    key: str | None = None,
    tracker: str | None = None,
    session_timeout: float = 0,
    priority: int = 1,
) -> Any:
    """An RPC session: through ``tracker`` (``HOST:PORT``) by ``key``, else direct to ``rpc``."""
    from tvm import rpc as tvm_rpc

    try:
        if tracker:
            if not key:
                raise BnfoldError("--tracker needs --key (the device kind the servers registered)")
            host, port = parse_addr(tracker)
            client = tvm_rpc.connect_tracker(host, port)
            logger.info("tracker %s:%d: requesting a '%s' server", host, port, key)
            return client.request(key, priority=priority, session_timeout=session_timeout)
        if not rpc:
            raise BnfoldError("give --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
        host, port = parse_addr(rpc)
        logger.info("connecting to the RPC server %s:%d", host, port)
        return tvm_rpc.connect(host, port, key=key or "", session_timeout=session_timeout)
    except BnfoldError:
        raise
    except Exception as e:  # tvm raises TVMError/RuntimeError/OSError with long text
        what = f"tracker {tracker}" if tracker else f"server {rpc}"
        lines = str(e).strip().splitlines()
        why = lines[-1] if lines else repr(e)
        if not tracker and "cannot find server that matches key" in why:
            # A server registered with a tracker accepts only sessions the tracker hands out.
            why += " (a server registered with a tracker: use --tracker HOST:PORT --key KEY)"
        raise BnfoldError(f"cannot reach the RPC {what}: {why}") from None


def tracker_servers(tracker: str, key: str) -> int:
    """How many servers are registered with the tracker ``tracker`` (``HOST:PORT``) under
    ``key``, busy or free (a session requested for a key no server has waits forever)."""
    from tvm import rpc as tvm_rpc

    host, port = parse_addr(tracker)
    try:
        summary = tvm_rpc.connect_tracker(host, port).summary()
    except Exception as e:  # tvm raises TVMError/RuntimeError/OSError with long text
        lines = str(e).strip().splitlines()
        raise BnfoldError(f"cannot reach the RPC tracker {tracker}: "
                          f"{lines[-1] if lines else repr(e)}") from None  # fmt: skip
    # Each entry's key is "server:KEY" (TVM's tracker prefixes the role).
    return sum(1 for s in summary.get("server_info", []) if s.get("key", "").split(":", 1)[-1]
               == key)  # fmt: skip


def serve(
    host: str = "127.0.0.1",
    port: int = 9090,
    port_end: int | None = None,
    *,
    tracker: str | None = None,
    key: str = "",
    custom_addr: str | None = None,
) -> Any:
    """Start a TVM RPC server in this process (a listening thread); returns its state object
    (``.port``, ``.thread``). No new Python is spawned, so it also works in an emulated Python.

    Binding to anything but loopback logs a warning: TVM RPC has no authentication.
    """
    from tvm.rpc import server as tvm_server

    if host not in LOOPBACK:
        logger.warning("TVM RPC has NO authentication: anyone who can reach %s:%d can upload and "
                       "run arbitrary code on this machine. Use it only on an isolated network, "
                       "behind a tracker key only your clients know.", host, port)  # fmt: skip
    tracker_addr = parse_addr(tracker) if tracker else None
    if tracker_addr and not key:
        raise BnfoldError("--tracker needs --key (the device kind to register under)")
    try:
        bound = tvm_server._popen_start_rpc_server(
            host, port, port_end if port_end is not None else port + 1,
            tracker_addr=tracker_addr, key=key, custom_addr=custom_addr, silent=False,
        )  # fmt: skip
    except (OSError, ValueError) as e:
        raise BnfoldError(f"cannot listen on {host}:{port}: {e}") from None
    state = tvm_server.PopenRPCServerState.current
    where = f", registered with tracker {tracker} as '{key}'" if tracker_addr else ""
    logger.info("TVM RPC server on %s:%d%s", host, bound, where)
    return state
