"""pytest-benchmark entry points: ``pytest bench/ --benchmark-enable``.

Not part of the test suite (``testpaths`` is ``tests/``); these only measure.
"""

import pytest
import torch

from engine import Config
from engine.optimize import StepFunction

from .step_time import build_problem

CONFIG = Config(device="cpu")


@pytest.fixture(scope="module", params=[128, 256], ids=lambda s: f"{s}px")
def problem(request):
    return build_problem(request.param, CONFIG, torch.device("cpu"))


def test_forward_baseline(benchmark, problem):
    content, extractor, _ = problem
    with torch.no_grad():
        benchmark(extractor, content)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_step(benchmark, problem, optimizer):
    content, extractor, criterion = problem
    step = StepFunction(content.clone().requires_grad_(True), extractor, criterion, optimizer, CONFIG.lr)
    total, _ = benchmark(step)
    assert torch.isfinite(total)
