"""One way to stop a run from outside: a ``Control``, read by the loop after every whole step.

* ``interrupt()``: stop after the current step and keep what is needed to go on. A run with a checkpoint
  plan writes its checkpoint first; the run raises ``Interrupted`` with the current image.
* ``cancel(reason)``: stop after the current step and keep nothing; the run raises ``Stopped``.
* ``time_limit``: seconds from the first step; past it the run stops as if cancelled, with a sentence that
  says so.
* ``watch``: called once per step, before the flags are read, on the run's thread: a service checks its
  jobs there, a test stops at an exact step. It may call ``interrupt()`` or ``cancel()``.

The flags may be set from any thread or from a signal handler (a plain attribute write each). The loop reads
them on the host, without waiting for the device. Exceptions raised by a callback are errors, not stops:
they reach the caller as they are.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

from .errors import UserError


class Interrupted(Exception):
    """A run stopped at its control's ``interrupt()`` after a whole step; ``image`` is the current result."""

    def __init__(self, image, step: int):
        super().__init__(f"stopped after step {step}")
        self.image, self.step = image, step


class Stopped(Exception):
    """A run stopped at its control's ``cancel()`` or time limit, after a whole step; ``reason`` says which."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Control:
    """Stop, interrupt-with-checkpoint, time limit and cancel for one run (see the module's text)."""

    def __init__(self, *, time_limit: Optional[float] = None, watch: Optional[Callable[[], None]] = None):
        if time_limit is not None and (
            isinstance(time_limit, bool)
            or not isinstance(time_limit, (int, float))
            or not math.isfinite(time_limit)
            or time_limit <= 0
        ):
            raise UserError(f"time_limit must be a number of seconds greater than zero, not {time_limit!r}")
        self.time_limit, self.watch = time_limit, watch
        self.interrupted = False
        self.cancelled: Optional[str] = None
        self._started: Optional[float] = None

    def interrupt(self) -> None:
        self.interrupted = True

    def cancel(self, reason: str = "the run was cancelled") -> None:
        self.cancelled = reason

    @property
    def elapsed(self) -> float:
        return 0.0 if self._started is None else time.perf_counter() - self._started

    # ------------------------------------------------------------------------------ for the loop

    def start(self) -> None:
        """The clock of the time limit starts (once: a batch's later scales go on counting)."""
        if self._started is None:
            self._started = time.perf_counter()

    def poll(self) -> bool:
        """After a step: run ``watch``, then whether an interrupt was asked for."""
        if self.watch is not None:
            self.watch()
        return self.interrupted

    def check(self, step: int) -> None:
        """After a step that was not interrupted: ``Stopped`` if cancelled or past the time limit."""
        if self.cancelled is not None:
            raise Stopped(self.cancelled)
        if self.time_limit is not None and self.elapsed > self.time_limit:
            raise Stopped(f"the run passed its time limit of {self.time_limit:g} s and was stopped after step {step}")
