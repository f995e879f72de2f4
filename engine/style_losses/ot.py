"""Sliced optimal transport between the image's and the style's feature vectors (``--style-loss ot``).

It compares the *distribution* of a layer's feature vectors (one C-vector per pixel) with the style's,
where the Gram loss compares second moments only: project both pixel sets onto K random unit
directions, sort each projection, and compare the sorted values (in one dimension, sorting solves
optimal transport exactly). Fresh directions every step (from a seeded generator, which checkpoints
keep), so over the run all directions are seen. Made relative (divided by the target's own size) like
the other losses, and summed over the batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..losses import EPS, at_least_float32
from ..vgg import channels as _channels
from .base import PerJob, StyleLoss, register


def _pixels(features: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, H*W)`` in at least float32."""
    n, c, h, w = features.shape
    return at_least_float32(features.reshape(n, c, h * w))


@register
class SlicedOTStyleLoss(StyleLoss):
    """Sliced optimal transport between the image's and the style's feature vectors."""

    name = "ot"
    help = "sliced optimal transport between the feature distributions (new random directions each step)"
    needs = "maps"  # every pixel's feature vector: sorting does not split into sums
    untileable = (
        "the ot style loss sorts every pixel's projections of the whole image at once, so it cannot be "
        "split into tiles exactly; use tile off or checkpoint (with a smaller size), or the gram or w2 style loss"
    )
    uncapturable = "it draws new directions every step"
    # Its distance is larger than a Gram loss's for the same look, so it needs a larger weight for as much
    # style; relu5_1 at a quarter keeps the painting's object-sized features (a moon, a face) from being
    # matched whole. Chosen on four photo/painting pairs at 256 px, checked on three others (docs/losses-defaults.md).
    weight = 14.0
    layer_weights = {"relu5_1": 0.25}
    # relu3_1 beside relu4_2: at a quarter of the image's resolution it still sees eyes, mouths and window frames,
    # which relu4_2 alone (an eighth) let the style repaint. Not the Gram loss's default: its targets take 64 more
    # bytes per pixel, which the largest (tiled, Gram) prints cannot spare.
    content_layers = ("relu3_1", "relu4_2")

    def __init__(self, targets: Sequence[torch.Tensor], projections: int, generator: torch.Generator):
        super().__init__()
        # One (C, P) pixel set per job; P differs between styles, so they are kept apart.
        self.targets = [t.detach() for t in targets]
        self.projections = projections
        self.generator = generator

    @staticmethod
    def target_stats(features: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
        """The style's pixel set ``(C, P)``; several styles are mixed by their weights.

        A mixture is approximated by taking from each style a share of pixels
        proportional to its weight (evenly spaced, so deterministic).
        """
        sets = [_pixels(f)[0] for f, _ in features]
        if len(sets) == 1:
            return sets[0]
        total_w = sum(w for _, w in features)
        budget = max(s.shape[1] for s in sets)
        parts = []
        for s, (_, w) in zip(sets, features):
            take = max(1, round(budget * w / total_w))
            index = torch.linspace(0, s.shape[1] - 1, take, device=s.device).round().long()
            parts.append(s[:, index])
        return torch.cat(parts, dim=1)

    @classmethod
    def build(cls, *, config, layer: str, per_job: PerJob, masks: Optional[torch.Tensor] = None) -> StyleLoss:
        # One seed per layer: every layer draws its own directions, and a rerun draws the same ones.
        seed = config.seed * 1000 + config.style_layers.index(layer)
        return cls.from_targets([cls.target_stats(job) for job in per_job], config.ot_projections, seed)

    def generators(self) -> list[torch.Generator]:
        return [self.generator]

    @classmethod
    def state_bytes(cls, config, *, pixels: int, style_pixels: Sequence[int], layer_bytes: dict[str, float]) -> float:
        # The style's feature maps, kept whole: a (C, Q) float32 set per layer, Q the style's pixels there.
        targets = sum(layer_bytes[n] for n in config.style_layers) * sum(style_pixels)
        # Per step, per style layer of P positions and K directions: the projections, their sorted values and
        # gradient (float32) and the int64 sort indices kept for the backward pass, and the target's projections
        # resampled to P (K x P x (3 x 4 + 8 + 4) bytes); and the K x C directions with their normalised copy.
        # 4e5 projections at 32 px measured 11.5 GB on the CPU with the default five style layers; this gives 11.5.
        k = config.ot_projections
        positions = sum(pixels * layer_bytes[n] / (4 * _channels(n)) for n in config.style_layers)
        widest = max(_channels(n) for n in config.style_layers)
        return targets + k * positions * (3 * 4 + 8 + 4) + 2 * k * widest * 4

    @classmethod
    def from_targets(cls, per_job: Sequence[torch.Tensor], projections: int = 64, seed: int = 0):
        device = per_job[0].device
        generator = torch.Generator(device=device).manual_seed(seed)
        return cls(per_job, projections, generator)

    def directions(self, channels: int, device, dtype) -> torch.Tensor:
        d = torch.randn(self.projections, channels, generator=self.generator, device=device, dtype=dtype)
        return d / d.norm(dim=1, keepdim=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = _pixels(features)  # (N, C, P)
        directions = self.directions(x.shape[1], x.device, x.dtype)
        total = x.new_zeros(())
        for n in range(x.shape[0]):
            target = self.targets[n if len(self.targets) > 1 else 0]
            total = total + sliced_ot(x[n], target, directions)
        return total


def sliced_ot(x: torch.Tensor, target: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Relative sliced OT between pixel sets ``x (C, P)`` and ``target (C, Q)`` along ``directions (K, C)``.

    When Q != P the sorted target projections are resampled to P values by
    linear interpolation of their quantile function.
    """
    px, _ = torch.sort(directions @ x, dim=1)  # (K, P)
    pt = sorted_values(directions @ at_least_float32(target))  # (K, Q)
    if pt.shape[1] != px.shape[1]:
        pt = F.interpolate(pt[None], size=px.shape[1], mode="linear", align_corners=True)[0]
    return (px - pt).pow(2).sum() / pt.pow(2).sum().clamp_min(EPS)


def sorted_values(values: torch.Tensor) -> torch.Tensor:
    """``values (K, Q)`` sorted along each row, without indices (the style's side, which takes no gradient).

    On the CPU NumPy's sort returns the same values as ``torch.sort`` in a tenth of the time here (AVX-512: 7.7 ms
    against 76 ms for 64 x 49152 float32 on two threads; NumPy 2 also vectorises it with AVX2 and on Arm). Only
    the order of equal values can differ between the two, so the values, and every run, are the same. The image's
    side keeps ``torch.sort``: its indices route the gradient, and ties would be routed otherwise.
    """
    if values.device.type == "cpu" and not values.requires_grad and values.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(values.detach().numpy(), axis=1))
    return torch.sort(values, dim=1).values
