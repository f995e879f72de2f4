"""Video jobs in the service: ``POST /videos`` (a video file and style images), progress per frame, a preview
of the frame being made, the stylised video when done (``serve/app.py`` adds the routes).

A video job runs the frame loop of ``video/run.py`` (temporal consistency, as ``nst stylize VIDEO``) on the
service's own engine core, one frame at a time between the engine's image batches (the engine's device
lock): the service's "one run at a time" holds, and so does its memory budget, since a video job reserves
what one of its frames needs (``engine.job_memory`` at the output size) for its whole life, as an image job
does. Video jobs run one after another on one thread of their own; at most ``max_queued`` wait.

What this first version does not do (docs/service.md): video jobs live in memory and in ``STATE/videos/``, not
in the job table, so a restart forgets them (their folders are removed at the next start) instead of going on
at the next frame; they have no event stream (poll ``GET /videos/ID``).
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
    control: Control = dataclasses.field(default_factory=Control)
    state: str = "queued"
    done: int = 0  # frames finished
    error: Optional[str] = None
    seconds: list = dataclasses.field(default_factory=list)  # per finished frame
    reliable: Optional[float] = None  # the last frame's share of pixels the temporal term held
    preview: Optional[torch.Tensor] = None  # the frame being made (or the last one finished)

    def as_json(self) -> dict:
        first = self.seconds[0] if self.seconds else None
        later = self.seconds[1:]
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
            "reliable": self.reliable,
            "error": self.error,
            "created": self.created,
        }


class VideoJobs:
    def __init__(self, service):
        self.service = service
        self.root = service.store.root / "videos"
        if self.root.is_dir():  # a restart forgets video jobs (see the module's docstring): their files go too
            for path in self.root.iterdir():
                if path.is_dir() and ID_PATTERN.match(path.name):
                    shutil.rmtree(path, ignore_errors=True)
        self.root.mkdir(exist_ok=True)
        self.jobs: dict[str, VideoJob] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="video")

    def submit(self, data: bytes, filename: str, styles: list, config: Config) -> VideoJob:
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
            )
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
        """The running job stops after its current step; queued ones are cancelled (none is kept)."""
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            if job.state not in FINISHED:
                job.control.cancel("the server stopped")
        self._pool.shutdown(wait=True, cancel_futures=True)

    # Running ---------------------------------------------------------------------------------------------

    def _run(self, job: VideoJob) -> None:
        from video import io
        from video.run import FrameStore, VideoSettings, stylize_frames

        with self._lock:  # a job cancelled while queued never starts
            if job.state in FINISHED:
                return
            job.state = "running"
        store = FrameStore(job.folder / "frames", [f"frame_{k:06d}.png" for k in range(job.frames)])
        store.folder.mkdir(exist_ok=True)

        def on_step(info) -> None:
            if info.image is not None:
                job.preview = info.image[0].detach().float().cpu().clone()

        def on_frame(done) -> None:
            job.done = done.index + 1
            job.seconds.append(done.seconds)
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
            self._end(job, "cancelled")
        except UserError as exc:
            self._end(job, "failed", str(exc))
        except Exception as exc:  # a bug: the job fails in one sentence, the server goes on
            self._end(job, "failed", f"the server failed on this video ({type(exc).__name__})")
        finally:
            shutil.rmtree(store.folder, ignore_errors=True)

    def _end(self, job: VideoJob, state: str, error: Optional[str] = None) -> None:
        with self._lock:
            if job.state in FINISHED:
                return
            job.state, job.error = state, error
            job.styles = []  # not needed any more
        with self.service._lock:
            self.service._reserved.pop(job.id, None)


class _Turns:
    """The engine's core for ``stylize_frames``, each frame's run taking the engine's device in turn with the
    image batches (the lock ``Engine.stylize_batch`` takes), so that one run is on the device at a time."""

    def __init__(self, engine):
        self._engine = engine
        self.min_side = engine.core.min_side

    def runtime_for(self, config: Config):
        return self._engine.core.runtime_for(config)

    def run(self, batch):
        with self._engine._device:
            return self._engine.core.run(batch)


def _uint8(image: torch.Tensor):
    import numpy as np

    return np.rint(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
