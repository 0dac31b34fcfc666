"""A time limit on a blocking call that Python cannot otherwise interrupt (TVM RPC).

TVM's RPC client reads its socket in C++ with no timeout: a server that accepts the connection
and then says nothing (or stops answering half-way) would block ``bnfold deploy`` forever.
TVM's socket loop retries an interrupted read only after running Python's signal handlers, so a
SIGALRM whose handler raises ends the call; :func:`deadline` arms one for the block.

SIGALRM belongs to the process: an outer timer (a test harness's per-case limit) is put back,
with what is left of it, when the block ends, and stays in charge if it is due first. Outside
the main thread signals cannot be handled, and the block runs without a limit.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

from bnfold.errors import BnfoldError


class CallTimeout(BnfoldError):
    """A call did not finish within its deadline (bad input: the peer does not answer)."""


@contextlib.contextmanager
def deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Raise :class:`CallTimeout` ("``what``: no answer within N s") if the block runs longer
    than ``seconds`` (None or <= 0: no limit)."""
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise CallTimeout(f"{what}: no answer within {seconds:g} s")

    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    if outer_delay and outer_delay <= seconds:  # the outer limit comes first: leave it be
        yield
        return
    previous = signal.signal(signal.SIGALRM, expire)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:
            left = outer_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)
