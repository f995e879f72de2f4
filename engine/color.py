"""Colour control (Gatys et al., "Preserving color in neural artistic style transfer", 2016).

* ``luminance``: the style is transferred on luminance only. Content and
  style become grey (their Y channel in YIQ, repeated three times). The
  style's luminance is first matched to the content's mean and spread. The
  optimisation runs on grey images, and the result's Y is then joined to the
  content's I and Q, so the output keeps the content's colours exactly.
* the ``palette`` start (``--init palette``, not a colour mode): the photo's
  colours mapped the other way, onto the style images' mean and covariance
  (blended by the jobs' weights), as the image the optimisation starts from.
  The style loss would move the colours there anyway, one Adam step of about
  ``lr`` per pixel at a time; starting there saves those steps and leaves
  the photo's layout and detail untouched (docs/speed.md, "The schedule").
* ``histogram``: before optimising, each style image's colours are mapped
  affinely so that their mean and covariance equal the content's
  (``x -> A (x - mu_s) + mu_c`` with ``A = C_c^1/2 C_s^-1/2``); the style
  then brings texture but not its palette.

Images here are ``(3, H, W)`` float RGB in [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import torch

from .linalg import sym_power
from .losses import EPS

MODES = ("none", "luminance", "histogram")
# NTSC YIQ (the transform the paper uses); rows give Y, I, Q from R, G, B.
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)


def rgb_to_yiq(image: torch.Tensor) -> torch.Tensor:
    m = _RGB_TO_YIQ.to(image)
    return torch.einsum("ij,j...->i...", m, image)


def yiq_to_rgb(image: torch.Tensor) -> torch.Tensor:
    m = torch.linalg.inv(_RGB_TO_YIQ).to(image)
    return torch.einsum("ij,j...->i...", m, image)


def grey(y: torch.Tensor) -> torch.Tensor:
    """A luminance plane ``(H, W)`` as a 3-channel grey image, clamped to [0, 1]."""
    return y.clamp(0, 1).expand(3, -1, -1).contiguous()


def luminance_pair(content: torch.Tensor, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey content and grey style, the style's luminance matched to the content's mean and spread."""
    yc, ys = rgb_to_yiq(content)[0], rgb_to_yiq(style)[0]
    matched = (ys - ys.mean()) / ys.std().clamp_min(EPS) * yc.std() + yc.mean()
    return grey(yc), grey(matched)


def join_luminance(result: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """The luminance of ``result`` with the chroma (I, Q) of ``colours``, both ``(3, H, W)``."""
    yiq = rgb_to_yiq(colours)
    yiq[0] = rgb_to_yiq(result)[0]
    return yiq_to_rgb(yiq).clamp(0, 1)


def _map_moments(
    x: torch.Tensor, source: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """``x`` ``(3, N)`` float64 mapped affinely, ``x -> A (x - mu) + mu_t`` with ``A = C_t^1/2 C^-1/2``, so that
    pixels with ``source``'s mean and covariance get ``target``'s (both ``(mean (3, 1), covariance (3, 3))``)."""
    (mu, cov), (mu_t, cov_t) = source, target
    eye = EPS * torch.eye(3, dtype=torch.float64)
    return sym_power(cov_t + eye, 0.5, EPS) @ sym_power(cov + eye, -0.5, EPS) @ (x - mu) + mu_t


def match_colours(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """``style`` with its colour mean and covariance mapped onto ``content``'s (then clamped to [0, 1])."""
    s = style.reshape(3, -1).double()
    c = content.reshape(3, -1).double()
    out = _map_moments(s, (s.mean(1, keepdim=True), torch.cov(s)), (c.mean(1, keepdim=True), torch.cov(c)))
    return out.reshape(style.shape).to(style.dtype).clamp(0, 1)


def colour_moments(images: Sequence[torch.Tensor], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The colour mean ``(3, 1)`` and covariance ``(3, 3)``, float64, of the mixture of the pixels of ``images``
    in which each image has the share ``weights`` gives it (normalised)."""
    total = float(sum(weights))
    mean = torch.zeros(3, 1, dtype=torch.float64)
    second = torch.zeros(3, 3, dtype=torch.float64)
    for image, weight in zip(images, weights):
        x = image.reshape(3, -1).double()
        m = x.mean(1, keepdim=True)
        mean += weight / total * m
        second += weight / total * (torch.cov(x, correction=0) + m @ m.T)
    return mean, second - mean @ mean.T


def palette_start(content: torch.Tensor, styles: Sequence[torch.Tensor], blend: Sequence[float]) -> torch.Tensor:
    """``--init palette``: the photo ``(3, H, W)`` with its colour mean and covariance mapped onto those of
    ``styles`` blended by ``blend`` (then clamped to [0, 1])."""
    c = content.reshape(3, -1).double()
    out = _map_moments(c, colour_moments([content], [1.0]), colour_moments(styles, blend))
    return out.reshape(content.shape).to(content.dtype).clamp(0, 1)
