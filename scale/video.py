"""Videos on Ray: one long video in overlapping chunks, or several videos at once, each chunk one Ray task.

A video's frames ``0..T-1`` are cut into chunks of ``chunk`` frames, each starting ``chunk - overlap``
frames after the one before (the last one ends at ``T``), so neighbouring chunks share ``overlap`` frames.
Each chunk is stylised on its own by ``video.run.stylize_frames``, exactly as a whole video is: its first
frame runs the full coarse-to-fine schedule, the others start from the previous output warped by the flow
and are held to it by the temporal term. The joined video takes each frame from the one chunk that has
it, and in an overlap fades linearly from the earlier chunk's frame to the later chunk's: the ``m``-th of
``n`` shared frames (from 0) is ``(1 - a) earlier + a later`` with ``a = (m + 1) / (n + 1)``.

The seam: the later chunk's first frame is stylised from scratch, not warped from the earlier chunk's
result, so the two chunks' frames of the same moment differ (another local minimum of the same loss), and
nothing holds one to the other. The cross-fade spreads that difference over ``overlap + 1`` consecutive
frame pairs instead of one hard cut; ``seam_errors`` measures it (docs/video.md, "On Ray").

Why a module of its own, beside scale/ray.py: a video chunk is a different job (a list of frames and a
``VideoSettings``, one sequential loop per task) from ray.py's batches of still images grouped by schedule,
and it needs no actor: a plain task that Ray retries when its worker dies (``max_retries``) is enough,
since a chunk reads nothing but what it is sent. The ``Core`` (weights, extractor) is kept per worker
process across tasks (``_CORES``), as ray.py's actors keep theirs.

The driver decodes the frames (shrunk to the output size, as the single-process loop shrinks them) and
sends pixels, so workers need no shared file system. Each finished chunk's frames are written atomically
(8-bit PNG) into ``chunk_NNNN/`` in the work folder, so a run stopped and started again skips the chunks that
are complete; the joined frames are written last, then the chunk folders are removed.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from engine.config import Config
from engine.errors import UserError, plural
from engine.images import resize
from video.run import FrameStore, VideoSettings

RESTARTS = 2  # a chunk whose worker died is run again on another, up to this many times
CHUNK_PREFIX = "chunk_"


@dataclass(frozen=True)
class Chunking:
    """``chunk`` frames per Ray task, neighbours sharing ``overlap`` frames (cross-faded when ``fade``)."""

    chunk: int = 24
    overlap: int = 3
    fade: bool = True  # False: a hard cut in the middle of each overlap (the comparison the docs measure)

    def __post_init__(self):
        for name in ("chunk", "overlap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"--{name} must be a whole number of 1 or more, not {value!r}")
        if self.overlap >= self.chunk:
            raise UserError(
                f"--overlap must be less than --chunk (each chunk must bring new frames), not {self.overlap} "
                f"with --chunk {self.chunk}"
            )


def plan_chunks(total: int, chunking: Chunking) -> list[tuple[int, int]]:
    """``[(start, stop)]`` frame ranges covering ``0..total-1``; neighbours share exactly ``overlap`` frames.

    The last chunk ends at ``total`` (it may be shorter than ``chunk``, never shorter than ``overlap + 1``)."""
    if total < 1:
        raise UserError("a video needs at least one frame")
    plan, start = [], 0
    while True:
        stop = min(start + chunking.chunk, total)
        plan.append((start, stop))
        if stop == total:
            return plan
        start = stop - chunking.overlap


def blend_weight(k: int, plan: Sequence[tuple[int, int]], i: int, fade: bool = True) -> float:
    """The later chunk's share ``a`` of frame ``k`` in the overlap of chunks ``i`` and ``i + 1``."""
    start, stop = plan[i + 1][0], plan[i][1]
    n = stop - start
    if fade:
        return (k - start + 1) / (n + 1)
    return 1.0 if k - start >= n // 2 else 0.0  # hard cut: the later chunk from the middle of the overlap on


def join_frame(k: int, plan: Sequence[tuple[int, int]], chunk_frame, fade: bool = True) -> np.ndarray:
    """Joined frame ``k`` as ``(3, H, W)`` uint8; ``chunk_frame(i, k)`` is chunk ``i``'s frame ``k`` (uint8)."""
    owners = [i for i, (a, b) in enumerate(plan) if a <= k < b]
    if len(owners) == 1:
        return chunk_frame(owners[0], k)
    i, j = owners  # an overlap is shared by two chunks only (overlap < chunk)
    a = blend_weight(k, plan, i, fade)
    earlier, later = chunk_frame(i, k).astype(np.float64), chunk_frame(j, k).astype(np.float64)
    return np.rint((1 - a) * earlier + a * later).astype(np.uint8)


def seam_errors(errors: Sequence[float], plan: Sequence[tuple[int, int]]) -> dict:
    """Split per-pair warping errors (``errors[t-1]``: frames t-1 to t, video.measure) into the seams' and the
    rest: a pair is at a seam when frame t lies in an overlap or is the first frame after one."""
    seam = set()
    for i in range(len(plan) - 1):
        start, stop = plan[i + 1][0], plan[i][1]
        seam.update(range(start, stop + 1))  # pairs (start-1, start) .. (stop-1, stop): the fade's n + 1 steps
    at = [errors[t - 1] for t in range(1, len(errors) + 1) if t in seam]
    inside = [errors[t - 1] for t in range(1, len(errors) + 1) if t not in seam]

    def mean(values):
        return sum(values) / len(values) if values else None

    return {
        "seam_pairs": len(at),
        "seam_mean": mean(at),
        "seam_max": max(at) if at else None,
        "seam_sum": sum(at),
        "inside_pairs": len(inside),
        "inside_mean": mean(inside),
    }


# --------------------------------------------------------------------------------------------- the worker

_CORES: dict = {}  # per worker process: one Core per config, kept across the chunks it runs


def _stylize_chunk(frames: torch.Tensor, styles: list, config: Config, settings: VideoSettings, threads: int):
    """A Ray task: ``frames`` ``(T, 3, H, W)`` at the output size -> the stylised frames ``(T, 3, H, W)`` uint8."""
    from engine.core import Core
    from video.run import stylize_frames

    torch.set_num_threads(threads)
    key = repr(config)
    if key not in _CORES:
        _CORES.clear()  # one config at a time: a worker does not hoard the models of earlier runs
        _CORES[key] = Core.open(config, style_cache_bytes=64 << 20)  # as video.run opens its own
    size = tuple(frames.shape[-2:])
    # The loop reads earlier frames back from its store (8-bit PNGs), as a single-process run does.
    with tempfile.TemporaryDirectory(prefix="nst-chunk-") as folder:
        store = FrameStore(Path(folder), [f"{k:06d}.png" for k in range(len(frames))])
        stylize_frames(iter(frames), list(styles), config, settings, store, size, core=_CORES[key])
        return torch.stack([_uint8(store.load(k)) for k in range(len(frames))])


def _uint8(image: torch.Tensor) -> torch.Tensor:
    return image.mul(255).round_().clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------- the driver


@dataclass
class VideoJob:
    """One video: ``frames()`` yields its frames (``(3, H, W)`` in [0, 1], any size), ``store`` receives the
    joined frames (its folder is the work folder, where the chunk folders go), ``size`` is the output size."""

    frames: Callable[[], Iterable[torch.Tensor]]
    styles: list
    store: FrameStore
    size: tuple[int, int]


@dataclass(frozen=True)
class ChunkDone:
    video: int
    chunk: int
    chunks: int
    frames: tuple[int, int]


def chunk_store(store: FrameStore, i: int, span: tuple[int, int]) -> FrameStore:
    """Where chunk ``i`` (frames ``span``) keeps its frames: ``chunk_NNNN/`` in the work folder."""
    return FrameStore(store.folder / f"{CHUNK_PREFIX}{i:04d}", [store.names[k] for k in range(*span)])


def _complete(store: FrameStore) -> bool:
    return store.first_missing() == len(store.names)


def remove_chunk_folders(folder: Path) -> None:
    """The chunk folders of a work folder (only their PNGs; a folder with anything else in it stays)."""
    for sub in sorted(Path(folder).glob(f"{CHUNK_PREFIX}[0-9][0-9][0-9][0-9]")):
        if sub.is_dir():
            for p in sub.glob("*.png"):
                p.unlink()
            try:
                sub.rmdir()
            except OSError:
                pass


def stylize_videos_on_ray(
    videos: Sequence[VideoJob],
    config: Config,
    settings: VideoSettings,
    chunking: Chunking,
    address: Optional[str] = None,
    *,
    cpus_per_task: int = 1,
    on_chunk: Optional[Callable[[ChunkDone], None]] = None,
    keep_chunks: bool = False,
) -> None:
    """Stylise ``videos`` into their stores, every chunk of every video a Ray task (as many at once as the
    cluster has room for: ``cpus_per_task`` cores each). Chunks already complete in the work folders are
    not run again; ``keep_chunks`` keeps their folders after the join. ``address`` as in
    ``scale.ray.stylize_on_ray``."""
    from .ray import _ray, connect

    ray = _ray()
    if cpus_per_task < 1:
        raise UserError(f"cpus_per_task must be 1 or more, not {cpus_per_task}")
    started_here = connect(ray, address)
    plans = [plan_chunks(len(v.store.names), chunking) for v in videos]
    running: dict = {}  # object ref -> (video, chunk)
    try:
        task = ray.remote(num_cpus=cpus_per_task, max_retries=RESTARTS)(_stylize_chunk)
        # Chunks are decoded and sent as room frees up, not all at once: the driver and the object store hold
        # the frames of at most two chunks per task the cluster can run at once, however long the videos are.
        room = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_task)
        chunks = _chunks(videos, plans, ray)
        pending = next(chunks, None)
        while pending is not None or running:
            while pending is not None and len(running) < room:
                v, i, frames, styles = pending
                running[task.remote(frames, styles, config, settings, cpus_per_task)] = (v, i)
                pending = next(chunks, None)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            v, i = running.pop(ref)
            try:
                frames = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                detail = str(cause) if isinstance(cause, UserError) else str(exc).strip().splitlines()[-1][:200]
                raise UserError(f"chunk {i + 1} of video {v + 1} failed: {detail}") from None
            except ray.exceptions.RayError as exc:
                detail = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
                raise UserError(f"chunk {i + 1} of video {v + 1} failed on Ray ({detail})") from None
            span = plans[v][i]
            store = chunk_store(videos[v].store, i, span)
            store.folder.mkdir(parents=True, exist_ok=True)
            for m, frame in enumerate(frames):
                store.save(m, frame.float().div(255))
            if on_chunk is not None:
                on_chunk(ChunkDone(v, i, len(plans[v]), span))
    finally:
        for ref in running:  # a failure or Ctrl-C: the other chunks stop too (on a cluster that outlives us)
            ray.cancel(ref)
        if started_here:
            ray.shutdown()
    for video, plan in zip(videos, plans):
        join_video(video.store, plan, chunking.fade, keep_chunks=keep_chunks)


def _chunks(videos: Sequence[VideoJob], plans, ray):
    """``(video, chunk, frames, styles ref)`` for every chunk not complete yet, in order, decoding each video once
    and keeping only the frames of the chunks not sent yet."""
    for v, (video, plan) in enumerate(zip(videos, plans)):
        todo = {i: span for i, span in enumerate(plan) if not _complete(chunk_store(video.store, i, span))}
        if video.store.first_missing() == len(video.store.names) or not todo:
            continue
        styles = ray.put(list(video.styles))
        buffer: dict[int, torch.Tensor] = {}
        for k, raw in enumerate(video.frames()):
            if k < min(a for a, _ in todo.values()):
                continue
            # Shrunk here as video.run shrinks it (resize is the identity at the size it already has).
            buffer[k] = resize(raw, video.size)
            for i, (a, b) in list(todo.items()):
                if b == k + 1:
                    del todo[i]
                    yield v, i, torch.stack([buffer[j] for j in range(a, b)]), styles
            if not todo:
                break
            first = min(a for a, _ in todo.values())
            for j in [j for j in buffer if j < first]:
                del buffer[j]


def join_video(
    store: FrameStore,
    plan: Sequence[tuple[int, int]],
    fade: bool = True,
    keep_chunks: bool = False,
    into: Optional[FrameStore] = None,
) -> None:
    """Write the joined frames from ``store``'s chunk folders into ``into`` (default: ``store``), then remove
    the chunk folders unless ``keep_chunks``."""
    stores = [chunk_store(store, i, span) for i, span in enumerate(plan)]
    into = into or store

    def chunk_frame(i: int, k: int) -> np.ndarray:
        return _uint8(stores[i].load(k - plan[i][0])).numpy()

    for k in range(len(into.names)):
        if not into.done(k):
            into.save(k, torch.from_numpy(join_frame(k, plan, chunk_frame, fade)).float().div(255))
    if not keep_chunks:
        remove_chunk_folders(store.folder)


# ---------------------------------------------------------------------------------------------- the CLI


def run_video_chunks(
    *,
    frames,
    styles,
    config: Config,
    settings: VideoSettings,
    store: FrameStore,
    size,
    chunking: Chunking,
    address,
    quiet: bool = False,
    keep_chunks: bool = False,
) -> None:
    """``nst stylize VIDEO ... --ray [ADDRESS] --chunk N --overlap K``: fill ``store`` (progress on stderr)."""
    import sys

    def on_chunk(done: ChunkDone) -> None:
        if quiet:
            return
        a, b = done.frames
        print(f"chunk {done.chunk + 1}/{done.chunks} (frames {a + 1}-{b}) done", file=sys.stderr)

    total = len(store.names)
    plan = plan_chunks(total, chunking)
    print(
        f"nst: {plural(total, 'frame')} in {plural(len(plan), 'chunk')} of up to {chunking.chunk} "
        f"({chunking.overlap} shared with the next), on Ray",
        file=sys.stderr,
    )
    job = VideoJob(frames=frames, styles=styles, store=store, size=tuple(size))
    stylize_videos_on_ray(
        [job], config, settings, chunking, address or None, on_chunk=on_chunk, keep_chunks=keep_chunks
    )


# ------------------------------------------------------------------------------------- measuring the seam


def measure_seams(
    clip_frames: torch.Tensor, styles: list, config: Config, settings: VideoSettings, chunking: Chunking, folder: Path
) -> dict:
    """Stylise ``clip_frames`` once in one process and once in chunks on Ray (the Ray connection is the
    caller's), join the chunks both ways (cross-fade, hard cut) and split each one's warping errors
    (video.measure) into the seams' pairs and the rest. Returns a JSON-able dict."""
    from video.measure import warping_errors

    total = len(clip_frames)
    size = tuple(clip_frames.shape[-2:])
    names = [f"frame_{k:06d}.png" for k in range(total)]
    plan = plan_chunks(total, chunking)
    stores = {name: FrameStore(Path(folder) / name, names) for name in ("single", "chunks", "fade", "cut")}
    for s in stores.values():
        s.folder.mkdir(parents=True, exist_ok=True)
    from video.run import stylize_frames

    stylize_frames(iter(clip_frames), list(styles), config, settings, stores["single"], size)
    job = VideoJob(frames=lambda: iter(clip_frames), styles=list(styles), store=stores["chunks"], size=size)
    stylize_videos_on_ray([job], config, settings, chunking, keep_chunks=True)
    join_video(stores["chunks"], plan, fade=True, keep_chunks=True, into=stores["fade"])
    join_video(stores["chunks"], plan, fade=False, keep_chunks=True, into=stores["cut"])
    contents = [resize(f, size) for f in clip_frames]
    report = {"frames": total, "size": list(size), "plan": [list(p) for p in plan]}
    rows = {"content (the floor)": contents}
    rows.update({name: [stores[name].load(k) for k in range(total)] for name in ("single", "fade", "cut")})
    for name, frames in rows.items():
        errors = warping_errors(frames, contents)
        report[name] = {"per_pair": [round(e, 7) for e in errors], **seam_errors(errors, plan)}
    return report


def main(argv=None) -> int:
    """``python -m scale.video``: the seam of a chunked run on the synthetic clip, as JSON (a local Ray cluster)."""
    import argparse
    import json

    from engine.images import load_image
    from video.synthetic import make_clip

    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(prog="python -m scale.video", description=main.__doc__)
    parser.add_argument("folder", help="where the frames go (a new or empty folder)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", default="64x96", help="HxW of the clip (default: 64x96)")
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cpus", type=int, default=2, help="the local Ray cluster's CPUs")
    args = parser.parse_args(argv)
    import ray

    h, w = (int(v) for v in args.size.split("x"))
    photo = load_image(root / "examples/tubingen.jpg")
    clip = make_clip(photo, 1 - photo.flip(-1), args.frames, (h, w))  # the tests' clip: an inverted square
    config = Config(device="cpu", size=max(h, w), steps=args.steps)
    style = load_image(root / "examples/starry_night.jpg")
    chunking = Chunking(chunk=args.chunk, overlap=args.overlap)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        report = measure_seams(clip.frames, [style], config, VideoSettings(), chunking, Path(args.folder))
    finally:
        ray.shutdown()
    report.update(chunk=args.chunk, overlap=args.overlap, steps=args.steps)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
