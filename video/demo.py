"""``python -m video.demo OUT.gif|OUT.mp4 FOLDER...``: folders of frames side by side, as a GIF or an MP4.

How docs/video.md shows independent frames beside temporally consistent ones (``--keep-frames`` keeps
a video's stylised frames in ``OUTPUT.frames/``).
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image


def side_by_side(folders: list[Path], scale: float, gap: int = 4) -> list[np.ndarray]:
    """Frame k of every folder (images in name order) in a row, ``gap`` white pixels apart, scaled."""
    lists = [sorted(p for p in Path(f).iterdir() if p.suffix.lower() == ".png") for f in folders]
    count = min(len(names) for names in lists)
    rows = []
    for k in range(count):
        images = [Image.open(names[k]).convert("RGB") for names in lists]
        w, h = (max(1, round(v * scale)) for v in images[0].size)
        row = Image.new("RGB", (len(images) * w + (len(images) - 1) * gap, h), "white")
        for i, image in enumerate(images):
            row.paste(image.resize((w, h), Image.LANCZOS), (i * (w + gap), 0))
        rows.append(np.asarray(row))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m video.demo", description=__doc__.split("\n")[0])
    parser.add_argument("output", help=".gif or .mp4")
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--fps", type=int, default=12)
    parser.add_argument("--crf", type=int, default=28, help="an MP4's x264 quality: lower is larger (default: 28)")
    args = parser.parse_args(argv)
    rows = side_by_side([Path(f) for f in args.folders], args.scale)
    if args.output.endswith(".gif"):
        frames = [Image.fromarray(r).quantize(colors=96, method=Image.MEDIANCUT) for r in rows]
        frames[0].save(args.output, save_all=True, append_images=frames[1:], duration=round(1000 / args.fps), loop=0)
    else:
        from .io import encode

        even = [r[: r.shape[0] // 2 * 2, : r.shape[1] // 2 * 2] for r in rows]
        encode(iter(even), args.output, Fraction(args.fps), overwrite=False, crf=args.crf)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
