"""Named, timed steps of a command: the one step timer of compile, quantize and tune.

Each step is logged (INFO), its seconds are recorded for the manifest or report, and an optional
observer is told when it starts and ends. The library never prints: the CLI passes an observer
that shows the steps as they go on a terminal (and nothing in logs or pipes).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

# (step, None) when a step starts; (step, seconds) when it has ended.
Observer = Callable[[str, "float | None"], None]


class Steps:
    """Times named steps: ``with steps("fold"): ...``; ``steps.seconds`` maps name -> seconds.

    A step that raises is not recorded (the command failed in it; the error says why).
    """

    def __init__(self, observer: Observer | None = None, *, digits: int = 3) -> None:
        self.observer = observer
        self.digits = digits
        self.seconds: dict[str, float] = {}
        self.started = self._last = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.observer is not None:
            self.observer(name, None)
        t0 = time.perf_counter()
        yield
        self._record(name, t0)

    def lap(self, name: str) -> None:
        """Record the step ``name`` as everything since the previous step ended (for a long
        function that is a plain sequence of steps; the observer hears only the end)."""
        self._record(name, self._last)

    def _record(self, name: str, since: float) -> None:
        self._last = time.perf_counter()
        self.seconds[name] = round(self._last - since, self.digits)
        logger.info("step %-16s %8.2f s", name, self.seconds[name])
        if self.observer is not None:
            self.observer(name, self.seconds[name])

    def total(self) -> float:
        """Seconds since the steps began, rounded like the steps."""
        return round(time.perf_counter() - self.started, self.digits)
