"""pytest-benchmark entry points: ``pytest bench/ --benchmark-enable``.

Not part of the test suite (``testpaths`` is ``tests/``); these only measure. The same steps as
``nst bench`` (``suite.build_step``), one benchmark per lever this machine has, at 128 and 256 px.
"""

import pytest
import torch

from engine.runtime import resolve_device

from .suite import build_step, matrix

DEVICE = resolve_device("auto")
LEVERS = matrix(DEVICE)[0]


@pytest.mark.parametrize("size", [128, 256], ids=lambda s: f"{s}px")
@pytest.mark.parametrize("lever", LEVERS, ids=lambda lv: lv.name)
def test_step(benchmark, lever, size):
    step, _ = build_step(lever, size, DEVICE)
    for _ in range(4):  # warm-up, including a CUDA-graph capture
        step()

    def timed():
        out = step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        return out

    total, _ = benchmark(timed)
    assert torch.isfinite(total)
