"""A run's progress as a file: ``nst stylize --log`` (JSON lines), read back by ``nst plot`` (cli/plot.py).

The log is written from the CLI's step callback, which receives the steps in
groups when the device runs ahead (``engine.optimize.Callback``): logging adds
no host-device sync. Each line is one step::

    {"scale": 1, "scales": 3, "width": 128, "height": 96, "step": 1, "steps": 100,
     "total_step": 1, "total_steps": 300, "loss": 1.84, "parts": {"content": 0.0, "style": 0.61, "tv": 0.01},
     "seconds": 0.42}

``scale`` counts from 1; ``parts`` are the unweighted losses (``loss`` is their
weighted sum); ``seconds`` is the time since the run started when the step's
losses were read (on a GPU, up to a group of steps late). ``nst resume``
appends to the log and goes on counting the seconds from its last line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import UserError
from .files import check_writable

_FIELDS = ("scale", "step", "total_step", "loss", "parts")


class StepLog:
    """Appends one JSON line per step to ``path``; a fresh log never replaces a file without ``overwrite``."""

    def __init__(self, path: Path, overwrite: bool, append: bool):
        self.path, self.offset = Path(path), 0.0
        if append and self.path.is_file():
            records = read_log(self.path, allow_empty=True)
            self.offset = records[-1]["seconds"] if records else 0.0
            mode = "a"
        else:
            check_writable(self.path, overwrite, what="log")
            mode = "w" if overwrite else "x"  # "x": a file that appeared since the check is not clobbered
        self.mode, self.fh = mode, None
        self.started = time.perf_counter()

    def _open(self) -> None:
        # At the first step, so that a run that fails before it (a bad style image) leaves no empty log.
        try:
            self.fh = open(self.path, self.mode, encoding="utf-8")
        except FileExistsError:
            raise UserError(f"log {str(self.path)!r} already exists; pass --overwrite to replace it") from None
        except OSError as exc:
            raise UserError(f"could not open log {str(self.path)!r} ({exc.strerror or exc})") from None

    def write(self, info) -> None:
        if self.fh is None:
            self._open()
        record = {
            "scale": info.scale + 1,
            "scales": info.scales,
            "width": info.width,
            "height": info.height,
            "step": info.step,
            "steps": info.steps,
            "total_step": info.total_step,
            "total_steps": info.total_steps,
            "loss": info.loss,
            "parts": dict(info.parts),
            "seconds": round(self.offset + time.perf_counter() - self.started, 4),
        }
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()  # a run stopped any way leaves every step it logged

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def read_log(path: Path, allow_empty: bool = False) -> list[dict]:
    """The steps of a ``--log`` file in order; a step logged twice (a run resumed from an earlier
    checkpoint than where it was stopped) counts once, with its last line."""
    path = Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise UserError(f"log {str(path)!r} {problem}")
    steps: dict[int, dict] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or any(k not in record for k in _FIELDS):
                    raise ValueError
                steps[int(record["total_step"])] = record
            except (ValueError, TypeError):
                raise UserError(
                    f"line {number} of {str(path)!r} is not a step of an nst stylize --log "
                    f"(a JSON object with {', '.join(_FIELDS)})"
                ) from None
    if not steps and not allow_empty:
        raise UserError(f"log {str(path)!r} has no steps")
    return [steps[k] for k in sorted(steps)]
