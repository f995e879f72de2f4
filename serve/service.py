"""The service behind the HTTP routes: one ``engine.Engine``, the job table, and a memory budget.

A job's life on disk (``store.Row.state``): queued -> running -> done | failed | cancelled. A job the service
stops (SIGTERM) goes back to "queued" with its checkpoint beside it, and so does a job that was running
when the process was killed: on the next start both are submitted again, the first from the checkpoint it
wrote on stopping, the second from its last periodic one (so a kill loses at most one checkpoint interval).
A checkpoint holds the whole optimisation state, so a resumed job ends with the image an uninterrupted
run makes.

One live record per job: the engine's ``Job``. Readers of the event stream read ``Job.events`` directly;
the table is written by a ``Recorder``, the listener the job is submitted with (``on_event``), which runs in
the thread that made the event and never raises: a fault (a full disk, a damaged file) fails that one job
and the service goes on. No thread of the service's own follows a job.

Memory: every image is decoded, then shrunk at once to the size the job uses (the content to the output
size, each style to its size at the last scale), and only that is kept, on disk and in memory. Each job's
memory (``engine.job_memory``: its images while it waits, its run's peak) is reserved from the server's
budget when it is accepted and returned when it ends; a job that could never fit is refused (422), one that
does not fit now gets 429 with ``Retry-After``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sqlite3
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from engine import Config, Control, Engine, QueueFull, UserError
from engine import checkpoint as ckpt
from engine.errors import pixels
from engine.images import fit_long_side, resize, save_image
from engine.job_memory import JobMemory, job_memory, style_shape
from engine.memory import GiB
from engine.schedule import build_schedule
from engine.sizes import min_side as network_min_side

from .store import FINAL, Row, Store, StoreFull, disk_full, new_id
from .uploads import UploadLimits, check_image, job_config

# How often a running job's progress and loss curve are written to the table (the events themselves go
# to readers as they come); the checkpoint, not this, is what a restart resumes from.
SAVE_SECONDS = 2.0
# A loss curve longer than this is thinned (every other point) before it grows further: the page draws a
# few hundred pixels, and a job of many thousand steps should not make the table's curve unbounded.
MAX_CURVE = 4000
KEEP_FINISHED = 16  # finished jobs whose engine Job stays in memory, to replay their events from it
RETRY_SECONDS = 10  # Retry-After for a full queue or memory budget


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the operator allows (``nst serve`` options)."""

    upload: UploadLimits = UploadLimits(max_bytes=50 * 2**20, max_pixels=50_000_000)
    max_pixels: int = 2048 * 2048  # each job's output (Config.max_pixels)
    time_limit: Optional[float] = 600.0  # seconds per job run
    max_queued: int = 32
    checkpoint_every: int = 20  # steps
    memory_budget: int = 8 * GiB  # bytes the jobs held (queued and running) may take together
    max_styles: int = 8
    max_step_pixels: float = 1e9  # sum over a job's scales of steps x pixels: what a job may cost in time


class ServiceStopping(UserError):
    """The server is shutting down and takes no new jobs."""


class Busy(UserError):
    """The queue or the memory budget is full now; the same request may succeed later (429)."""


class Recorder:
    """The store's listener on one engine job: progress to the table every ``SAVE_SECONDS``, and the outcome.

    Called by the engine (``on_event``) in the thread that made the event. It never raises: whatever goes
    wrong while recording (a full disk, a result that cannot be written) becomes this job's outcome.
    """

    def __init__(self, service: "Service", row: Row, memory: JobMemory, before: list):
        self.service, self.id, self.memory = service, row.id, memory
        self.before = before  # the curve from an earlier run of a resumed job, [[step, loss], ...]
        self.curve = [list(p) for p in before]
        self.last: Optional[dict] = None  # the latest progress event, as the service sends it
        self.job = None  # engine.Job, set once submitted, let go once the outcome is recorded
        self.events: Optional[list] = None  # then: its events, kept for readers who come late
        self.final: Optional[dict] = None  # the stream's last event, once the outcome is recorded
        self.settled = threading.Event()
        self.cancelled_by_client = False
        self._ready = threading.Event()  # the engine's Job is known (events may come before submit returns)
        self._saved = 0.0

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        try:
            if kind == "progress":
                self._progress(event)
                return
            self._ready.wait(30)
            self.final = self._finish(kind, event)
        except Exception as exc:  # a bug or a fault while recording: this job fails, nothing else
            message = f"the job's outcome could not be recorded ({_detail(exc)})"
            _log(f"job {self.id}: {message}")
            self.final = {"type": "failed", "error": message}
            self.service.store.update(self.id, state="failed", error=message)
        finally:
            if kind != "progress":
                if self.job is not None:
                    # The events stay, to replay to late readers; the engine Job goes, with the images it
                    # still holds (the content, the result, a resumed job's checkpoint state).
                    self.events = list(self.job.events(timeout=0))
                    self.job = None
                self.settled.set()
                self.service._ended(self)

    def _progress(self, event: dict) -> None:
        progress = _progress(event)
        self.last = progress
        point = [progress["step"], progress["loss"]]
        if not self.curve or self.curve[-1][0] != point[0]:
            self.curve.append(point)
        if len(self.curve) > MAX_CURVE:
            self.curve[:] = self.curve[::2]
        if self._saved == 0.0 or time.monotonic() - self._saved > SAVE_SECONDS:
            # A full disk keeps this in memory (store.pending) until a later write succeeds.
            self.service.store.update(self.id, state="running", progress=progress, history=self.curve)
            self._saved = time.monotonic()

    def _finish(self, kind: str, event: dict) -> dict:
        store, service = self.service.store, self.service
        progress = {"progress": self.last} if self.last else {}
        if kind == "done":
            result = self.job.result(timeout=0)
            folder = store.folder(self.id)
            try:
                save_image(result.image, folder / "result16.png", overwrite=True, bit_depth=16)
                save_image(result.image, folder / "result.png", overwrite=True)
            except OSError as exc:
                message = "the result could not be saved: " + (
                    "the server's disk is full" if disk_full(exc) else _detail(exc)
                )
                store.update(self.id, state="failed", error=message, history=self.curve, **progress)
                return {"type": "failed", "error": message}
            (folder / "checkpoint.pt").unlink(missing_ok=True)
            store.update(self.id, state="done", seconds=result.seconds, history=self.curve, **progress)
            return {"type": "done", "seconds": result.seconds}
        if kind == "failed":
            message = event.get("error") or "the job failed"
            if disk_full(self.job.exception):  # a checkpoint that could not be written
                message = f"the job stopped after step {self.job.progress.step}: the server's disk is full"
            store.update(self.id, state="failed", error=message, history=self.curve, **progress)
            _log(f"job {self.id} failed: {message}")
            return {"type": "failed", "error": message}
        if kind == "cancelled" and (self.cancelled_by_client or not service.stopping):
            store.update(self.id, state="cancelled", history=self.curve, **progress)
            return {"type": "cancelled"}
        # Interrupted by the shutdown (or taken off the queue by it): queued again, its checkpoint beside it.
        store.update(self.id, state="queued", history=self.curve, **progress)
        return {"type": "stopped"}


class Service:
    def __init__(self, state_dir: Path, limits: Limits = Limits(), base: Optional[Config] = None):
        self.limits = limits
        self.store = Store(Path(state_dir))
        for name in self.store.left_alone:
            _log(f"left alone in the state dir (not written by this server, or without a job row): {name}")
        # Jobs get the server's output limit, and tile auto plans each scale for the server's memory budget
        # (as job_memory counts it).
        base = base or Config()
        self.base = dataclasses.replace(base, max_pixels=limits.max_pixels, memory_budget=limits.memory_budget / GiB)
        self.engine = Engine(self.base, max_queued=limits.max_queued)
        self.recorders: dict[str, Recorder] = {}  # the jobs this process submitted (and a few finished ones)
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # recorders, the backlog, the finished list and the budget
        # Every upload is decoded on this one thread, one at a time: the decoding peak is one image's, and the
        # memory the allocator keeps after it is one thread's (an arena per thread would keep one each).
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")
        self._backlog: deque[str] = deque()  # unfinished jobs from the last run waiting for room
        self._reserved: dict[str, JobMemory] = {}  # the budget taken by each job held (queued or running)
        self._finished: deque[str] = deque()

    # Starting and stopping -----------------------------------------------------------------------------

    def start(self) -> None:
        """Submit the jobs a previous run left unfinished, oldest first; a job that cannot be, fails alone."""
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
        """Queued jobs leave the engine's queue (the table still says queued: see ``Recorder._finish``), so
        that none of them starts only to checkpoint after its first step."""
        for recorder in list(self.recorders.values()):
            job = recorder.job
            if job is not None and str(job.state) == "queued":
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
        self.decoder.shutdown(wait=False, cancel_futures=True)
        if not self.store.flush():
            _log("the job table could not be brought up to date (is the disk full?)")
        try:
            counts = self.store.count()
            kept = counts.get("queued", 0) + counts.get("running", 0)
            _log(f"stopped; {kept} unfinished job{'' if kept == 1 else 's'} kept for the next start")
        except sqlite3.Error as exc:
            _log(f"stopped; the job table cannot be read now ({exc})")
        self.store.close()

    def health(self) -> dict:
        if self.stopping:
            return {"status": "stopping"}
        if not self.store.flush():
            return {"status": "degraded", "detail": "the job table cannot be written (the disk may be full)"}
        return {"status": "ok"}

    # Jobs ----------------------------------------------------------------------------------------------

    def check(self, options: dict, styles: int) -> Config:
        """The job's ``Config`` from the client's options; refused (``UserError``) before any image is decoded."""
        config = job_config(self.base, options)
        if styles > self.limits.max_styles:
            raise UserError(f"send at most {self.limits.max_styles} style images, not {styles}")
        if self.stopping:
            raise ServiceStopping("the server is shutting down; try again when it is back")
        return config

    def decode(self, data: bytes, what: str, config: Config, kind: str) -> torch.Tensor:
        """An uploaded image decoded, then at once shrunk to the size the job uses (never enlarged)."""

        def size(h: int, w: int) -> tuple[int, int]:
            return fit_long_side(h, w, config.size) if kind == "content" else style_shape(config, h, w)

        image = check_image(data, what, self.limits.upload, shrink_to=size)
        h, w = image.shape[-2:]
        target = size(h, w)
        if target[0] * target[1] < h * w:
            image = resize(image, target)  # as core.decode_jobs does for the content: same pixels
        _give_back_memory()
        return image

    def submit(self, staging: Path, config: Config, options: dict, content, styles, inputs: dict) -> Row:
        """Queue a checked request whose shrunk images are given; the ``Row`` made, or a ``UserError``."""
        height, width = fit_long_side(*content.shape[-2:], config.size)
        if height * width > self.limits.max_pixels:  # in the client's terms: the engine's names its own option
            raise UserError(
                f"size {config.size} makes the output {width}x{height} = {pixels(height * width)}, above this "
                f"server's {pixels(self.limits.max_pixels)} limit; ask for a smaller size"
            )
        self._check_work(config, content)
        memory = self._memory(config, content, styles)
        self._check_memory(memory)
        Store.save_image(staging, "content", content)
        for index, style in enumerate(styles):
            Store.save_image(staging, f"style-{index}", style)
        if self.stopping:
            raise ServiceStopping("the server is shutting down; try again when it is back")
        now = time.time()
        row = Row(new_id(), 0, "queued", now, now, options, inputs, len(styles))
        with self._lock:
            self._reserve(row.id, memory)  # again, and kept: another request may have come meanwhile
        try:
            self.store.accept(staging, row)
            self._run(row, config, content, styles, memory, resume=None)
        except BaseException:
            with self._lock:
                self.recorders.pop(row.id, None)
                self._reserved.pop(row.id, None)
            self.store.forget(row.id)  # nothing left behind: no row, no files
            raise
        return self.store.get(row.id)

    def cancel(self, job_id: str, wait: float = 5.0) -> Optional[Row]:
        """Cancel a job: a queued one at once, a running one after its current step (waited for, briefly)."""
        row = self.store.get(job_id)
        if row is None or row.state in FINAL:
            return row
        recorder = self.recorders.get(job_id)
        if recorder is not None and recorder.job is not None:
            recorder.cancelled_by_client = True
            recorder.job.cancel()
            recorder.settled.wait(wait)
        else:  # still in the backlog of a restart: never reached the engine
            with self._lock:
                if job_id in self._backlog:
                    self._backlog.remove(job_id)
                    self.store.update(job_id, state="cancelled")
        return self.store.get(job_id)

    def preview(self, job_id: str) -> Optional[torch.Tensor]:
        recorder = self.recorders.get(job_id)
        job = recorder.job if recorder is not None else None
        return job.preview() if job is not None and not recorder.settled.is_set() else None

    def result_path(self, row: Row, bits: int) -> Path:
        return self.store.folder(row.id) / ("result16.png" if bits == 16 else "result.png")

    def memory_in_use(self) -> tuple[int, int]:
        """(bytes reserved by the jobs held now, the budget)."""
        with self._lock:
            return self._reserved_total(None), self.limits.memory_budget

    # Internals -----------------------------------------------------------------------------------------

    def _check_work(self, config: Config, content: torch.Tensor) -> None:
        need = network_min_side(config.model, config.feature_layers)
        schedule = build_schedule(
            *content.shape[-2:], config.size, config.min_size, config.steps, need, schedule=config.schedule
        )
        work = sum(s.steps * s.height * s.width for s in schedule)
        if work > self.limits.max_step_pixels:
            raise UserError(
                f"steps {config.steps} at size {config.size} make {work / 1e6:,.0f} million pixel-steps over the "
                f"job's scales, above this server's {self.limits.max_step_pixels / 1e6:,.0f} million; ask for "
                "fewer steps or a smaller size"
            )

    def _memory(self, config: Config, content: torch.Tensor, styles: list) -> JobMemory:
        """What a job of these decoded images holds and needs, as the engine will plan its scales."""
        shapes = [tuple(s.shape[-2:]) for s in styles]
        return job_memory(config, tuple(content.shape[-2:]), shapes, self.engine.runtime, self.limits.memory_budget)

    def _check_memory(self, memory: JobMemory) -> None:
        budget = self.limits.memory_budget
        if memory.total > budget:
            raise UserError(
                f"this job needs about {memory.total / GiB:.2f} GiB ({memory.held / GiB:.2f} GiB of images while "
                f"it waits, {memory.run / GiB:.2f} GiB to run), above this server's {budget / GiB:.2f} GiB memory "
                "budget; ask for a smaller size, fewer or smaller styles (style_scale, style_size), or fewer "
                "ot_projections"
            )
        with self._lock:
            self._reserve(None, memory)  # a first look, before its images are written

    def _reserved_total(self, extra: Optional[JobMemory]) -> int:
        """What the held jobs need at most together: all their images, and the largest run (one runs at a
        time: the service's jobs checkpoint, which the engine never batches)."""
        memories = list(self._reserved.values()) + ([extra] if extra is not None else [])
        return sum(m.held for m in memories) + max((m.run for m in memories), default=0)

    def _reserve(self, job_id: Optional[str], memory: JobMemory, force: bool = False) -> None:
        """Count ``memory`` against the budget for ``job_id`` (None: only look); ``Busy`` when it does not fit.
        Called with ``_lock`` held."""
        if not force and self._reserved_total(memory) > self.limits.memory_budget:
            held = self._reserved_total(None)
            raise Busy(
                f"the jobs this server holds take {held / GiB:.2f} of its {self.limits.memory_budget / GiB:.2f} GiB "
                f"memory budget and this one needs {memory.total / GiB:.2f} GiB; try again later"
            )
        if job_id is not None:
            self._reserved[job_id] = memory

    def _run(self, row: Row, config: Config, content, styles, memory: JobMemory, resume: Optional[dict]) -> None:
        folder = self.store.folder(row.id)
        plan = ckpt.CheckpointPlan(str(folder / "checkpoint.pt"), every=self.limits.checkpoint_every)
        control = Control(time_limit=self.limits.time_limit)

        def watch() -> None:  # once per step: a stopping server has the running job checkpoint and end
            if self._stopping.is_set():
                control.interrupt()

        control.watch = watch
        # A resumed job's steps so far, from its checkpoint (every step's loss, unlike the table's curve, which
        # is written every few seconds): replayed to event readers before the new ones.
        before = [[k + 1, h["loss"]] for k, h in enumerate(resume["history"])] if resume is not None else []
        recorder = Recorder(self, row, memory, before)
        with self._lock:
            self.recorders[row.id] = recorder
        try:
            recorder.job = self.engine.submit(
                content,
                styles,
                config,
                checkpoint=plan,
                resume=resume,
                control=control,
                on_event=recorder,
            )
        finally:
            recorder._ready.set()

    def _ended(self, recorder: Recorder) -> None:
        """A job's outcome is recorded: its memory is free (it no longer counts), and a backlog job may go."""
        # The engine Jobs of the last few finished jobs stay, to replay their events to late readers; older
        # ones answer from the table (the curve and the outcome), so memory does not grow with jobs served.
        with self._lock:
            self._reserved.pop(recorder.id, None)
            self._finished.append(recorder.id)
            while len(self._finished) > KEEP_FINISHED:
                self.recorders.pop(self._finished.popleft(), None)
        if not self.stopping:
            self._feed()

    def _feed(self) -> None:
        """Submit backlog jobs while the engine's queue and the memory budget have room; a backlog job that
        cannot be read or run fails alone, in one sentence."""
        while not self.stopping:
            with self._lock:
                if not self._backlog:
                    return
                job_id = self._backlog[0]
            try:
                self._restart(job_id)
            except (QueueFull, Busy):
                with self._lock:
                    self.recorders.pop(job_id, None)
                    self._reserved.pop(job_id, None)
                return  # the next job to end calls _feed again
            except Exception as exc:
                with self._lock:
                    self.recorders.pop(job_id, None)
                    self._reserved.pop(job_id, None)
                message = _restart_failure(exc)
                _log(f"job {job_id} cannot be resumed: {message}")
                self.store.update(job_id, state="failed", error=message)
            with self._lock:
                if self._backlog and self._backlog[0] == job_id:
                    self._backlog.popleft()

    def _restart(self, job_id: str) -> None:
        row = self.store.get(job_id)
        if row is None:
            return
        if row.damaged:
            raise UserError(row.damaged)
        folder = self.store.folder(row.id)
        if not folder.is_dir():
            raise UserError("its files are missing from the server's disk")
        try:
            content = Store.load_image(folder, "content")
            styles = [Store.load_image(folder, f"style-{i}") for i in range(row.styles)]
        except (OSError, ValueError) as exc:
            raise UserError(f"its images could not be read back ({_detail(exc)})") from None
        config = job_config(self.base, row.options)
        memory = self._memory(config, content, styles)
        with self._lock:
            # A job accepted by an earlier run is never refused for memory, only held back: alone, it runs.
            self._reserve(row.id, memory, force=not self._reserved)
        resume = None
        path = folder / "checkpoint.pt"
        if path.exists() or path.is_symlink():
            try:
                resume = ckpt.load(path)
            except UserError:
                raise UserError("its checkpoint could not be read; it cannot be resumed") from None
        self._run(row, config, content, styles, memory, resume)
        self.store.update(row.id, resumed=row.resumed + (1 if resume is not None else 0))
        _log(f"job {row.id} {'resumed from its checkpoint' if resume is not None else 'queued again'}")


def _give_back_memory() -> None:
    """Return the freed decoding buffers to the system (glibc keeps freed heap memory for reuse otherwise,
    and a decoded upload is hundreds of MB in blocks below its mmap threshold)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc: nothing to do
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _restart_failure(exc: BaseException) -> str:
    if isinstance(exc, StoreFull) or disk_full(exc):
        return "the server's disk is full"
    if isinstance(exc, UserError):
        return str(exc)
    return f"it could not be resumed ({_detail(exc)})"


def _detail(exc: BaseException) -> str:
    """An exception in a few words, without the file names a client should not see."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"


def _progress(event: dict) -> dict:
    """The engine's progress event as the service sends it (see docs/service.md: the event stream)."""
    keep = ("step", "total_steps", "scale", "scales", "loss", "parts", "seconds")
    return {"type": "progress", **{k: event[k] for k in keep if k in event}}


def _log(message: str) -> None:
    print(f"nst serve: {message}", file=sys.stderr, flush=True)
