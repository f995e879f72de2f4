"""SIGINT and SIGTERM in the shell: stop the run after its current step (through its ``engine.Control``)."""

from __future__ import annotations


class StopOnSignal:
    """While active, SIGINT and SIGTERM call ``stop()`` (a ``Control``'s ``interrupt`` or ``cancel``): the run
    stops after the current step. A second SIGINT stops at once (``KeyboardInterrupt``)."""

    def __init__(self, stop):
        self.stop = stop
        self.signum = 0
        self.name = ""
        self._previous = {}

    def _handle(self, signum, frame):
        import signal

        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: the user wants out now
        self.signum, self.name = signum, signal.Signals(signum).name
        self.stop()

    def __enter__(self):
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
