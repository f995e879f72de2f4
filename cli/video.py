"""``nst stylize VIDEO STYLE... -o OUT.mp4`` (and ``--frames-dir``): the command line of video mode.

A content file with a video extension switches ``nst stylize`` to video mode; a folder of frames is
one video only with ``--frames-dir`` (a plain folder still means independent images).

Nothing the user had is lost, and nothing is left half-written: every input is checked (decoded once)
before any work; frames go, atomically, into a work folder beside the output (``OUT.mp4.frames/``, with a
manifest of what they were made from); the video is encoded at the end to a hidden file renamed into
place, and only then is the work folder removed. Stopped (SIGINT, SIGTERM, a crash), the same command
again goes on at the next unfinished frame and ends with the same video as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from engine.errors import UserError, plural

MANIFEST = ".nst-video.json"


def add_options(parser: argparse.ArgumentParser) -> None:
    """The video options of ``nst stylize`` (they apply when CONTENT is a video, or with --frames-dir)."""
    from video import LATER_STEPS, TEMPORAL_WEIGHT

    group = parser.add_argument_group("video (CONTENT is a video file, or a folder of frames with --frames-dir)")
    group.add_argument(
        "--frames", metavar="A:B", help="take frames A to B-1 of the video (counted from 0; A or B may be left out)"
    )
    group.add_argument(
        "--frames-dir",
        action="store_true",
        help="CONTENT is a folder of one video's frames (in name order) and OUTPUT a folder for the stylised frames",
    )
    group.add_argument(
        "--temporal-weight",
        type=float,
        default=TEMPORAL_WEIGHT,
        help=f"weight of the term that holds each frame to the previous output where the flow is reliable "
        f"(default: {TEMPORAL_WEIGHT:g}; 0: start from it but do not hold to it)",
    )
    group.add_argument(
        "--later-steps",
        type=float,
        default=LATER_STEPS,
        metavar="F",
        help=f"frames after the first run F x --steps steps at the output size only (default: {LATER_STEPS:g}); "
        "the first frame runs the full coarse-to-fine schedule",
    )
    group.add_argument(
        "--long-term", action="store_true", help="also hold each frame to the outputs of frames t-2 and t-4"
    )
    group.add_argument(
        "--keep-frames",
        action="store_true",
        help="keep the stylised frames (PNG) in OUTPUT.frames/ after the video is written (with --ray, also "
        "each chunk's own frames, before joining, in OUTPUT.frames/chunk_NNNN/)",
    )
    group.add_argument(
        "--chunk",
        type=int,
        metavar="N",
        help="with --ray: cut the video into chunks of N frames, each a Ray task, joined by cross-fading the frames "
        "neighbouring chunks share (default: 24)",
    )
    group.add_argument(
        "--overlap",
        type=int,
        metavar="K",
        help="with --ray: frames neighbouring chunks share, cross-faded from the earlier chunk's to the later's "
        "(default: 3)",
    )
    group.add_argument(
        "--independent-frames",
        action="store_true",
        help="stylise every frame on its own, with the full schedule (the flickering baseline)",
    )


def wants_video(args: argparse.Namespace) -> bool:
    from video.io import is_video

    if getattr(args, "frames_dir", False):
        return True
    if is_video(args.content):
        return True
    if getattr(args, "frames", None):
        raise UserError(f"--frames takes a range of a video's frames, but {args.content!r} is not a video file")
    return False


def run_video(args: argparse.Namespace) -> int:
    """``nst stylize`` in video mode."""
    from engine.images import load_image
    from engine.sizes import check_size
    from video import io
    from video.run import FrameStore, VideoSettings, frame_size

    from .options import config_from_args

    config = config_from_args(args)
    for name, given in (
        ("--resume", args.resume),
        ("--checkpoint-every", args.checkpoint_every),
        ("--snapshot-every", args.snapshot_every),
        ("--log", args.log),
        ("--animate", args.animate),
        ("--output-format", args.output_format),
    ):
        if given:
            raise UserError(f"{name} works with images, not with a video (a video resumes by itself: run it again)")
    if args.bit_depth != 8:
        raise UserError("--bit-depth 16 works with images; video frames are 8-bit")
    if config.preserve_colors == "luminance":
        raise UserError("--preserve-colors luminance is not supported for video yet; use histogram or none")
    on_ray = getattr(args, "ray", None) is not None
    chunking = None
    if on_ray:
        from scale.video import Chunking

        if args.frames_dir:
            raise UserError("--ray takes a video file, not --frames-dir; encode the frames as a video first")
        defaults = Chunking()
        chunking = Chunking(
            chunk=defaults.chunk if args.chunk is None else args.chunk,
            overlap=defaults.overlap if args.overlap is None else args.overlap,
        )
    elif args.chunk is not None or args.overlap is not None:
        raise UserError("--chunk and --overlap cut a video into Ray tasks; add --ray, or drop them")
    settings = VideoSettings(
        temporal_weight=args.temporal_weight,
        later_steps=args.later_steps,
        long_term=args.long_term,
        independent=args.independent_frames,
    )
    output = Path(args.output)
    styles = [load_image(s, "style image") for s in args.styles]
    source = Path(args.content)
    if args.frames_dir:
        if args.frames:
            raise UserError("--frames takes a range of a video file; with --frames-dir, give a folder of those frames")
        paths, (height, width) = _frames_folder(source)
        if output.resolve() == source.resolve():
            raise UserError(f"output folder {args.output!r} is the content folder; choose another")
        if output.exists() and not output.is_dir():
            raise UserError(f"output {args.output!r} must be a folder with --frames-dir")
        size = frame_size(height, width, config, even=False)
        store = FrameStore(output, [p.stem + ".png" for p in paths])
        frames = lambda: (load_image(p, "content frame") for p in paths)  # noqa: E731
        identity = {"frames": [_sha(p) for p in paths]}
        info = None
    else:
        span = io.Span.parse(args.frames)
        io.check_output(output, args.overwrite)
        if output.resolve() == source.resolve():
            raise UserError(f"output {args.output!r} is also the content video; choose another output name")
        info = io.probe(source, span)
        size = frame_size(info.height, info.width, config, even=True)
        store = FrameStore(
            output.with_name(output.name + ".frames"), [f"frame_{k:06d}.png" for k in range(info.frames)]
        )
        frames = lambda: io.read_frames(source, span)  # noqa: E731
        identity = {"video": _sha(source), "frames": [span.start, span.stop]}
    check_size(config, *size, "the output frames")
    manifest = _manifest(identity, args.styles, config, settings, size)
    if chunking is not None:  # chunked frames differ from a single run's (and from other chunkings')
        manifest["ray"] = {"chunk": chunking.chunk, "overlap": chunking.overlap}
    start = _open_store(store, manifest, args.overwrite, frames_dir=args.frames_dir)
    total = len(store.names)
    if start:
        print(
            f"nst: going on at frame {start + 1}/{total}: the frames before it are in {store.folder}", file=sys.stderr
        )
    from engine.control import Control, Stopped

    from .signals import StopOnSignal

    started = time.perf_counter()
    control = Control()
    stop = StopOnSignal(control.cancel)

    def on_frame(done):
        if not args.quiet:
            note = "" if done.reliable is None else f", flow reliable on {100 * done.reliable:.0f}%"
            print(
                f"frame {done.index + 1}/{done.frames}: {done.steps} steps in {done.seconds:.1f} s{note}",
                file=sys.stderr,
            )

    from video.run import stylize_frames

    try:
        if chunking is not None and start < total:
            from scale.video import run_video_chunks

            # Outside StopOnSignal: Ctrl-C stops the driver at once; the chunks done stay in the work folder.
            run_video_chunks(
                frames=frames,
                styles=styles,
                config=config,
                settings=settings,
                store=store,
                size=size,
                chunking=chunking,
                address=args.ray or None,
                quiet=args.quiet,
                keep_chunks=args.keep_frames,
            )
        elif start < total:
            with stop:
                stylize_frames(frames(), styles, config, settings, store, size, control=control, on_frame=on_frame)
    except Stopped:
        done = store.first_missing()
        print(
            f"nst: stopped by {stop.name}; {done} of {plural(total, 'frame')} are done, in {store.folder}; "
            "run the same command again to go on",
            file=sys.stderr,
        )
        return 128 + stop.signum
    if info is None:
        print(f"wrote {plural(total - start, 'frame')} to {output} in {time.perf_counter() - started:.1f} s")
        return 0
    io.encode(
        (_uint8(store.load(k)) for k in range(total)),
        output,
        info.fps,
        args.overwrite,
        audio_from=str(source) if info.audio else None,
        span=span,
    )
    if not args.keep_frames:
        _remove_store(store)
    audio = ", audio copied" if info.audio else ""
    print(
        f"wrote {output} ({size[1]}x{size[0]}, {plural(total, 'frame')} at {float(info.fps):g} fps{audio}) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return 0


def _frames_folder(folder: Path):
    from engine.images import FORMATS, load_image

    if not folder.is_dir():
        raise UserError(f"with --frames-dir, CONTENT must be a folder of frames, not {str(folder)!r}")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
    if not paths:
        raise UserError(f"content folder {str(folder)!r} has no frames ({', '.join(FORMATS)})")
    if len({p.stem for p in paths}) < len(paths):
        raise UserError(f"content folder {str(folder)!r} has frames that differ only in extension")
    size = None
    for p in paths:
        h, w = load_image(p, "content frame").shape[-2:]
        if size is None:
            size = (h, w)
        elif (h, w) != size:
            raise UserError(
                f"content frame {str(p)!r} is {w}x{h} but the first frame is {size[1]}x{size[0]}; "
                "every frame of a video must have one size"
            )
    return paths, size


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(identity: dict, styles, config, settings, size) -> dict:
    import dataclasses

    from engine.checkpoint import config_state

    return {
        "content": identity,
        "styles": [_sha(Path(s)) for s in styles],
        "config": config_state(config),
        "video": dataclasses.asdict(settings),
        "size": list(size),
    }


def _open_store(store, manifest: dict, overwrite: bool, frames_dir: bool) -> int:
    """Make the work folder (or check the one there is of this run); the first frame still to do."""
    from engine.files import write_atomically

    folder, path = store.folder, store.folder / MANIFEST
    if folder.exists():
        try:
            theirs = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            theirs = {}
        if isinstance(theirs, dict) and isinstance(theirs.get("config"), dict):
            from engine.checkpoint import ADDED_SINCE

            # A folder from before a setting existed was made with what is now its default.
            theirs["config"] = {**ADDED_SINCE, **theirs["config"]}
        if theirs != manifest and any(folder.iterdir()):
            if not overwrite:
                what = (
                    "holds frames of another run (other inputs or settings)" if theirs is not None else "is not empty"
                )
                raise UserError(
                    f"{'output' if frames_dir else 'work'} folder {str(folder)!r} {what}; "
                    "pass --overwrite to start afresh, or choose another output"
                )
            # --overwrite: this run's frame names and manifest only; nothing else in the folder is touched.
            for p in [store.path(k) for k in range(len(store.names))] + [path]:
                p.unlink(missing_ok=True)
            _remove_chunks(folder)
    folder.mkdir(exist_ok=True)
    if not path.is_file():
        write_atomically(path, lambda fh: fh.write(json.dumps(manifest, indent=1).encode()), overwrite=True)
    return store.first_missing()


def _remove_chunks(folder: Path) -> None:
    """The chunk folders a run with --ray leaves while it works (scale/video.py), if there are any."""
    if any(folder.glob("chunk_*")):
        from scale.video import remove_chunk_folders

        remove_chunk_folders(folder)


def _remove_store(store) -> None:
    for k in range(len(store.names)):
        store.path(k).unlink(missing_ok=True)
    _remove_chunks(store.folder)
    (store.folder / MANIFEST).unlink(missing_ok=True)
    try:
        store.folder.rmdir()
    except OSError:
        pass  # something else was put there: left as it is


def _uint8(image):
    import numpy as np

    return np.rint(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
