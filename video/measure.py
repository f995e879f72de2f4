"""How much a stylised video flickers: the warping error between consecutive output frames.

For each frame t > 0, the output of t-1 is warped to t by the backward flow of the *content* frames
(video/flow.py) and compared with the output of t over the pixels where that flow is reliable: the mean
squared difference per channel (0-1 scale), averaged over the frames. The content video's own warping
error is the floor (what flow errors, interpolation and lighting leave even without stylisation);
stylising each frame on its own is the ceiling the temporal term should remove.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import flow as fl


def warping_errors(outputs: Sequence[torch.Tensor], contents: Sequence[torch.Tensor]) -> list[float]:
    """Per frame t > 0: ``sum_p c_p |o_t - warp(o_{t-1})|^2 / (3 sum_p c_p)``, with ``c`` from the contents."""
    if len(outputs) != len(contents):
        raise ValueError(f"{len(outputs)} outputs for {len(contents)} content frames")
    errors = []
    for t in range(1, len(outputs)):
        size = tuple(outputs[t].shape[-2:])
        now, before = (c if tuple(c.shape[-2:]) == size else _resize(c, size) for c in (contents[t], contents[t - 1]))
        backward, forward = fl.dis_flow(now, before), fl.dis_flow(before, now)
        weight = fl.reliability(forward, backward)
        diff = (outputs[t] - fl.warp(outputs[t - 1], backward)).pow(2).sum(0)
        errors.append(float((weight * diff).sum() / (3 * weight.sum().clamp_min(1))))
    return errors


def warping_error(outputs: Sequence[torch.Tensor], contents: Sequence[torch.Tensor]) -> float:
    """The mean of ``warping_errors`` (0 for a single frame)."""
    errors = warping_errors(outputs, contents)
    return sum(errors) / len(errors) if errors else 0.0


def _resize(image: torch.Tensor, size) -> torch.Tensor:
    from engine.images import resize

    return resize(image, size)
