"""The Gram loss (Gatys et al.), and its masked form for spatial control (``--style-masks``)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..losses import EPS, FeaturesOrMoments, at_least_float32, relative_squared_error, scatter_sum, second_moment
from .base import PerJob, StyleLoss, TileTerm, register


@register
class GramStyleLoss(StyleLoss):
    """Relative squared error between Gram matrices (Gatys et al.'s style loss).

    The target is given as a Gram matrix, not as features, so several style
    images can be blended into one target beforehand.
    """

    name = "gram"
    help = "Gatys et al.'s Gram matrices (second moments) of each style layer"
    takes_masks = True

    def __init__(self, target_gram: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target_gram.detach())

    @classmethod
    def build(cls, *, config, layer: str, per_job: PerJob, masks: Optional[torch.Tensor] = None) -> StyleLoss:
        if masks is not None:
            return MaskedGramStyleLoss.build(config=config, layer=layer, per_job=per_job, masks=masks)
        return cls.from_targets([cls.target_stats(job) for job in per_job])

    @staticmethod
    def target_stats(features: Sequence[tuple[FeaturesOrMoments, float]]) -> torch.Tensor:
        """The blended target ``(1, C, C)``: the weighted mean of the styles' Grams (from maps or Moments)."""
        total_w = float(sum(w for _, w in features))
        return sum(second_moment(f).float() * (w / total_w) for f, w in features)

    @classmethod
    def from_targets(cls, per_job: Sequence[torch.Tensor]) -> "GramStyleLoss":
        return cls(torch.cat(list(per_job)))

    def stats(self, features: torch.Tensor) -> torch.Tensor:
        return second_moment(features)

    def loss_from_stats(self, gram: torch.Tensor) -> torch.Tensor:
        return relative_squared_error(gram, self.target)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.loss_from_stats(self.stats(features))

    def tiled(self, map_size: tuple[int, int]) -> TileTerm:
        return _GramTerm(self, map_size)


class MaskedGramStyleLoss(StyleLoss):
    """Spatial control (Gatys et al. 2017): style ``s`` is matched only where mask ``s`` is on.

    Each style image keeps its own Gram target (no blending); the image's
    Gram for style ``s`` is taken over its features weighted by mask ``s``
    (resized to the layer by area averaging) and normalised by the mask's
    area, so a style tied to a small region is matched as strongly as one
    tied to a large region. ``GramStyleLoss.build`` makes one when masks are given.
    """

    name = "gram"
    help = GramStyleLoss.help

    def __init__(self, targets: torch.Tensor, masks: torch.Tensor, weights: Sequence[float]):
        super().__init__()
        self.register_buffer("target", targets.detach())  # (N or 1, S, C, C)
        self.register_buffer("masks", masks.detach().float())  # (S, 1, H, W) at the image's size
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights], device=masks.device))

    @classmethod
    def build(cls, *, config, layer: str, per_job: PerJob, masks: Optional[torch.Tensor] = None) -> StyleLoss:
        # No blending: each style keeps its own target, matched inside its own mask.
        targets = torch.stack([torch.cat([second_moment(f).float() for f, _ in job]) for job in per_job])
        return cls(targets, masks, [w for _, w in per_job[0]])

    def layer_masks(self, height: int, width: int) -> torch.Tensor:
        """The masks resized to a layer of ``height x width`` by area averaging: ``(S, 1, h, w)``."""
        return F.interpolate(self.masks, size=(height, width), mode="area")

    @staticmethod
    def masked_scatter(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``sum_p m_sp f_p f_p^T`` for each style's mask: ``(N, S, C, C)``."""
        n, c, h, w = features.shape
        # sqrt on each side of the product: divided by sum_p m_p this is a weighted mean, which is right
        # for the soft edges area-resizing gives a mask.
        weighted = at_least_float32(features).unsqueeze(1) * masks.sqrt()  # (N, S, C, h, w)
        flat = weighted.reshape(n, masks.shape[0], c, h * w)
        return torch.einsum("nscp,nsdp->nscd", flat, flat)

    def stats(self, features: torch.Tensor) -> torch.Tensor:
        masks = self.layer_masks(*features.shape[-2:])
        area = masks.sum((1, 2, 3)).clamp_min(EPS)  # (S,)
        return self.masked_scatter(features, masks) / area[None, :, None, None]

    def loss_from_stats(self, grams: torch.Tensor) -> torch.Tensor:
        err = (grams - self.target).pow(2).sum((2, 3)) / self.target.pow(2).sum((2, 3)).clamp_min(EPS)
        return (err * self.weights).sum()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.loss_from_stats(self.stats(features))

    def tiled(self, map_size: tuple[int, int]) -> TileTerm:
        return _MaskedGramTerm(self, map_size)


class _GramTerm(TileTerm):
    def __init__(self, loss: GramStyleLoss, map_size):
        super().__init__(loss, map_size)
        self.sum: Optional[torch.Tensor] = None

    def accumulate(self, features, tile, factor) -> None:
        part = scatter_sum(features).double()
        self.sum = part if self.sum is None else self.sum + part

    def whole(self):
        return (self.sum / self.pixels,)

    def empty(self) -> bool:
        return self.sum is None

    def shapes(self, batch: int):
        channels = self.loss.target.shape[-1]
        return [(batch, channels, channels)]

    def to_sums(self):
        return [self.sum]

    def from_sums(self, sums) -> None:
        (self.sum,) = sums

    def surrogate(self, features, tile, factor) -> torch.Tensor:
        return (self.grads[0] * scatter_sum(features)).sum() / self.pixels

    def tile_part(self, features, tile, factor):
        # One scatter matrix for both the sums and the surrogate (a second would cost C^2 P again).
        scatter = scatter_sum(features)
        return [scatter.detach().double()], scatter

    def surrogate_from(self, kept, tile, factor) -> torch.Tensor:
        return (self.grads[0] * kept).sum() / self.pixels


class _MaskedGramTerm(TileTerm):
    def __init__(self, loss: MaskedGramStyleLoss, map_size):
        super().__init__(loss, map_size)
        self.masks = loss.layer_masks(*map_size)  # the whole layer's masks, sliced per tile
        self.area = self.masks.sum((1, 2, 3)).clamp_min(1e-8)[None, :, None, None]
        self.sum: Optional[torch.Tensor] = None

    def _scatter(self, features, tile, factor):
        return self.loss.masked_scatter(features, self.masks[(..., *tile.in_image(factor))])

    def accumulate(self, features, tile, factor) -> None:
        part = self._scatter(features, tile, factor).double()
        self.sum = part if self.sum is None else self.sum + part

    def whole(self):
        return (self.sum / self.area,)

    def empty(self) -> bool:
        return self.sum is None

    def shapes(self, batch: int):
        channels = self.loss.target.shape[-1]
        return [(batch, self.masks.shape[0], channels, channels)]

    def to_sums(self):
        return [self.sum]

    def from_sums(self, sums) -> None:
        (self.sum,) = sums

    def surrogate(self, features, tile, factor) -> torch.Tensor:
        return (self.grads[0] * self._scatter(features, tile, factor) / self.area).sum()

    def tile_part(self, features, tile, factor):
        scatter = self._scatter(features, tile, factor)  # once for both, as in _GramTerm
        return [scatter.detach().double()], scatter

    def surrogate_from(self, kept, tile, factor) -> torch.Tensor:
        return (self.grads[0] * kept / self.area).sum()
