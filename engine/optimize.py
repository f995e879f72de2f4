"""One scale of the optimisation: the image is the parameter.

``StepFunction`` is the unit of work every path shares: one call computes the
features, the loss and its gradient, and moves the pixels once. Faster paths
(compiled extractors, CUDA graphs) swap what runs inside, never the maths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

LBFGS_HISTORY = 50  # memory: 2 * history * image numel floats (about 0.1 GB at 1024 px)
LBFGS_MAX_EVALS = 20  # function evaluations one L-BFGS step may spend in its line search


@dataclass
class StepInfo:
    """What a per-step callback receives. ``image`` is the live tensor: read, don't write."""

    scale: int
    scales: int
    height: int
    width: int
    step: int
    steps: int
    total_step: int
    total_steps: int
    loss: float
    parts: dict[str, float]
    image: torch.Tensor


class StepFunction:
    """Callable that performs one optimisation step and returns ``(total, parts)``.

    Adam: one forward/backward, one update, then the pixels are clamped to
    [0, 1]. L-BFGS: one iteration with a strong-Wolfe line search; the image
    is left unclamped during the scale (clamping would break the curvature
    pairs) and clamped when the scale ends.
    """

    def __init__(self, image: torch.Tensor, extractor: Callable, criterion: Callable, optimizer: str, lr: float):
        self.image = image
        self.extractor = extractor
        self.criterion = criterion
        self.kind = optimizer
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam([image], lr=lr)
        else:
            self.optimizer = torch.optim.LBFGS(
                [image], lr=1.0, max_iter=1, max_eval=LBFGS_MAX_EVALS,
                history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe",
            )
        self._memo: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]] = None

    def evaluate(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss at the current image, with its gradient left in ``image.grad``."""
        self.optimizer.zero_grad(set_to_none=False)
        total, parts = self.criterion(self.extractor(self.image), self.image)
        total.backward()
        return total.detach(), {k: v.detach() for k, v in parts.items()}

    def __call__(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.kind == "adam":
            total, parts = self.evaluate()
            self.optimizer.step()
            with torch.no_grad():
                self.image.clamp_(0, 1)
            return total, parts
        result = {}

        def closure():
            result["value"] = self._lbfgs_evaluate()
            return result["value"][0]

        self.optimizer.step(closure)
        return result["value"]

    def _lbfgs_evaluate(self):
        # torch's L-BFGS re-evaluates the point its line search just accepted at
        # the start of the next step() call; remembering the last point, its
        # loss and gradient saves that forward/backward pass (about 1/3 of the work).
        memo = self._memo
        if memo is not None and torch.equal(memo[0], self.image):
            self.image.grad = memo[1].clone()
            return memo[2], memo[3]
        total, parts = self.evaluate()
        self._memo = (self.image.detach().clone(), self.image.grad.detach().clone(), total, parts)
        return total, parts

    def finish(self) -> torch.Tensor:
        with torch.no_grad():
            self.image.clamp_(0, 1)
        self._memo = None
        return self.image.detach()


def optimize_scale(
    image: torch.Tensor,
    extractor: Callable,
    criterion: Callable,
    steps: int,
    optimizer: str,
    lr: float,
    on_step: Optional[Callable[[int, torch.Tensor, dict, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Run ``steps`` steps from ``image`` (not modified) and return the result."""
    param = image.detach().clone().requires_grad_(True)
    step = StepFunction(param, extractor, criterion, optimizer, lr)
    for i in range(1, steps + 1):
        total, parts = step()
        if on_step is not None:
            on_step(i, total, parts, param)
    return step.finish()
