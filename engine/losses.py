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

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

EPS = 1e-8


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 up to float32; float32 and float64 (the tests' references) as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@contextlib.contextmanager
def matmul_tf32(enabled: bool) -> Iterator[None]:
    """CUDA matmuls inside use TF32 or not, as ``enabled`` says; the previous setting comes back after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def full_float32() -> contextlib.AbstractContextManager[None]:
    """Matmuls inside run in IEEE float32 even when the run's precision turned TF32 on (CUDA).

    TF32 keeps 10 mantissa bits of each matmul input, which a statistic that
    cancels (the W2 distance of a style with itself is 0) or an iteration that
    compounds rounding (Newton-Schulz) cannot afford. The flag is read on the
    host when each matmul is launched, so a CUDA graph captured with it off
    replays the float32 kernels. A no-op on the CPU, which has no TF32.
    """
    return matmul_tf32(False)


def scatter_sum(features: torch.Tensor) -> torch.Tensor:
    """``sum_p f_p f_p^T`` over the H*W pixels of each image: ``(N, C, C)`` in at least float32.

    float32 whatever the features' dtype: in fp16, Caffe-VGG activations (up
    to ~1e3) squared and summed over a million pixels overflow 65504.
    """
    flat = at_least_float32(features.flatten(2))
    return torch.einsum("ncp,ndp->ncd", flat, flat)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Batched Gram matrices ``(N, C, C)``, averaged over the H*W pixels, in float32 (see ``scatter_sum``)."""
    h, w = features.shape[-2:]
    return scatter_sum(features) / (h * w)


@dataclass(frozen=True)
class Moments:
    """Mean and scatter of a layer's feature vectors (one C-vector per pixel), per image, in float64.

    ``scatter`` is the sum over pixels of ``(f - mean)(f - mean)^T``. Moments
    of disjoint pixel sets add up exactly (``a + b``, the pairwise update of
    Chan et al.), which is how tiles of an image give the whole image's Gram
    matrix and covariance; centring each part first keeps float32 features
    from cancelling catastrophically.
    """

    count: int
    mean: torch.Tensor  # (N, C)
    scatter: torch.Tensor  # (N, C, C)

    @classmethod
    def of(cls, features: torch.Tensor) -> "Moments":
        n, c, h, w = features.shape
        flat = at_least_float32(features.reshape(n, c, h * w))
        if h * w == 0:
            zeros = flat.new_zeros((n, c), dtype=torch.float64)
            return cls(0, zeros, zeros.new_zeros((n, c, c)))
        mean = flat.mean(dim=2)
        centred = flat - mean[..., None]
        with full_float32():  # W2 targets and tiles: see full_float32
            scatter = torch.einsum("ncp,ndp->ncd", centred, centred)
        return cls(h * w, mean.double(), scatter.double())

    def __add__(self, other: "Moments") -> "Moments":
        if other.count == 0 or self.count == 0:
            return self if other.count == 0 else other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        cross = torch.einsum("nc,nd->ncd", delta, delta) * (self.count * other.count / count)
        return Moments(count, mean, self.scatter + other.scatter + cross)

    @property
    def covariance(self) -> torch.Tensor:
        return self.scatter / self.count

    @property
    def second_moment(self) -> torch.Tensor:
        """The Gram matrix averaged over pixels, ``E[f f^T]``."""
        return self.covariance + torch.einsum("nc,nd->ncd", self.mean, self.mean)


FeaturesOrMoments = Union[torch.Tensor, Moments]


def second_moment(features: FeaturesOrMoments) -> torch.Tensor:
    """``E[f f^T]`` over pixels of a feature map (float32 Gram) or of precomputed ``Moments`` (float64)."""
    return features.second_moment if isinstance(features, Moments) else gram_matrix(features)


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
        self.register_buffer("scale", self.target.pow(2).sum((1, 2, 3)).clamp_min(EPS))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.partial(features, (slice(None), slice(None)))

    def partial(self, features: torch.Tensor, region: tuple[slice, slice]) -> torch.Tensor:
        """The share of the loss of the pixels ``target[..., rows, cols]``, given their ``features``.

        The shares of disjoint regions add up to the whole loss: the scale is the whole target's.
        """
        rows, cols = region
        err = (at_least_float32(features) - self.target[..., rows, cols]).pow(2).sum((1, 2, 3))
        return (err / self.scale).sum()


class TotalVariationLoss(nn.Module):
    """Mean squared difference between neighbouring pixels (smooth, so L-BFGS-friendly), summed over the batch."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        return self.partial(image, (0, h, 0, w), (h, w))

    def partial(self, crop: torch.Tensor, own: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
        """The share of the loss of the pixels ``crop[..., y0:y1, x0:x1]`` of an image of ``size`` (H, W).

        A difference belongs to the pixel above or left of it, so the shares
        of disjoint regions add up to the whole loss; ``crop`` must hold the
        row below and the column right of the region where the image has them.
        """
        y0, y1, x0, x1 = own
        height, width = size
        c = crop.shape[-3]
        ye, xe = min(y1, crop.shape[-2] - 1), min(x1, crop.shape[-1] - 1)
        dy = crop[..., y0 + 1 : ye + 1, x0:x1] - crop[..., y0:ye, x0:x1]
        dx = crop[..., y0:y1, x0 + 1 : xe + 1] - crop[..., y0:y1, x0:xe]
        per_image = (-3, -2, -1)
        return (
            dy.pow(2).sum(per_image) / (c * (height - 1) * width)
            + dx.pow(2).sum(per_image) / (c * height * (width - 1))
        ).sum()


class StyleTransferLoss(nn.Module):
    """The weighted sum ``content + style + tv`` (+ ``structure``, + any ``extra`` image terms), with its parts.

    ``structure``: ``(weight, term)``, the self-similarity term of engine/structure.py (``term(features)``),
    or None. Tiles cannot compute it (``tiling.TiledObjective`` refuses a loss that has one).

    ``extra`` maps a name to ``(weight, term)``: a term of the image alone (``term(image)``, e.g. the video
    layer's temporal term, engine/temporal.py) that also has ``term.partial(crop, own, size, origin)`` for
    tiling. It is added into the total and reported as its own part. Callers outside the engine (video/)
    bring their terms this way, so the engine needs no knowledge of them.
    """

    def __init__(
        self,
        content: Mapping[str, nn.Module],
        style: Mapping[str, nn.Module],
        *,
        content_layer_weights: Sequence[float],
        style_layer_weights: Sequence[float],
        content_weight: float,
        style_weight: float,
        tv_weight: float,
        extra: Optional[Mapping[str, tuple[float, nn.Module]]] = None,
        structure: Optional[tuple[float, nn.Module]] = None,
    ):
        super().__init__()
        self.content = nn.ModuleDict(content)
        self.style = nn.ModuleDict(style)
        self.tv = TotalVariationLoss()
        # Layer weights are normalised to sum to one so the global weights keep their meaning.
        self.content_layer_weights = _normalised(content_layer_weights)
        self.style_layer_weights = _normalised(style_layer_weights)
        self.weights = {"content": content_weight, "style": style_weight, "tv": tv_weight}
        # The structure term (engine/structure.py) reads features like content and style; only present when on,
        # so that runs without it report the same parts as before.
        self.structure = None if structure is None else structure[1]
        if structure is not None:
            self.weights["structure"] = float(structure[0])
        extra = dict(extra or {})
        for name in extra:
            if name in self.weights or name == "structure":
                raise ValueError(f"an extra image term may not be called {name!r}: that is a built-in part")
        self.extra = nn.ModuleDict({name: term for name, (_, term) in extra.items()})  # buffers follow .to()
        self.weights.update({name: float(weight) for name, (weight, _) in extra.items()})

    def forward(self, features: Mapping[str, torch.Tensor], image: torch.Tensor):
        parts = {
            "content": _weighted(self.content, self.content_layer_weights, features),
            "style": _weighted(self.style, self.style_layer_weights, features),
            "tv": self.tv(image),
            **({} if self.structure is None else {"structure": self.structure(features)}),
            **{name: term(image) for name, term in self.extra.items()},
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
