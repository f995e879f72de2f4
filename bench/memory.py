"""The peak memory of running a callable, on the CPU or on CUDA.

Both report the most memory in use at any moment of the call *above what was
in use just before it*, so a figure is the cost of the call alone, not of the
interpreter, torch's libraries or earlier work:

* CUDA: the peak of ``torch.cuda.max_memory_allocated`` (tensors; not the
  caching allocator's reserve) minus what was allocated before the call.
* CPU: the kernel's peak resident set (``VmHWM`` in ``/proc/self/status``),
  after resetting that mark to the current resident set by writing ``5`` to
  ``/proc/self/clear_refs``, minus the resident set before the call. Memory
  freed earlier but kept by ``malloc`` would hide part of the call's need, so
  ``malloc_trim`` hands it back first. This counts every allocation of the
  process (all threads), not only torch tensors.

Linux only on the CPU; elsewhere :func:`peak_memory` returns ``None`` as the peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from pathlib import Path
from typing import Callable, Optional, TypeVar, Union

import torch

T = TypeVar("T")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_memory(fn: Callable[[], T], device: Union[torch.device, str]) -> tuple[T, Optional[int]]:
    """``(fn(), peak_bytes)``: run ``fn`` once and measure the most memory it used above the level before it.

    ``peak_bytes`` is ``None`` where the platform gives no way to measure it (a CPU without Linux's ``/proc``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, max(0, torch.cuda.max_memory_allocated(device) - before)
    result, before, peak = _cpu_peak(fn)
    return result, None if peak is None else max(0, peak - before)


def process_peak(fn: Callable[[], T]) -> tuple[T, Optional[int]]:
    """``(fn(), peak_bytes)``: the process's whole peak resident set while ``fn`` ran (CPU, Linux), the interpreter,
    torch and whatever was alive before included: what the machine had to hold. ``None`` where it cannot be read."""
    result, _, peak = _cpu_peak(fn)
    return result, peak


def _cpu_peak(fn: Callable[[], T]) -> tuple[T, int, Optional[int]]:
    """``(fn(), resident bytes before, peak resident bytes during)``; the peak is ``None`` without ``/proc``."""
    if not _can_reset_cpu_peak():
        return fn(), 0, None
    _malloc_trim()
    _CLEAR_REFS.write_text("5")  # VmHWM := current VmRSS
    before = _status_kib("VmRSS")
    result = fn()
    return result, before * 1024, _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{field} is missing from {_STATUS}")
    return int(match.group(1))


_cpu_peak_ok: Optional[bool] = None


def _can_reset_cpu_peak() -> bool:
    global _cpu_peak_ok
    if _cpu_peak_ok is None:
        try:
            _status_kib("VmHWM")
            _CLEAR_REFS.write_text("5")
            _cpu_peak_ok = True
        except (OSError, RuntimeError):
            _cpu_peak_ok = False
    return _cpu_peak_ok


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to hand back this way
        pass
