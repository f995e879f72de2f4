"""A per-pixel image term: keep the image close to a target where a weight says so.

Video stylisation (Ruder, Dosovitskiy and Brox, "Artistic style transfer for videos", 2016) keeps each
frame close to the previous stylised frame warped by optical flow, wherever the flow is reliable:
``sum_p w_p |x_p - t_p|^2``. The flow, the warping and the weights are the video layer's (video/); the
engine only needs the term, which it adds to the loss through ``StyleTransferLoss``'s ``extra`` mapping.

Normalisation: the sum is divided by the image's ``C * H * W`` (not by the weights' sum), so the term is
a mean over the whole image: its weight means the same at any size, and a region's share is simply its
own pixels' sum over the same divisor, so tiles add up to the whole exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from .losses import at_least_float32


class TemporalLoss(nn.Module):
    """``sum_n sum_{c,p} weight[n,0,p] * (image[n,c,p] - target[n,c,p])^2 / (C * H * W)``.

    ``target`` is ``(N, 3, H, W)`` (one per job of the batch), ``weight`` is ``(N, 1, H, W)`` in [0, 1]
    (0: this pixel is free). Both are buffers, so they move with ``.to()`` and a CUDA graph copies them in.
    """

    def __init__(self, target: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        if target.dim() != 4 or weight.dim() != 4 or weight.shape[1] != 1:
            raise ValueError(f"target must be (N, C, H, W) and weight (N, 1, H, W), not {target.shape}, {weight.shape}")
        if target.shape[-2:] != weight.shape[-2:] or weight.shape[0] not in (1, target.shape[0]):
            raise ValueError(f"target {tuple(target.shape)} and weight {tuple(weight.shape)} do not match")
        self.register_buffer("target", at_least_float32(target.detach()))
        self.register_buffer("weight", at_least_float32(weight.detach()))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        return self.partial(image, (0, h, 0, w), (h, w))

    def partial(
        self,
        crop: torch.Tensor,
        own: tuple[int, int, int, int],
        size: tuple[int, int],
        origin: tuple[int, int] = (0, 0),
    ) -> torch.Tensor:
        """The share of the pixels ``crop[..., y0:y1, x0:x1]`` (``own``, in crop coordinates) of an image of
        ``size`` (H, W), for a crop whose top-left pixel is the image's ``origin`` (row, column).

        Shares of disjoint regions add up to the whole term: each is its own pixels' sum over the whole
        image's ``C * H * W``. (Unlike TV a pixel needs no neighbour, so the crop needs no margin.)
        """
        y0, y1, x0, x1 = own
        oy, ox = origin
        height, width = size
        region = (..., slice(oy + y0, oy + y1), slice(ox + x0, ox + x1))
        diff = at_least_float32(crop[..., y0:y1, x0:x1]) - self.target[region]
        per_image = (diff.pow(2) * self.weight[region]).sum((-3, -2, -1))
        return (per_image / (crop.shape[-3] * height * width)).sum()
