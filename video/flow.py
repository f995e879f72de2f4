"""Optical flow between content frames, warping, and where the flow can be trusted.

The method is Ruder, Dosovitskiy and Brox, "Artistic style transfer for videos" (GCPR 2016); the flow
is OpenCV's DIS (Kroeger et al. 2016) on the content frames, not on the stylised ones, since the style
moves with the scene.

Conventions: a flow is a float32 tensor ``(2, H, W)`` of pixel displacements ``(dx, dy)``. The *backward*
flow of frame ``t`` to an earlier frame ``s`` says, for each pixel of ``t``, where that point was in ``s``;
warping an image of frame ``s`` by it gives the image as seen at ``t`` (``warp``). A pixel's weight is
1 where the flow is reliable and 0 where the point was hidden in ``s`` (disocclusion, or outside the
frame) or lies on a motion boundary, where flow is least accurate.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from engine.images import resize

# Ruder et al.'s thresholds (after Sundaram, Brox and Keutzer 2010), in pixels and pixels squared.
CONSISTENCY_RELATIVE, CONSISTENCY_ABSOLUTE = 0.01, 0.5
BOUNDARY_RELATIVE, BOUNDARY_ABSOLUTE = 0.01, 0.002
FLOW_MIN_SIDE = 256  # frames with a shorter long side are enlarged by a whole factor for the flow (dis_flow)


def grey(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in [0, 1] as the ``(H, W)`` uint8 luminance DIS works on."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype)
    y = (image * weights[:, None, None]).sum(0)
    return np.ascontiguousarray(np.rint(y.clamp(0, 1).numpy() * 255).astype(np.uint8))


def dis_flow(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The flow from ``source`` to ``target`` (``(3, H, W)`` frames): for each pixel of ``source``, where it
    is in ``target``. ``dis_flow(frame_t, frame_s)`` is frame t's backward flow to s."""
    import cv2

    # One thread: DIS is fast at these sizes, and a fixed thread count keeps the result the same on every
    # run (a resumed video must compute exactly what the uninterrupted one did).
    cv2.setNumThreads(1)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    h, w = source.shape[-2:]
    # DIS matches 8 px patches over a pyramid: on small frames it blurs a moving object's flow into its
    # surroundings (and hides the disocclusion beside it). Small frames are matched enlarged instead.
    factor = max(1, math.ceil(FLOW_MIN_SIDE / max(h, w)))
    a, b = (resize(f, (h * factor, w * factor)) if factor > 1 else f for f in (source, target))
    flow = torch.from_numpy(dis.calc(grey(a), grey(b), None)).permute(2, 0, 1)  # (2, H, W) float32
    if factor > 1:
        flow = F.avg_pool2d(flow[None], factor)[0] / factor
    return flow.contiguous()


def sample_grid(flow: torch.Tensor) -> torch.Tensor:
    """``grid_sample``'s grid ``(1, H, W, 2)`` for the points ``pixel + flow`` (align_corners=True)."""
    _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=flow.dtype), torch.arange(w, dtype=flow.dtype), indexing="ij")
    x = (xs + flow[0]) * (2 / max(w - 1, 1)) - 1
    y = (ys + flow[1]) * (2 / max(h - 1, 1)) - 1
    return torch.stack([x, y], dim=-1)[None]


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``image`` (``(C, H, W)``, of an earlier frame) resampled at ``pixel + flow``: bilinear, edges repeated."""
    grid = sample_grid(flow.to(image.dtype))
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


def inside(flow: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` bool: ``pixel + flow`` lies inside the frame (a point that came from outside has no past)."""
    _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=flow.dtype), torch.arange(w, dtype=flow.dtype), indexing="ij")
    x, y = xs + flow[0], ys + flow[1]
    return (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def consistent(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` bool: the forward-backward check. ``backward`` is frame t's flow to s, ``forward`` frame
    s's flow to t. Going back then forward again should return to the start; where it does not, the point
    was hidden in one of the frames (an occlusion or disocclusion).
    """
    there = warp(forward, backward)  # the forward flow at the point each pixel of t came from
    gap = (there + backward).pow(2).sum(0)
    scale = there.pow(2).sum(0) + backward.pow(2).sum(0)
    return gap <= CONSISTENCY_RELATIVE * scale + CONSISTENCY_ABSOLUTE


def motion_boundary(backward: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` bool: where the flow changes sharply (the edge of a moving object)."""
    # Central differences, one-sided at the border.
    dy = torch.zeros_like(backward)
    dx = torch.zeros_like(backward)
    dy[:, 1:-1] = (backward[:, 2:] - backward[:, :-2]) / 2
    dx[:, :, 1:-1] = (backward[:, :, 2:] - backward[:, :, :-2]) / 2
    change = dx.pow(2).sum(0) + dy.pow(2).sum(0)
    return change > BOUNDARY_RELATIVE * backward.pow(2).sum(0) + BOUNDARY_ABSOLUTE


def reliability(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` float weights: 1 where frame t's pixel can be taken from frame s by ``backward``, else 0."""
    ok = consistent(forward, backward) & ~motion_boundary(backward) & inside(backward)
    return ok.float()


def long_term_weights(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Ruder et al.'s long-term weights: a pixel counts for the nearest earlier frame it is reliable in.

    ``weights`` are the reliabilities for frames t-j, nearest first; each keeps only what the nearer
    ones do not already cover, ``max(c_j - sum_{k<j} c_k, 0)``.
    """
    kept, covered = [], torch.zeros_like(weights[0])
    for c in weights:
        kept.append((c - covered).clamp_min(0))
        covered = covered + c
    return kept
