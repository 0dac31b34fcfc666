"""Showing a command's steps as they go (``compile``, ``tune``), on a terminal only.

The library reports steps through :class:`bnfold.steps.Steps`; this observer prints a line per
step on stderr: the step's name while it runs, then its seconds. In a log or a pipe (stderr not
a terminal) it prints nothing, so the one-line error contract and captured output stay clean.
"""

from __future__ import annotations

import sys

import click


class StepDisplay:
    """An observer for :class:`bnfold.steps.Steps` that draws ``  build   ...`` then
    ``  build   12.3 s`` on stderr, only when stderr is a terminal (or ``enabled`` is True)."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.running: str | None = None

    def __call__(self, step: str, seconds: float | None) -> None:
        if not self.enabled:
            return
        if seconds is None:
            self.close()
            click.echo(f"  {step:<10} ...", err=True, nl=False)
            self.running = step
        else:
            click.echo(f"\r  {step:<10} {seconds:6.1f} s", err=True)
            self.running = None

    def close(self) -> None:
        """End a step's line left open (the step failed or was interrupted), so that the error
        message that follows starts on a line of its own."""
        if self.enabled and self.running is not None:
            click.echo(" stopped", err=True)
            self.running = None
