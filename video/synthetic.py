"""A clip with a known motion, made from still photos: the tests' and the docs' ground truth.

The camera pans across a photograph (``pan`` pixels per frame, ``(dx, dy)``), and zooms in on it
(``zoom``: the magnification grows by that fraction per frame), and a textured square (cut from a second
photograph) slides across it the other way (``occluder`` pixels per frame to the right). So every pixel's
backward flow is known exactly, and so is where the square uncovers background that the previous frame
did not show (disocclusion), or where the pan brings in new pixels at the border. Without zoom every
shift is a whole pixel and frames are exact crops; with zoom the photo is resampled (bilinear) and the
flow grows from the centre outwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.images import fit_long_side, resize


@dataclass(frozen=True)
class Clip:
    frames: torch.Tensor  # (T, 3, H, W) in [0, 1]
    flows: torch.Tensor  # (T, 2, H, W): frame t's backward flow to t-1 (frame 0's is zeros)
    hidden: torch.Tensor  # (T, H, W) bool: frame t's pixels that frame t-1 did not show
    square: torch.Tensor  # (T, H, W) bool: where the occluder is


def make_clip(
    photo: torch.Tensor,
    patch: torch.Tensor,
    frames: int,
    size: tuple[int, int],
    pan: tuple[int, int] = (2, 1),
    occluder: int = 3,
    zoom: float = 0.0,
) -> Clip:
    """``frames`` frames of ``size`` (H, W): a window panning across ``photo`` by ``pan`` (dx, dy) pixels per
    frame and zooming in by ``zoom`` per frame, with a square of ``patch`` (a third of the height) moving
    ``occluder`` pixels per frame rightwards, against the pan."""
    if zoom:
        return _zooming(photo, patch, frames, size, pan, occluder, zoom)
    h, w = size
    dx, dy = pan
    need_h, need_w = h + abs(dy) * frames, w + abs(dx) * frames
    # The photo scaled so that the whole pan fits inside it (never upscaled further than that needs).
    ph, pw = photo.shape[-2:]
    scale = max(need_h / ph, need_w / pw)
    canvas = resize(photo, (max(need_h, round(ph * scale)), max(need_w, round(pw * scale))))
    side = max(4, h // 3)
    square = resize(patch, fit_long_side(*patch.shape[-2:], max(side, 1) * 2))[..., :side, :side]
    top = (h - side) // 2
    start = 1  # the square enters at the left and moves right
    y0, x0 = (0 if dy >= 0 else need_h - h), (0 if dx >= 0 else need_w - w)

    def left(t: int) -> int:
        return start + occluder * t

    out, flows, hidden, where = [], [], [], []
    for t in range(frames):
        frame = canvas[:, y0 + dy * t : y0 + dy * t + h, x0 + dx * t : x0 + dx * t + w].clone()
        on = torch.zeros(h, w, dtype=torch.bool)
        a, b = max(0, left(t)), min(w, left(t) + side)
        if a < b:
            frame[:, top : top + side, a:b] = square[:, :, a - left(t) : b - left(t)]
            on[top : top + side, a:b] = True
        flow = torch.zeros(2, h, w)
        gone = torch.zeros(h, w, dtype=torch.bool)
        if t > 0:
            flow[0], flow[1] = float(dx), float(dy)
            flow[0][on] = -float(occluder)
            flow[1][on] = 0.0
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            sx, sy = xs + flow[0].long(), ys + flow[1].long()
            outside = (sx < 0) | (sx >= w) | (sy < 0) | (sy >= h)
            before = where[-1]
            covered = before[sy.clamp(0, h - 1), sx.clamp(0, w - 1)] & ~on  # background that was under the square
            gone = outside | covered
        out.append(frame)
        flows.append(flow)
        hidden.append(gone)
        where.append(on)
    return Clip(torch.stack(out), torch.stack(flows), torch.stack(hidden), torch.stack(where))


def _zooming(photo, patch, frames, size, pan, occluder, zoom) -> Clip:
    """``make_clip`` with a zoom: frame t shows the photo magnified ``(1 + zoom) ** t`` about a centre that
    moves by ``pan`` photo pixels per frame (``pan * magnification`` on screen)."""
    import torch.nn.functional as F

    h, w = size
    dx, dy = pan
    ph, pw = photo.shape[-2:]
    scale = max((h + abs(dy) * frames) / ph, (w + abs(dx) * frames) / pw)
    canvas = resize(photo, (round(ph * scale), round(pw * scale)))
    ch, cw = canvas.shape[-2:]
    side = max(4, h // 3)
    square = resize(patch, fit_long_side(*patch.shape[-2:], side * 2))[..., :side, :side]
    top = (h - side) // 2
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    # The window's centre on the canvas: it starts where the whole pan stays inside.
    oy0 = (h - 1) / 2 + (0 if dy >= 0 else abs(dy) * frames)
    ox0 = (w - 1) / 2 + (0 if dx >= 0 else abs(dx) * frames)

    def magnification(t: int) -> float:
        return (1 + zoom) ** t

    def canvas_at(t: int):
        m = magnification(t)
        return oy0 + dy * t + (ys - cy) / m, ox0 + dx * t + (xs - cx) / m

    out, flows, hidden, where = [], [], [], []
    for t in range(frames):
        qy, qx = canvas_at(t)
        grid = torch.stack([qx / (cw - 1) * 2 - 1, qy / (ch - 1) * 2 - 1], -1)[None].float()
        frame = F.grid_sample(canvas[None], grid, mode="bilinear", align_corners=True)[0]
        left = 1 + occluder * t
        on = torch.zeros(h, w, dtype=torch.bool)
        a, b = max(0, left), min(w, left + side)
        if a < b:
            frame[:, top : top + side, a:b] = square[:, :, a - left : b - left]
            on[top : top + side, a:b] = True
        flow = torch.zeros(2, h, w)
        gone = torch.zeros(h, w, dtype=torch.bool)
        if t > 0:
            # Where frame t's background pixel was in frame t-1: its canvas point seen by the earlier camera.
            m = magnification(t - 1)
            py = cy + (qy - (oy0 + dy * (t - 1))) * m
            px = cx + (qx - (ox0 + dx * (t - 1))) * m
            flow[0], flow[1] = (px - xs).float(), (py - ys).float()
            flow[0][on] = -float(occluder)
            flow[1][on] = 0.0
            sx, sy = (xs + flow[0]).round().long(), (ys + flow[1]).round().long()
            outside = (sx < 0) | (sx >= w) | (sy < 0) | (sy >= h)
            covered = where[-1][sy.clamp(0, h - 1), sx.clamp(0, w - 1)] & ~on
            gone = outside | covered
        out.append(frame.clamp(0, 1))
        flows.append(flow)
        hidden.append(gone)
        where.append(on)
    return Clip(torch.stack(out), torch.stack(flows), torch.stack(hidden), torch.stack(where))


def main(argv=None) -> int:
    """``python -m video.synthetic OUT.mp4``: write the pan-and-square clip as a video (the docs' test clip)."""
    import argparse
    from fractions import Fraction

    import numpy as np

    from engine.images import load_image

    from .io import encode

    parser = argparse.ArgumentParser(prog="python -m video.synthetic", description=main.__doc__)
    parser.add_argument("output")
    parser.add_argument("--photo", required=True, help="the background photograph")
    parser.add_argument("--patch", required=True, help="the photograph the moving square is cut from")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", default="192x256", help="HxW (default: 192x256)")
    parser.add_argument("--fps", type=int, default=12)
    parser.add_argument("--zoom", type=float, default=0.0, help="magnification added per frame (e.g. 0.01)")
    args = parser.parse_args(argv)
    h, w = (int(v) for v in args.size.split("x"))
    clip = make_clip(load_image(args.photo), load_image(args.patch), args.frames, (h, w), zoom=args.zoom)
    frames = (np.rint(f.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for f in clip.frames)
    encode(frames, args.output, Fraction(args.fps), overwrite=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
