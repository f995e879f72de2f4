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


def load_frames(source) -> list[torch.Tensor]:
    """A video file's frames, or a folder's images in name order, as ``(3, H, W)`` tensors."""
    from pathlib import Path

    from engine.images import FORMATS, load_image

    from .io import read_frames

    path = Path(source)
    if path.is_dir():
        return [load_image(p) for p in sorted(path.iterdir()) if p.suffix.lower() in FORMATS]
    return list(read_frames(path))


def main(argv=None) -> int:
    """``python -m video.measure CONTENT OUTPUT...``: the warping error of each output and of the content."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m video.measure", description=main.__doc__)
    parser.add_argument("content", help="the content video (or folder of frames) the outputs were made from")
    parser.add_argument("outputs", nargs="+", help="stylised videos or folders of frames, same frame count")
    args = parser.parse_args(argv)
    contents = load_frames(args.content)
    rows = [("content (the floor)", contents)] + [(o, load_frames(o)) for o in args.outputs]
    for name, frames in rows:
        error = warping_error(frames, contents[: len(frames)])
        print(f"{error:.6f}  {name}  ({len(frames)} frames)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
