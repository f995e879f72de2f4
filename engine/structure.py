"""The structure term: the result's self-similarity must match the photo's (after STROTSS, Kolkin et al. 2019).

For a set of positions of the image, the matrix of cosine distances between their feature vectors says
which places look alike and which do not: the sky's positions are alike, an eye's are unlike the skin
around it. The term asks the result's matrix to match the content photo's, each row normalised by its
sum so that it is a distribution over the other positions, and it is blind to what the features are, so
the style may change every place's appearance while the photo's layout holds: a uniform sky stays
uniform (no moon can appear in it), an eye stays unlike the cheek.

* Layers: ``LAYERS`` (relu3_1, relu4_1), one cosine-distance matrix each, averaged. The positions are
  those of the coarser layer's grid; the finer layer is average-pooled onto that grid (its windows are
  exactly the coarser features' footprints, so every one of its features takes part).
* Positions: a fixed strided subset of that grid, at most ``MAX_POSITIONS`` of them, the same at every
  step, so runs are reproducible and a resume from a checkpoint needs no saved random state.
* Value: per job, the mean over rows of the L1 distance between the two row distributions (each in
  [0, 2], 0 for the photo itself), summed over the batch like every other loss. A mean over rows of
  distributions does not grow with the number of positions, so a weight means the same at any size.

The matrix compares every sampled position with every other, over the whole image: tiles cannot
split it (``tile_refusal``); untiled and checkpointed runs take it.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError, option
from .losses import EPS, at_least_float32, full_float32

LAYERS = ("relu3_1", "relu4_1")
MAX_POSITIONS = 2048
# Square matrices of the positions alive at once per job for the result (distances, their average, the
# normalised rows, the difference and its gradient) plus the photo's target: what the memory model counts.
MATRICES = 6


def layers(config) -> tuple[str, ...]:
    """The layers the term reads, or none when it is off."""
    return LAYERS if config.structure_weight > 0 else ()


def refusal() -> str:
    """The one sentence that says why tiles cannot run the structure term."""
    return (
        f"the structure term ({option('structure_weight')}) compares positions across the whole image, so it "
        f"cannot be split into tiles; use {option('tile')} off or checkpoint, or {option('structure_weight')} 0"
    )


def tile_refusal(config) -> Optional[str]:
    """None when tiles may run this config, else ``refusal()``."""
    return refusal() if config.structure_weight > 0 else None


def check_tileable(config) -> None:
    """A ``UserError`` with ``refusal()`` when this config's structure term is on, since tiles cannot split it."""
    reason = tile_refusal(config)
    if reason is not None:
        raise UserError(reason)


def factor(layer: str) -> int:
    """Input pixels per feature of a VGG layer: the fifth character of ``relu3_1`` is its block, after block-1 pools."""
    return 2 ** (int(layer[4]) - 1)


def stride(height: int, width: int, limit: int = MAX_POSITIONS) -> int:
    """The smallest step through a ``height x width`` grid that samples at most ``limit`` positions."""
    step = max(1, math.floor(math.sqrt(height * width / limit)))
    while math.ceil(height / step) * math.ceil(width / step) > limit:
        step += 1
    return step


def positions(height: int, width: int, limit: int = MAX_POSITIONS) -> int:
    """How many positions the term compares on a ``height x width`` grid."""
    step = stride(height, width, limit)
    return math.ceil(height / step) * math.ceil(width / step)


def grid_shape(height: int, width: int, layer_names=LAYERS) -> tuple[int, int]:
    """The grid the positions are taken from, for an input of ``height x width`` pixels (VGG pools floor)."""
    coarsest = max(factor(n) for n in layer_names)
    return height // coarsest, width // coarsest


def state_bytes(config, height: int, width: int, batch: int) -> float:
    """What the term holds in a scale (float32): ``MATRICES`` P x P matrices per job, P the positions compared."""
    if config.structure_weight <= 0:
        return 0.0
    p = positions(*grid_shape(height, width))
    return float(batch * MATRICES * p * p * 4)


def distance_rows(features: Mapping[str, torch.Tensor], layer_names=LAYERS, limit: int = MAX_POSITIONS) -> torch.Tensor:
    """``(N, P, P)``: for each job, the cosine distances between the sampled positions, averaged over the layers,
    each row divided by its sum."""
    coarsest = max(layer_names, key=factor)
    h, w = features[coarsest].shape[-2:]
    step = stride(h, w, limit)
    start = (step - 1) // 2  # centre the samples in their cells rather than pile them at the top left
    rows, cols = slice(start, None, step), slice(start, None, step)
    total = None
    with full_float32():  # TF32 would keep 10 bits of each product: the photo's own matrix must cancel exactly
        for name in layer_names:
            f = at_least_float32(features[name])
            pool = factor(coarsest) // factor(name)
            if pool > 1:
                f = F.avg_pool2d(f, pool)
            f = f[..., :h, :w][..., rows, cols].flatten(2)  # (N, C, P)
            unit = f / f.norm(dim=1, keepdim=True).clamp_min(EPS)
            distance = 1 - torch.einsum("ncp,ncq->npq", unit, unit)
            total = distance if total is None else total + distance
    total = total / len(layer_names)
    return total / total.sum(dim=-1, keepdim=True).clamp_min(EPS)


class StructureLoss(nn.Module):
    """Self-similarity of the result against the content photo's: ``loss(features) -> scalar``, summed over jobs."""

    def __init__(self, target: torch.Tensor, layer_names=LAYERS, limit: int = MAX_POSITIONS):
        super().__init__()
        self.layer_names, self.limit = tuple(layer_names), limit
        self.register_buffer("target", target.detach())

    @staticmethod
    def tile_refusal() -> str:
        """Why tiles cannot split this term (asked of every loss module by ``tiling.TiledObjective``)."""
        return refusal()

    @classmethod
    @torch.no_grad()
    def of(cls, content_features: Mapping[str, torch.Tensor], layer_names=LAYERS, limit: int = MAX_POSITIONS):
        """The term with the photo's matrix as its target (one per job), computed once per scale."""
        return cls(distance_rows(content_features, layer_names, limit), layer_names, limit)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        rows = distance_rows(features, self.layer_names, self.limit)
        return (rows - self.target).abs().sum(dim=-1).mean(dim=-1).sum()
