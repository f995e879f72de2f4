"""The one exception type that crosses the user boundary, and the words its messages use.

Anything raised as a ``UserError`` is the user's to fix (a bad path, value or
file); its message is a single sentence that names the bad value and what is
allowed. The CLI prints it without a traceback and exits with status 2.
Everything else is a bug in the engine and keeps its traceback.

A message names a setting the way the caller wrote it: ``--style-masks`` on
the command line, ``style_masks`` from Python. The CLI switches the wording
with ``cli_wording()``; messages build names with ``option()`` and ``flag()``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

_CLI = contextvars.ContextVar("nst_cli_wording", default=False)


class UserError(ValueError):
    """A problem with what the user asked for, worded for the user."""


@contextlib.contextmanager
def cli_wording() -> Iterator[None]:
    """Within this block, messages name command-line options instead of Python arguments."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def option(name: str) -> str:
    """A setting as the caller spells it: ``--style-masks`` in the CLI, ``style_masks`` in Python."""
    return "--" + name.replace("_", "-") if _CLI.get() else name


def flag(name: str) -> str:
    """A switch as the caller turns it on: ``--overwrite`` in the CLI, ``overwrite=True`` in Python."""
    return "--" + name.replace("_", "-") if _CLI.get() else f"{name}=True"


def plural(count: int, noun: str, many: str = "") -> str:
    """``1 value``, ``2 values`` (``many`` for irregular plurals)."""
    return f"{count} {noun if count == 1 else (many or noun + 's')}"


def pixels(count: float) -> str:
    """A pixel count a person can read: ``1024 px`` below a megapixel, ``16.8 Mpx`` from there."""
    if count < 1e6:
        return f"{count:.0f} px"
    return f"{count / 1e6:.1f} Mpx"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory (CUDA's own error, or the CPU allocator's)."""
    import torch  # here, so that this module stays importable without torch's start-up cost

    if isinstance(exc, torch.cuda.OutOfMemoryError):  # torch.OutOfMemoryError's name before torch 2.5
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
