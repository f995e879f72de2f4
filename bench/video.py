"""``nst bench video``: how much a stylised video flickers, with the temporal term and without, and what it costs.

The synthetic clip (video/synthetic.py: a photo panned with a known motion, a textured square moving the
other way) is stylised twice with the same ``--steps``: once with temporal consistency (video/run.py: frame
0 the full schedule, later frames ``--later-steps x --steps`` at the output size, held to the previous output)
and once frame by frame on its own (every frame the full schedule). Each row gives the warping error
(video/measure.py: consecutive output frames over the pixels where the content's flow is reliable), beside
the content clip's own (the floor), and the seconds per frame, the first and the later ones apart.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_video_bench(
    *,
    frames: int,
    size: tuple[int, int],
    steps: int,
    later_steps: Optional[float] = None,
    temporal_weight: Optional[float] = None,
    photo: Optional[Path] = None,
    style: Optional[Path] = None,
    device: str = "cpu",
) -> dict:
    """Stylise the synthetic clip both ways; ``{"meta": ..., "rows": [...]}`` (JSON-able)."""
    from engine import Config
    from engine.errors import UserError
    from engine.images import load_image
    from engine.runtime import resolve_device
    from video import LATER_STEPS, TEMPORAL_WEIGHT
    from video.measure import warping_error, warping_errors
    from video.run import FrameStore, VideoSettings, stylize_frames
    from video.synthetic import make_clip

    from .suite import describe_machine

    if frames < 2:
        raise UserError(f"--frames must be 2 or more (the measure compares consecutive frames), not {frames}")
    h, w = size
    image = load_image(photo or ROOT / "examples/tubingen.jpg", "photo")
    clip = make_clip(image, 1 - image.flip(-1), frames, (h, w))  # an inverted square: like nothing behind it
    painting = load_image(style or ROOT / "examples/starry_night.jpg", "style image")
    config = Config(device=device, size=max(h, w), min_size=max(2, max(h, w) // 2), steps=steps)
    contents = list(clip.frames)
    later = LATER_STEPS if later_steps is None else later_steps
    weight = TEMPORAL_WEIGHT if temporal_weight is None else temporal_weight
    rows = [{"name": "content (the floor)", "warping_error": warping_error(contents, contents)}]
    runs = (
        ("temporal", VideoSettings(temporal_weight=weight, later_steps=later)),
        ("independent", VideoSettings(independent=True)),
    )
    for name, settings in runs:
        done = []
        with tempfile.TemporaryDirectory(prefix="nst-bench-video-") as folder:
            store = FrameStore(Path(folder), [f"{k:04d}.png" for k in range(frames)])
            started = time.perf_counter()
            stylize_frames(contents, [painting], config, settings, store, (h, w), on_frame=done.append)
            wall = time.perf_counter() - started
            outputs = [store.load(k) for k in range(frames)]
        errors = warping_errors(outputs, contents)
        rest = done[1:]
        rows.append(
            {
                "name": name,
                "warping_error": sum(errors) / len(errors),
                "warping_errors": errors,
                "steps_first": done[0].steps,
                "steps_later": rest[0].steps,
                "s_first": done[0].seconds,
                "s_later_mean": sum(d.seconds for d in rest) / len(rest),
                "s_later_max": max(d.seconds for d in rest),
                "s_total": wall,
                "style_loss_first": done[0].parts.get("style"),
                "style_loss_later_mean": sum(d.parts.get("style", 0.0) for d in rest) / len(rest),
            }
        )
    temporal, independent = rows[1], rows[2]
    meta = {
        **describe_machine(resolve_device(device)),
        "clip": {"frames": frames, "height": h, "width": w, "pan": [2, 1], "occluder": 3},
        "steps": steps,
        "later_steps": later,
        "temporal_weight": weight,
        "temporal_over_independent": temporal["warping_error"] / max(independent["warping_error"], 1e-12),
    }
    return {"meta": meta, "rows": rows}


def table(results: dict) -> list[str]:
    meta = results["meta"]
    clip = meta["clip"]
    lines = [
        f"video bench: synthetic clip {clip['frames']} frames {clip['height']}x{clip['width']}, "
        f"--steps {meta['steps']}, "
        f"later frames {meta['later_steps']:g} x steps, temporal weight {meta['temporal_weight']:g}, "
        f"{meta['device']}, {meta['threads']} thread(s)",
        f"{'':<22}{'warping error':>14}{'steps first/later':>19}{'s first':>9}{'s later':>9}",
    ]
    for row in results["rows"]:
        if "s_first" not in row:
            lines.append(f"{row['name']:<22}{row['warping_error']:>14.6f}")
            continue
        steps = f"{row['steps_first']}/{row['steps_later']}"
        lines.append(
            f"{row['name']:<22}{row['warping_error']:>14.6f}{steps:>19}{row['s_first']:>9.2f}{row['s_later_mean']:>9.2f}"
        )
    lines.append(f"temporal / independent warping error: {meta['temporal_over_independent']:.4f}")
    return lines


def write_json(results: dict, path: Path, overwrite: bool = False) -> Path:
    from engine.files import write_atomically

    text = (json.dumps(results, indent=1) + "\n").encode()
    return write_atomically(path, lambda fh: fh.write(text), overwrite, what="--json file")


def run(args) -> int:
    """``nst bench video``."""
    from engine.errors import UserError
    from engine.files import check_writable

    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size must be HxW in pixels, e.g. 64x96, not {args.size!r}") from None
    if args.json:  # refused now, not after minutes of stylising
        check_writable(args.json, args.overwrite, what="--json file")
    torch.manual_seed(0)
    results = run_video_bench(
        frames=args.frames,
        size=(h, w),
        steps=args.steps,
        later_steps=args.later_steps,
        temporal_weight=args.temporal_weight,
        device=args.device,
    )
    for line in table(results):
        print(line)
    if args.json:
        print(f"wrote {write_json(results, args.json, args.overwrite)}")
    return 0
