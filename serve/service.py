"""The service behind the HTTP routes: one ``engine.Engine``, the job table, and what each live job has said.

A job's life on disk (``store.Row.state``): queued -> running -> done | failed | cancelled. A job the service
stops (SIGTERM) goes back to "queued" with its checkpoint beside it, and so does a job that was running
when the process was killed: on the next start both are submitted again, the first from the checkpoint it
wrote on stopping, the second from its last periodic one (so a kill loses at most one checkpoint interval).
A checkpoint holds the whole optimisation state, so a resumed job ends with the image an uninterrupted
run makes.

One thread per submitted job follows the engine job's event stream, keeps the events for the
server-sent-event streams (any number of readers, each from the start), and records progress and the
outcome in the table.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from engine import Config, Control, Engine, UserError
from engine import checkpoint as ckpt
from engine.errors import pixels
from engine.images import fit_long_side, save_image

from .store import FINAL, Row, Store, new_id
from .uploads import UploadLimits, check_image, job_config

# How often a running job's progress and loss curve are written to the table (the events themselves go
# to readers as they come); the checkpoint, not this, is what a restart resumes from.
SAVE_SECONDS = 2.0
# A loss curve longer than this is thinned (every other point) before it grows further: the page draws a
# few hundred pixels, and a job of many thousand steps should not make its events unbounded.
MAX_CURVE = 4000
KEEP_FINISHED = 16


@dataclass(frozen=True)
class Limits:
    """What the operator allows (``nst serve`` options)."""

    upload: UploadLimits = UploadLimits(max_bytes=50 * 2**20, max_pixels=50_000_000)
    max_pixels: int = 2048 * 2048  # each job's output (Config.max_pixels)
    time_limit: Optional[float] = 600.0  # seconds per job run
    max_queued: int = 32
    checkpoint_every: int = 20  # steps


@dataclass
class Live:
    """What this process knows about a job it submitted: the engine job and the events it has sent."""

    job: object = None  # engine.Job
    events: list = field(default_factory=list)
    curve: list = field(default_factory=list)  # [[total_step, loss], ...]
    finished: bool = False
    cancelled_by_client: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class Service:
    def __init__(self, state_dir: Path, limits: Limits = Limits(), base: Optional[Config] = None):
        self.limits = limits
        self.base = base or Config()
        self.store = Store(Path(state_dir))
        self.engine = Engine(self.base, max_queued=limits.max_queued)
        self.live: dict[str, Live] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._backlog: deque[str] = deque()  # unfinished jobs from the last run that the queue had no room for
        self._threads: list[threading.Thread] = []
        self._finished: deque[str] = deque()

    # Starting and stopping -----------------------------------------------------------------------------

    def start(self) -> None:
        """Submit the jobs a previous run left unfinished, oldest first."""
        for row in self.store.unfinished():
            self._backlog.append(row.id)
        self._feed()

    def begin_stop(self) -> None:
        """SIGTERM: from the next step on, the running job checkpoints and stops. Returns at once."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        # Called from a signal handler: the rest in a thread, so that no lock is taken on the handler's stack.
        threading.Thread(target=self._stop_queued, name="stop", daemon=True).start()

    def _stop_queued(self) -> None:
        """Queued jobs leave the engine's queue (the table still says queued: see ``_finish``), so that none
        of them starts only to checkpoint after its first step."""
        for live in list(self.live.values()):
            job = live.job
            if job is not None and job.state == "queued":
                job.cancel()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def close(self, timeout: float = 60.0) -> None:
        """Stop: queued jobs stay queued (in the table), the running one checkpoints; then the engine closes."""
        self.begin_stop()
        self._stop_queued()
        # Not cancel=True, which would cancel the running job instead of letting it checkpoint: by default the
        # running job ends at its next step (its control watches the flag set above), queued ones "interrupted".
        try:
            self.engine.close(timeout=timeout)
        except TimeoutError as exc:  # a step longer than the timeout: the last periodic checkpoint remains
            _log(f"{exc}; it goes on from its last checkpoint next time")
        for thread in list(self._threads):
            thread.join(timeout)
        kept = self.store.count().get("queued", 0) + self.store.count().get("running", 0)
        _log(f"stopped; {kept} unfinished job{'' if kept == 1 else 's'} kept for the next start")
        self.store.close()

    # Jobs ----------------------------------------------------------------------------------------------

    def submit(self, staging: Path, content: torch.Tensor, styles: list[torch.Tensor], options: dict, inputs: dict):
        """Queue a checked request whose files are in ``staging``; the ``Row`` made, or a ``UserError``."""
        config = job_config(self._job_base(), options)  # a bad value: refused before anything is kept
        height, width = fit_long_side(*content.shape[-2:], config.size)
        if height * width > self.limits.max_pixels:  # in the client's terms: the engine's names its own option
            raise UserError(
                f"size {config.size} makes the output {width}x{height} = {pixels(height * width)}, above this "
                f"server's {pixels(self.limits.max_pixels)} limit; ask for a smaller size"
            )
        if self.stopping:
            raise ServiceStopping("the server is shutting down; try again when it is back")
        now = time.time()
        row = Row(new_id(), 0, "queued", now, now, options, inputs, len(styles))
        self.store.accept(staging, row)
        try:
            self._run(row, config, content, styles, resume=None)
        except BaseException:
            self.store.forget(row.id)  # nothing left behind: no row, no files
            self.live.pop(row.id, None)
            raise
        return self.store.get(row.id)

    def cancel(self, job_id: str) -> Optional[Row]:
        row = self.store.get(job_id)
        if row is None:
            return None
        live = self.live.get(job_id)
        if row.state in FINAL:
            return row
        job = live.job if live is not None else None
        if job is not None:
            live.cancelled_by_client = True
            job.cancel()
        elif live is None:  # still in the backlog of a restart: never reached the engine
            with self._lock:
                if job_id in self._backlog:
                    self._backlog.remove(job_id)
                    self.store.update(job_id, state="cancelled")
        return self.store.get(job_id)

    def preview(self, job_id: str) -> Optional[torch.Tensor]:
        live = self.live.get(job_id)
        job = live.job if live is not None else None
        return job.preview() if job is not None and not live.finished else None

    def result_path(self, row: Row, bits: int) -> Path:
        return self.store.folder(row.id) / ("result16.png" if bits == 16 else "result.png")

    # Internals -----------------------------------------------------------------------------------------

    def _job_base(self) -> Config:
        import dataclasses

        return dataclasses.replace(self.base, max_pixels=self.limits.max_pixels)

    def _run(self, row: Row, config: Config, content, styles, resume: Optional[dict]) -> None:
        folder = self.store.folder(row.id)
        plan = ckpt.CheckpointPlan(str(folder / "checkpoint.pt"), every=self.limits.checkpoint_every)
        control = Control(time_limit=self.limits.time_limit)

        def watch() -> None:  # once per step: a stopping server has the running job checkpoint and end
            if self._stopping.is_set():
                control.interrupt()

        control.watch = watch
        live = Live(curve=[list(p) for p in row.history])
        self.live[row.id] = live
        live.job = self.engine.submit(content, styles, config, checkpoint=plan, resume=resume, control=control)
        thread = threading.Thread(target=self._follow, args=(row.id, live), name=f"job-{row.id[:6]}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _follow(self, job_id: str, live: Live) -> None:
        job = live.job
        saved = 0.0
        running = False
        for event in job.events():
            kind = event.get("type")
            if kind == "progress":
                progress = _progress(event)
                with live.lock:
                    point = [progress["step"], progress["loss"]]
                    if not live.curve or live.curve[-1][0] != point[0]:
                        live.curve.append(point)
                    if len(live.curve) > MAX_CURVE:
                        live.curve[:] = live.curve[::2]
                    live.events.append(progress)
                if not running or time.monotonic() - saved > SAVE_SECONDS:
                    self.store.update(job_id, state="running", progress=progress, history=live.curve)
                    running, saved = True, time.monotonic()
            else:
                self._finish(job_id, live, kind, event)
                break
        self._threads = [t for t in self._threads if t is not threading.current_thread()]
        self._feed()

    def _finish(self, job_id: str, live: Live, kind: str, event: dict) -> None:
        job = live.job
        final = {"type": kind}
        if live.events:  # the latest progress, which the table may not have yet
            self.store.update(job_id, progress=live.events[-1])
        if kind == "done":
            try:
                result = job.result(timeout=0)
                folder = self.store.folder(job_id)
                save_image(result.image, folder / "result16.png", overwrite=True, bit_depth=16)
                save_image(result.image, folder / "result.png", overwrite=True)
                self.store.update(job_id, state="done", seconds=result.seconds, history=live.curve)
                final["seconds"] = result.seconds
            except Exception as exc:  # a full disk: the job failed, the service goes on
                message = str(exc) if isinstance(exc, UserError) else f"the result could not be saved ({exc})"
                self.store.update(job_id, state="failed", error=message)
                final = {"type": "failed", "error": message}
        elif kind == "failed":
            message = job.error or "the job failed"
            self.store.update(job_id, state="failed", error=message, history=live.curve)
            final["error"] = message
            _log(f"job {job_id} failed: {message}")
        elif kind == "cancelled" and not live.cancelled_by_client and self.stopping:
            final = {"type": "stopped"}  # cancelled by the shutdown while queued: still queued in the table
        elif kind == "cancelled":
            self.store.update(job_id, state="cancelled", history=live.curve)
        else:  # interrupted by the shutdown: queued again, its checkpoint beside it
            self.store.update(job_id, state="queued", history=live.curve)
            final = {"type": "stopped"}
        with live.lock:
            live.finished = True
            live.events.append(final)
            live.job = None  # its images and inputs: the result is on disk now
        # The events of the last few finished jobs stay in memory, to replay to late readers; older ones
        # answer from the table (the last progress and the outcome), so memory does not grow with jobs served.
        with self._lock:
            self._finished.append(job_id)
            while len(self._finished) > KEEP_FINISHED:
                self.live.pop(self._finished.popleft(), None)

    def _feed(self) -> None:
        """Submit backlog jobs while the engine's queue has room."""
        while not self.stopping:
            with self._lock:
                if not self._backlog:
                    return
                job_id = self._backlog[0]
            row = self.store.get(job_id)
            try:
                self._restart(row)
            except QueueFullSignal:
                return  # the next finished job calls _feed again
            with self._lock:
                if self._backlog and self._backlog[0] == job_id:
                    self._backlog.popleft()

    def _restart(self, row: Row) -> None:
        from engine import QueueFull

        folder = self.store.folder(row.id)
        try:
            content = _read(folder / "content.img", "content image")
            styles = [_read(folder / f"style-{i}.img", f"style image {i + 1}") for i in range(row.styles)]
            config = job_config(self._job_base(), row.options)
            resume = None
            path = folder / "checkpoint.pt"
            if path.exists():
                try:
                    resume = ckpt.load(path)
                except UserError as exc:  # cannot happen with atomic writes; start afresh rather than fail
                    _log(f"job {row.id}: {exc}; starting it again from the beginning")
                    path.unlink()
            self._run(row, config, content, styles, resume)
        except QueueFull:
            self.live.pop(row.id, None)
            raise QueueFullSignal() from None
        except UserError as exc:
            self.store.update(row.id, state="failed", error=str(exc))
            return
        self.store.update(row.id, resumed=row.resumed + (1 if resume is not None else 0))
        _log(f"job {row.id} {'resumed from its checkpoint' if resume is not None else 'queued again'}")


class ServiceStopping(UserError):
    """The server is shutting down and takes no new jobs."""


class QueueFullSignal(Exception):
    pass


def _read(path: Path, what: str) -> torch.Tensor:
    return check_image(path.read_bytes(), what, UploadLimits(max_bytes=0, max_pixels=10**12))


def _progress(event: dict) -> dict:
    """The engine's progress event as the service sends it (see README: the event stream)."""
    keep = ("step", "total_steps", "scale", "scales", "loss", "parts", "seconds")
    return {"type": "progress", **{k: event[k] for k in keep if k in event}}


def _log(message: str) -> None:
    print(f"nst serve: {message}", file=sys.stderr, flush=True)
