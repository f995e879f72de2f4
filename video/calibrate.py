"""``python -m video.calibrate H W FRAMES STEPS WEIGHT,FRACTION...``: the table docs/video.md chose defaults by.

For each ``--temporal-weight,--later-steps`` pair (a negative weight: independent frames, the full
schedule each), the synthetic clip (video/synthetic.py, from the sample photo) is stylised with the
starry-night sample and the line gives the warping error (video/measure.py), the seconds per frame and
the style loss of the first and the later frames (how much style the temporal term costs).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from engine import Config
from engine.images import load_image

from .measure import warping_error
from .run import FrameStore, VideoSettings, stylize_frames
from .synthetic import make_clip

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    h, w, frames, steps = (int(v) for v in argv[:4])
    photo = load_image(ROOT / "examples/tubingen.jpg")
    clip = make_clip(photo, 1 - photo.flip(-1), frames, (h, w))
    style = load_image(ROOT / "examples/starry_night.jpg")
    contents = list(clip.frames)
    config = Config(device="cpu", size=max(h, w), min_size=max(h, w) // 2, steps=steps)
    print(f"content (the floor): warping error {warping_error(contents, contents):.5f}", flush=True)
    for pair in argv[4:]:
        weight, fraction = (float(v) for v in pair.split(","))
        settings = VideoSettings(temporal_weight=max(weight, 0), later_steps=fraction, independent=weight < 0)
        with tempfile.TemporaryDirectory() as folder:
            store = FrameStore(Path(folder), [f"{k:04d}.png" for k in range(frames)])
            done = []
            stylize_frames(contents, [style], config, settings, store, (h, w), on_frame=done.append)
            outputs = [store.load(k) for k in range(frames)]
        later = done[1:]
        later_style = sum(d.parts["style"] for d in later) / len(later)
        name = "independent" if weight < 0 else f"weight {weight:g}, later steps {fraction:g}"
        print(
            f"{name}: warping error {warping_error(outputs, contents):.5f}, s/frame first {done[0].seconds:.1f} "
            f"later {sum(d.seconds for d in later) / len(later):.1f}, style loss first {done[0].parts['style']:.4f} "
            f"later {later_style:.4f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
