"""Losses of the optimisation, each a small named module.

Departure from Gatys et al.: every feature loss is a *relative* squared
error, ``||x - t||^2 / ||t||^2`` per image, instead of a sum scaled by
hand-tuned constants. Gram matrices are averaged over pixels. Together this
makes each term independent of the image size, of the layer's activation
scale and of the weight source (Caffe activations are ~100x ImageNet ones),
so one set of default weights works everywhere and per-layer weights mean
what they say.

Shapes: features are ``(N, C, H, W)``; targets carry a leading batch
dimension of 1 (shared by the batch) or N (one per image). A batch holds N
independent jobs: every loss is the *sum* of the per-image losses, so each
image gets exactly the gradient it would get alone.

Precision: features may arrive in bf16/fp16 (autocast); every loss casts
them up to float32 before it reduces anything.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 up to float32; float32 and float64 (the tests' references) as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Batched Gram matrices ``(N, C, C)``, averaged over the H*W pixels, in float32.

    float32 whatever the features' dtype: in fp16, Caffe-VGG activations (up
    to ~1e3) squared and summed over a million pixels overflow 65504 long
    before the division by H*W.
    """
    n, c, h, w = features.shape
    flat = at_least_float32(features.reshape(n, c, h * w))
    return torch.einsum("ncp,ndp->ncd", flat, flat) / (h * w)


def relative_squared_error(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of ``||x - t||^2 / ||t||^2``; targets broadcast over the batch."""
    x, target = at_least_float32(x), at_least_float32(target)
    dims = tuple(range(1, x.dim()))
    err = (x - target).pow(2).sum(dims)
    scale = target.pow(2).sum(dims).clamp_min(EPS)
    return (err / scale).sum()


class ContentLoss(nn.Module):
    """Relative MSE between the image's features and the content's."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", at_least_float32(target.detach()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return relative_squared_error(features, self.target)


class GramStyleLoss(nn.Module):
    """Relative squared error between Gram matrices (Gatys et al.'s style loss).

    The target is given as a Gram matrix, not as features, so several style
    images can be blended into one target beforehand.
    """

    def __init__(self, target_gram: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target_gram.detach())

    @staticmethod
    def target_stats(features: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
        """The blended target ``(1, C, C)``: the weighted mean of the styles' Grams."""
        total_w = float(sum(w for _, w in features))
        return sum(gram_matrix(f) * (w / total_w) for f, w in features)

    @classmethod
    def from_targets(cls, per_job: Sequence[torch.Tensor]) -> "GramStyleLoss":
        return cls(torch.cat(list(per_job)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return relative_squared_error(gram_matrix(features), self.target)


class MaskedGramStyleLoss(nn.Module):
    """Spatial control (Gatys et al. 2017): style ``s`` is matched only where mask ``s`` is on.

    Each style image keeps its own Gram target (no blending); the image's
    Gram for style ``s`` is taken over its features weighted by mask ``s``
    (resized to the layer by area averaging) and normalised by the mask's
    area, so a style tied to a small region is matched as strongly as one
    tied to a large region.
    """

    def __init__(self, targets: torch.Tensor, masks: torch.Tensor, weights: Sequence[float]):
        super().__init__()
        self.register_buffer("target", targets.detach())  # (N or 1, S, C, C)
        self.register_buffer("masks", masks.detach().float())  # (S, 1, H, W) at the image's size
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights], device=masks.device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, c, h, w = features.shape
        s = self.masks.shape[0]
        masks = F.interpolate(self.masks, size=(h, w), mode="area")  # (S, 1, h, w)
        # sqrt on each side of the product: the Gram is then sum_p m_p f_p f_p^T / sum_p m_p, a weighted
        # mean that is right for the soft edges area-resizing gives a mask.
        weighted = at_least_float32(features).unsqueeze(1) * masks.sqrt()  # (N, S, C, h, w)
        flat = weighted.reshape(n, s, c, h * w)
        area = masks.sum((1, 2, 3)).clamp_min(EPS)  # (S,)
        grams = torch.einsum("nscp,nsdp->nscd", flat, flat) / area[None, :, None, None]
        err = (grams - self.target).pow(2).sum((2, 3)) / self.target.pow(2).sum((2, 3)).clamp_min(EPS)
        return (err * self.weights).sum()


class TotalVariationLoss(nn.Module):
    """Mean squared difference between neighbouring pixels (smooth, so L-BFGS-friendly), summed over the batch."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        dy = image[..., 1:, :] - image[..., :-1, :]
        dx = image[..., :, 1:] - image[..., :, :-1]
        per_image = (-3, -2, -1)
        return (dy.pow(2).mean(per_image) + dx.pow(2).mean(per_image)).sum()


class StyleTransferLoss(nn.Module):
    """The weighted sum ``content + style + tv``, with its parts for reporting."""

    def __init__(
        self,
        content: Mapping[str, nn.Module],
        style: Mapping[str, nn.Module],
        content_layer_weights: Sequence[float],
        style_layer_weights: Sequence[float],
        content_weight: float,
        style_weight: float,
        tv_weight: float,
    ):
        super().__init__()
        self.content = nn.ModuleDict(content)
        self.style = nn.ModuleDict(style)
        self.tv = TotalVariationLoss()
        # Layer weights are normalised to sum to one so the global weights keep their meaning.
        self.content_layer_weights = _normalised(content_layer_weights)
        self.style_layer_weights = _normalised(style_layer_weights)
        self.weights = {"content": content_weight, "style": style_weight, "tv": tv_weight}

    def forward(self, features: Mapping[str, torch.Tensor], image: torch.Tensor):
        parts = {
            "content": _weighted(self.content, self.content_layer_weights, features),
            "style": _weighted(self.style, self.style_layer_weights, features),
            "tv": self.tv(image),
        }
        total = sum(self.weights[k] * v for k, v in parts.items())
        return total, parts


def _normalised(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [float(w) / total for w in weights] if total > 0 else [0.0 for _ in weights]


def _weighted(losses: nn.ModuleDict, weights: Sequence[float], features) -> torch.Tensor:
    if not len(losses):
        return next(iter(features.values())).new_zeros(())
    return sum(w * loss(features[name]) for (name, loss), w in zip(losses.items(), weights))
