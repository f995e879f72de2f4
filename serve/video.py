"""Video jobs in the service: ``POST /videos`` (a video file and style images), progress per frame, a preview
of the frame being made, the stylised video when done (``serve/app.py`` adds the routes).

A video job runs the frame loop of ``video/run.py`` (temporal consistency, as ``nst stylize VIDEO``) on the
service's own engine core, one frame at a time between the engine's image batches (the engine's device
lock): the service's "one run at a time" holds, and so does its memory budget, since a video job reserves
what one of its frames needs (``engine.job_memory`` at the output size) for its whole life, as an image job
does. Video jobs run one after another on one thread of their own; at most ``max_queued`` wait.

Long jobs stay safe: each job's folder, ``STATE/videos/ID/``, holds the upload, its styles as the job uses them
(exact float32), ``job.json`` (its options and state, written atomically) and the finished frames (PNG). A server
that stops (SIGTERM) ends the running job after its current step, and the next start queues every unfinished job
again, which goes on at its next unfinished frame and ends with the frames an uninterrupted run makes (the frame
loop reads earlier frames back from their files: video/run.py). Video jobs are not in the image jobs' table and
have no event stream (poll ``GET /videos/ID``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Optional

import torch

from engine import QueueFull, UserError
from engine.config import Config
from engine.control import Control, Interrupted, Stopped
from engine.errors import pixels
from engine.optimize import Callback

from .store import ID_PATTERN, new_id

FINISHED = ("done", "failed", "cancelled")
PREVIEW_SECONDS = 1.0  # how often the frame being made is read back for the preview


@dataclasses.dataclass
class VideoJob:
    id: str
    folder: Path
    source: Path
    config: Config
    styles: list
    size: tuple[int, int]
    frames: int
    fps: object
    audio: bool
    created: float
    options: dict = dataclasses.field(default_factory=dict)
    cancelled_by_client: bool = False
    control: Control = dataclasses.field(default_factory=Control)
    state: str = "queued"
    done: int = 0  # frames finished
    error: Optional[str] = None
    seconds: dict = dataclasses.field(default_factory=dict)  # frame index -> seconds, for the frames run here
    reliable: Optional[float] = None  # the last frame's share of pixels the temporal term held
    preview: Optional[torch.Tensor] = None  # the frame being made (or the last one finished)

    def as_json(self) -> dict:
        first = self.seconds.get(0)
        later = [v for k, v in self.seconds.items() if k > 0]
        return {
            "id": self.id,
            "kind": "video",
            "state": self.state,
            "frames": self.frames,
            "frames_done": self.done,
            "width": self.size[1],
            "height": self.size[0],
            "seconds_first_frame": first,
            "seconds_per_later_frame": sum(later) / len(later) if later else None,
            "frames_run": len(self.seconds),  # by this run of the server (a restart goes on at the next frame)
            "reliable": self.reliable,
            "error": self.error,
            "created": self.created,
        }


class VideoJobs:
    def __init__(self, service):
        self.service = service
        self.root = service.store.root / "videos"
        self.root.mkdir(exist_ok=True)
        self.jobs: dict[str, VideoJob] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="video")
        self._stopping = False

    def start(self) -> None:
        """The jobs an earlier run of the server left: finished ones answer again, unfinished ones are queued
        (oldest first) and go on at their next unfinished frame; a folder without its ``job.json`` (a request
        that never finished) is removed, one whose job cannot be read fails alone."""
        found = []
        for path in sorted(self.root.iterdir()):
            if not (path.is_dir() and ID_PATTERN.match(path.name)):
                continue
            if not (path / "job.json").is_file():
                shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                found.append(self._load(path))
            except Exception as exc:  # a damaged folder must not stop the server
                _log(f"video job {path.name} cannot be read back ({type(exc).__name__}: {exc}); left alone")
        for job in sorted(found, key=lambda j: j.created):
            with self._lock:
                self.jobs[job.id] = job
            if job.state not in FINISHED:
                job.state = "queued"
                with self.service._lock:  # held back, never refused: it was accepted before
                    self.service._reserve(job.id, self._memory(job), force=True)
                self._pool.submit(self._run, job)
                _log(f"video job {job.id} queued again")

    def _load(self, folder: Path) -> VideoJob:
        from video import io

        from .store import Store
        from .uploads import job_config

        saved = json.loads((folder / "job.json").read_text())
        config = job_config(self.service.base, saved["options"])
        source = folder / saved["source"]
        info = io.probe(source) if saved["state"] not in FINISHED else None
        job = VideoJob(
            id=folder.name,
            folder=folder,
            source=source,
            config=config,
            styles=[Store.load_image(folder, f"style-{i}") for i in range(saved["styles"])] if info else [],
            size=tuple(saved["size"]),
            frames=saved["frames"],
            fps=Fraction(saved["fps"]),
            audio=saved["audio"],
            created=saved["created"],
            options=saved["options"],
        )
        job.state, job.error = saved["state"], saved.get("error")
        job.done = job.frames if job.state == "done" else 0
        return job

    def _memory(self, job: VideoJob):
        return self.service._memory(job.config, torch.zeros(3, *job.size), job.styles)

    def submit(self, data: bytes, filename: str, styles: list, config: Config, options: dict) -> VideoJob:
        """Check and queue a video job; ``UserError`` (nothing kept) when the video or its size is refused."""
        from engine.sizes import check_size
        from video import io
        from video.run import frame_size

        service = self.service
        if service.stopping:
            from .service import ServiceStopping

            raise ServiceStopping("the server is shutting down; try again when it is back")
        with self._lock:
            waiting = sum(1 for j in self.jobs.values() if j.state == "queued")
        if waiting >= service.limits.max_queued:
            raise QueueFull(f"the video queue is full ({waiting} jobs waiting); try again later")
        job_id = new_id()
        folder = self.root / job_id
        folder.mkdir()
        try:
            suffix = Path(filename or "").suffix.lower()
            source = folder / ("input" + (suffix if suffix in io.VIDEO_EXTENSIONS else ".mp4"))
            source.write_bytes(data)
            try:
                info = io.probe(source)
            except UserError as exc:  # in the client's terms: the name of its upload, not the server's file
                name = Path(filename or "the upload").name[:60]
                message = str(exc).replace(str(source), name)
                if "/" in message:  # FFmpeg's reason quoted the server's path (cut short): the reason goes too
                    message = message.split(" (", 1)[0]
                raise UserError(message) from None
            size = frame_size(info.height, info.width, config, even=True)
            if size[0] * size[1] > service.limits.max_pixels:
                raise UserError(
                    f"size {config.size} makes the frames {size[1]}x{size[0]} = {pixels(size[0] * size[1])}, above "
                    f"this server's {pixels(service.limits.max_pixels)} limit; ask for a smaller size"
                )
            check_size(config, *size, "the output frames")
            # What one frame needs: a video job holds that for its whole life (its frames run one at a time).
            memory = service._memory(config, torch.zeros(3, *size), styles)
            service._check_memory(memory)
            job = VideoJob(
                id=job_id,
                folder=folder,
                source=source,
                config=config,
                styles=styles,
                size=size,
                frames=info.frames,
                fps=info.fps,
                audio=info.audio,
                created=time.time(),
                options=options,
            )
            from .store import Store

            for index, style in enumerate(styles):
                Store.save_image(folder, f"style-{index}", style)
            self._save(job)  # last: a folder with its job.json is a job
            with service._lock:
                service._reserve(job_id, memory)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self._lock:
            self.jobs[job_id] = job
        self._pool.submit(self._run, job)
        return job

    def get(self, job_id: str) -> Optional[VideoJob]:
        with self._lock:
            return self.jobs.get(job_id)

    def cancel(self, job_id: str, wait: float = 5.0) -> Optional[VideoJob]:
        job = self.get(job_id)
        if job is None or job.state in FINISHED:
            return job
        job.cancelled_by_client = True
        job.control.cancel("the video job was cancelled")
        if job.state == "queued":
            self._end(job, "cancelled")
        deadline = time.monotonic() + wait
        while job.state not in FINISHED and time.monotonic() < deadline:
            time.sleep(0.05)
        return job

    def result_path(self, job: VideoJob) -> Path:
        return job.folder / "result.mp4"

    def close(self) -> None:
        """The running job stops after its current step; it and the queued ones stay queued on disk, for the
        next start."""
        self._stopping = True
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            if job.state not in FINISHED:
                job.control.cancel("the server stopped")
        self._pool.shutdown(wait=True, cancel_futures=True)
        n = sum(1 for job in jobs if job.state not in FINISHED)
        if n:
            _log(f"{n} unfinished video job{'' if n == 1 else 's'} kept for the next start")

    def _save(self, job: VideoJob) -> None:
        from engine.files import write_atomically

        saved = {
            "source": job.source.name,
            "options": job.options,
            "styles": len(job.styles),
            "size": list(job.size),
            "frames": job.frames,
            "fps": str(job.fps),
            "audio": job.audio,
            "created": job.created,
            "state": job.state if job.state in FINISHED else "queued",
            "error": job.error,
        }
        write_atomically(job.folder / "job.json", lambda fh: fh.write(json.dumps(saved).encode()), overwrite=True)

    # Running ---------------------------------------------------------------------------------------------

    def _run(self, job: VideoJob) -> None:
        from video import io
        from video.run import FrameStore, VideoSettings, stylize_frames

        with self._lock:  # a job cancelled while queued never starts, nor one queued when the server stops
            if job.state in FINISHED or self._stopping:
                return
            job.state = "running"
        store = FrameStore(job.folder / "frames", [f"frame_{k:06d}.png" for k in range(job.frames)])
        store.folder.mkdir(exist_ok=True)
        job.done = store.first_missing()  # frames made before the server last stopped

        def on_step(info) -> None:
            if info.image is not None:
                job.preview = info.image[0].detach().float().cpu().clone()

        def on_frame(done) -> None:
            job.done = done.index + 1
            job.seconds[done.index] = done.seconds
            job.reliable = done.reliable

        try:
            stylize_frames(
                io.read_frames(job.source),
                job.styles,
                job.config,
                VideoSettings(),
                store,
                job.size,
                core=_Turns(self.service.engine),
                callback=Callback(on_step, seconds=PREVIEW_SECONDS),
                control=job.control,
                on_frame=on_frame,
            )
            io.encode(
                (_uint8(store.load(k)) for k in range(job.frames)),
                self.result_path(job),
                job.fps,
                overwrite=False,
                audio_from=str(job.source) if job.audio else None,
            )
            job.preview = store.load(job.frames - 1)
            self._end(job, "done")
        except (Stopped, Interrupted):
            if self._stopping and not job.cancelled_by_client:
                job.state = "queued"  # the server stops: its frames stay, and the next start goes on from them
                with self.service._lock:
                    self.service._reserved.pop(job.id, None)
                return
            self._end(job, "cancelled")
        except UserError as exc:
            self._end(job, "failed", str(exc))
        except Exception as exc:  # a bug: the job fails in one sentence, the server goes on
            self._end(job, "failed", f"the server failed on this video ({type(exc).__name__})")
        if job.state in FINISHED:
            shutil.rmtree(store.folder, ignore_errors=True)

    def _end(self, job: VideoJob, state: str, error: Optional[str] = None) -> None:
        with self._lock:
            if job.state in FINISHED:
                return
            job.state, job.error = state, error
            job.styles = []  # not needed any more
        with self.service._lock:
            self.service._reserved.pop(job.id, None)
        try:
            self._save(job)
        except (OSError, UserError) as exc:  # a full disk: the answer stands in memory; a restart runs it again
            _log(f"video job {job.id}: its state could not be written ({exc})")


class _Turns:
    """The engine's core for ``stylize_frames``, each frame's run taking the engine's device in turn with the
    image batches (``Engine.run``), so that one run is on the device at a time."""

    def __init__(self, engine):
        self._engine = engine
        self.min_side = engine.core.min_side

    def runtime_for(self, config: Config):
        return self._engine.core.runtime_for(config)

    def run(self, batch):
        return self._engine.run(batch)


def _uint8(image: torch.Tensor):
    import numpy as np

    return np.rint(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _log(message: str) -> None:
    print(f"nst serve: {message}", file=sys.stderr, flush=True)
