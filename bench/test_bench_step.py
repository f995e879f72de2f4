"""pytest-benchmark entry points: ``pytest bench/ --benchmark-enable``.

Not part of the test suite (``testpaths`` is ``tests/``); these only measure.
"""

import pytest
import torch

from engine import Config, build_extractor
from engine.api import build_criterion
from engine.images import load_image, resize
from engine.optimize import StepFunction

from .step_time import EXAMPLES


@pytest.fixture(scope="module", params=[128, 256], ids=lambda s: f"{s}px")
def problem(request):
    config = Config(device="cpu")
    content = resize(load_image(EXAMPLES / "tubingen.jpg"), (request.param * 3 // 4, request.param)).unsqueeze(0)
    extractor = build_extractor(config, torch.device("cpu"))
    criterion = build_criterion(config, extractor, content, [load_image(EXAMPLES / "starry_night.jpg")], (1.0,), 16)
    return content, extractor, criterion


def test_forward_baseline(benchmark, problem):
    content, extractor, _ = problem
    with torch.no_grad():
        benchmark(extractor, content)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_step(benchmark, problem, optimizer):
    content, extractor, criterion = problem
    step = StepFunction(content.clone().requires_grad_(True), extractor, criterion, optimizer, 0.02)
    total, _ = benchmark(step)
    assert torch.isfinite(total)
