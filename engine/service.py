"""The long-lived ``Engine`` a service holds (one per device), and its ``Job``s: a thin threaded wrapper
over the synchronous ``core.Core``.

An Engine opens one ``Core`` (the runtime, decided once, the extractor, the style features of recent
styles and, on CUDA, the captured graphs of recent shapes) and runs the jobs submitted to it on one
worker thread, one batch at a time: queued jobs that ``core.plan_batches`` would group (the same size
and settings) are optimised together (up to ``batch_size``, with Adam). Every job's inputs are decoded
and checked when it is submitted, so bad input is refused at once and nothing is queued.

Threads: ``submit``, ``Job.cancel``, ``Job.result``, ``Job.events`` and ``Job.preview`` may be
called from any thread. The worker reads losses in groups (``optimize.Callback``), never once per
step, and the preview is the image of the last group read.

Process-wide flags: the runtime sets torch's TF32 and cuDNN flags, which belong to the process. An
Engine sets them once, when it is built; a second Engine in the same process on CUDA with another
precision would switch them under the first, so it is refused (``UserError``).
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from .checkpoint import CheckpointPlan
from .config import Config
from .control import Control, Interrupted, Stopped
from .core import FIXED, Batch, Core, JobSpec, Result, plan_batches, prepare_jobs
from .errors import UserError, is_out_of_memory, option
from .images import ImageLike
from .optimize import SYNC_EVERY, Callback, StepInfo
from .runtime import Runtime

__all__ = [
    "FIXED",
    "Engine",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobInterrupted",
    "JobProgress",
    "JobState",
    "QueueFull",
]
PREVIEW_SECONDS = 0.1  # how often a running job's losses (and preview) are read at most


class QueueFull(UserError):
    """The Engine's queue holds ``max_queued`` jobs; try again later."""


class JobFailed(UserError):
    """The job stopped with an error; the message is the job's ``error``."""


class JobCancelled(UserError):
    """The job was cancelled before it finished."""


class JobInterrupted(UserError):
    """The job stopped at its checkpoint plan's request (or the Engine closed before it ran)."""


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:
        return self.value


TERMINAL = (JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED)


@dataclass(kw_only=True)
class JobProgress:
    """Where a job is: ``step`` of ``total_steps`` over all scales, ``scale`` (0-based) of ``scales``.

    ``loss`` and ``parts`` are the loss of the batch the job runs in (the sum over its jobs: one job
    alone unless same-size jobs were batched); ``seconds`` since the job started running.
    """

    step: int = 0
    total_steps: int = 0
    scale: int = 0
    scales: int = 0
    loss: Optional[float] = None
    parts: dict = field(default_factory=dict)
    seconds: float = 0.0


class Job:
    """A submitted job: its state, progress, preview and result. Made by ``Engine.submit``."""

    def __init__(
        self, *, engine: "Engine", config: Config, runtime: Runtime, inputs, masks, saving, control: Control, on_event
    ):
        self.id = secrets.token_urlsafe(16)
        self.config = config
        self.state = JobState.QUEUED
        self.progress = JobProgress(total_steps=sum(s.steps for s in inputs.schedule(config, engine.core.min_side)))
        self.error: Optional[str] = None
        self.exception: Optional[BaseException] = None  # what stopped it, for those who want more than the error
        self.control = control  # cancel(), interrupt() and the time limit act through it
        self.submitted = time.time()
        self._engine, self._runtime, self._inputs, self._masks, self._saving = engine, runtime, inputs, masks, saving
        self._context = contextvars.copy_context()  # the submitter's wording of messages (CLI or Python)
        self._cond = threading.Condition()
        self._events: list[dict] = []
        self._preview: Optional[torch.Tensor] = None
        self._result: Optional[Result] = None
        self._started: Optional[float] = None
        # Called with every event, in order, after it is recorded and outside the job's lock (so a slow
        # listener, such as a service writing its table, never holds up the readers of ``events``).
        self._on_event: Optional[Callable[[dict], None]] = on_event

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.state.value} step {self.progress.step}/{self.progress.total_steps}>"

    @property
    def time_limit(self) -> Optional[float]:
        return self.control.time_limit

    @property
    def schedule(self):
        return self._inputs.schedule(self.config, self._engine.core.min_side)

    # ---------------------------------------------------------------------------------- for callers

    def preview(self) -> Optional[torch.Tensor]:
        """The latest image read, ``(3, H, W)`` float32 on the CPU in [0, 1] (the result once done); None before."""
        with self._cond:
            if self._result is not None:
                return self._result.image
            image = self._preview
        return None if image is None else self._inputs.with_colours(image)

    def result(self, timeout: Optional[float] = None) -> Result:
        """Wait for the job: its ``Result``, or ``JobFailed``/``JobCancelled``/``JobInterrupted``/``TimeoutError``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.state in TERMINAL, timeout):
                raise TimeoutError(f"job {self.id} did not finish within {timeout:g} s")
        if self.state == JobState.DONE:
            return self._result
        if self.state == JobState.CANCELLED:
            raise JobCancelled(f"job {self.id} was cancelled")
        if self.state == JobState.INTERRUPTED:
            raise JobInterrupted(self.error or f"job {self.id} was interrupted")
        raise JobFailed(self.error)

    def cancel(self) -> None:
        """Stop the job: a queued one is removed at once, a running one stops after its current step."""
        if self._engine._unqueue(self):
            return
        self.control.cancel()  # the worker checks it after every step
        if self.state == JobState.RUNNING and len(self._engine._running) > 1:
            # Batched with others: it ends now, and the batch goes on for them (until all have ended).
            self._engine._end(self, JobState.CANCELLED)

    def interrupt(self) -> None:
        """Stop the job after its current step, writing its checkpoint (a job submitted with one): it ends
        ``interrupted`` and can be submitted again with ``resume``. A queued job ends ``interrupted`` at once."""
        if self._engine._unqueue(self, JobState.INTERRUPTED):
            return
        self.control.interrupt()  # the worker checks it after every step

    def events(self, timeout: Optional[float] = None, start: int = 0) -> Iterator[dict]:
        """Every event of the job from its start, in order; ends after the one terminal event.

        ``{"type": "progress", step, total_steps, scale, scales, loss, parts, seconds}`` per step, then
        ``{"type": "done"}``, ``{"type": "failed", "error": ...}``, ``{"type": "cancelled"}`` or
        ``{"type": "interrupted"}``. ``timeout``: the longest wait for the next event (``TimeoutError``).
        ``start``: skip the first ``start`` events (a client reconnecting after the ones it has seen).
        """
        index = max(0, start)
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda seen=index: len(self._events) > seen, timeout):
                    raise TimeoutError(f"no event from job {self.id} within {timeout:g} s")
                batch = self._events[index:]
            for event in batch:
                yield event
                if event["type"] != "progress":
                    return
            index += len(batch)

    # ---------------------------------------------------------------------------------- for the worker

    def _emit(self, event: dict) -> None:
        self._events.append(event)
        self._cond.notify_all()

    def _tell(self, event: Optional[dict]) -> None:
        """The ``on_event`` listener, called by the thread that made ``event`` once the lock is released."""
        if event is not None and self._on_event is not None:
            self._on_event(event)

    def _start(self) -> None:
        with self._cond:
            self.state = JobState.RUNNING
            self._started = time.perf_counter()
            self.control.start()

    def _step(self, info: StepInfo, image: Optional[torch.Tensor]) -> None:
        with self._cond:
            if self.state != JobState.RUNNING:
                return
            p = self.progress
            p.step, p.total_steps, p.scale, p.scales = info.total_step, info.total_steps, info.scale, info.scales
            p.loss, p.parts, p.seconds = info.loss, dict(info.parts), time.perf_counter() - self._started
            if image is not None:
                self._preview = image
            event = {"type": "progress", **dataclasses.asdict(p)}
            self._emit(event)
        self._tell(event)

    def _finish(self, state: JobState, error: Optional[str] = None, result=None, exception=None) -> None:
        """Set the terminal state once (a later call is ignored) and send the terminal event."""
        with self._cond:
            if self.state in TERMINAL:
                return
            self.state, self.error, self._result, self.exception = state, error, result, exception
            self._preview = None if result is not None else self._preview
            # The style images (often the largest inputs) are not needed any more; the job may be kept long.
            self._inputs = dataclasses.replace(self._inputs, styles=[], init=None)
            self._masks = None
            event = {"type": state.value}
            if state == JobState.FAILED:
                event["error"] = error
            self._emit(event)
        self._tell(event)


class Engine:
    """A long-lived style-transfer engine: one runtime, extractor and cache, one worker, a bounded queue.

    ``config`` fixes what the extractor and runtime are built from (see ``FIXED``); each job may
    change everything else. ``max_queued``: jobs waiting beyond the running batch. ``style_cache_bytes``:
    device memory for the features of recent styles; ``graphs_kept``: captured CUDA graphs kept, one per
    scale shape (more than a job's scales, or a repeated job would evict its own graphs). Use as a
    context manager, or call ``close()``.
    """

    def __init__(
        self,
        config: Optional[Config] = None,
        *,
        max_queued: int = 32,
        style_cache_bytes: int = 256 << 20,
        graphs_kept: int = 16,
    ):
        self.config = config or Config()
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 0:
            raise UserError(f"max_queued must be a whole number, 0 or more, not {max_queued!r}")
        self.max_queued = max_queued
        self.core = Core.open(self.config, style_cache_bytes=style_cache_bytes, graphs_kept=graphs_kept)
        self._cond = threading.Condition()  # the queue, the running batch and the closed flag
        self._device = threading.RLock()  # one batch on the device at a time (the worker, or stylize inline)
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._closed = False
        self._worker: Optional[threading.Thread] = None
        self._counts = {"batches": 0, "done": 0, "failed": 0, "cancelled": 0, "interrupted": 0}

    @property
    def runtime(self) -> Runtime:
        return self.core.runtime

    @property
    def extractor(self):
        return self.core.extractor

    @property
    def stats(self) -> dict:
        """Counters for monitoring and tests: style-feature cache hits/misses, graphs kept/reused, batches run
        by the worker, jobs by how they ended."""
        cache, pool = self.core.style_cache, self.core.steps_pool
        with self._cond:
            return {
                "queued": len(self._queue),
                "running": len(self._running),
                "style_hits": cache.hits if cache else 0,
                "style_misses": cache.misses if cache else 0,
                "style_cache_bytes": cache.bytes if cache else 0,
                "graph_captures": pool.captures if pool else 0,
                "graph_reuses": pool.reuses if pool else 0,
                **self._counts,
            }

    # ---------------------------------------------------------------------------------- submitting

    def submit(
        self,
        content: ImageLike,
        styles: Union[ImageLike, Sequence[ImageLike]],
        config: Optional[Config] = None,
        *,
        checkpoint: Optional[CheckpointPlan] = None,
        resume: Optional[dict] = None,
        time_limit: Optional[float] = None,
        control: Optional[Control] = None,
        on_event: Optional[Callable[[dict], None]] = None,
    ) -> Job:
        """Queue a job and return it at once; bad input or settings raise ``UserError`` and queue nothing.

        ``control`` (``engine.control.Control``, made from ``time_limit`` when not given) is the job's own:
        ``Job.cancel`` and ``Job.interrupt`` act through it, and its ``watch`` runs once per step.
        ``on_event``: called with each of the job's events (those ``Job.events`` gives), in order, from the
        thread that made it (the worker; ``cancel``'s or ``close``'s caller for a job that never ran). It
        should not raise: an exception from it fails the job's run like any other error.
        """
        config = config or self.config
        runtime = self.core.runtime_for(config)
        if control is None:
            control = Control(time_limit=time_limit)
        elif time_limit is not None:
            raise UserError("give time_limit or a control with its own time limit, not both")
        self._check_room()  # before the decoding, which may take a while
        decoded, masks, saving = prepare_jobs([(content, styles)], config, checkpoint is not None, resume)
        if saving is not None:
            saving.plan = checkpoint
        job = Job(
            engine=self,
            config=config,
            runtime=runtime,
            inputs=decoded[0],
            masks=masks,
            saving=saving,
            control=control,
            on_event=on_event,
        )
        with self._cond:
            self._check_room()
            self._queue.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="nst-engine", daemon=True)
                self._worker.start()
            self._cond.notify_all()
        return job

    def _check_room(self) -> None:
        with self._cond:
            if self._closed:
                raise UserError("this Engine is closed and takes no more jobs")
            if len(self._queue) >= self.max_queued:
                raise QueueFull(f"the queue is full ({self.max_queued} jobs waiting); try again later")

    def _unqueue(self, job: Job, state: JobState = JobState.CANCELLED) -> bool:
        with self._cond:
            if job not in self._queue:
                return False
            self._queue.remove(job)
        if state == JobState.INTERRUPTED:
            self._end(job, state, f"job {job.id} was interrupted before it started; submit it again")
        else:
            self._end(job, state)
        return True

    # ---------------------------------------------------------------------------------- the simple entry points

    def stylize(self, content, styles, config=None, **options) -> Result:
        """``engine.stylize`` on this Engine's core (see ``engine.api.stylize``)."""
        return self.stylize_batch([(content, styles)], config, **options)[0]

    def stylize_batch(self, jobs: Sequence[JobSpec], config: Optional[Config] = None, **options) -> list[Result]:
        """``Core.stylize_batch`` on this Engine's core, between the worker's batches; ``options`` are its keyword
        arguments (``callback``, ``on_result``, ``checkpoint``, ``resume``, ``control``).

        It runs in the caller's thread, so the callback is called there and exceptions (``Interrupted``,
        the callback's own) reach the caller as they are.
        """
        if self._closed:
            raise UserError("this Engine is closed and runs no more jobs")
        with self._device:
            return self.core.stylize_batch(jobs, config or self.config, **options)

    def run(self, batch: Batch) -> list[Result]:
        """``Core.run`` on this Engine's core, between the worker's batches, in the caller's thread: for callers
        that build their own ``Batch`` (a video's frames, each with its temporal term)."""
        if self._closed:
            raise UserError("this Engine is closed and runs no more jobs")
        with self._device:
            return self.core.run(batch)

    # ---------------------------------------------------------------------------------- the worker

    def _next_batch(self) -> Optional[list[Job]]:
        """The oldest queued job and the queued jobs that ``plan_batches`` would group with it (the same
        schedule, up to ``batch_size`` with Adam) and that share its settings; None once closed and empty.
        A job with checkpoints runs alone: its checkpoint holds one image."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed)
            if not self._queue:
                return None
            first = self._queue.popleft()
            candidates = [first]
            if first._saving is None:
                candidates += [j for j in self._queue if j._saving is None and j.config == first.config]
            members = plan_batches([job.schedule for job in candidates], first.config)[0]  # the first job's batch
            batch = [candidates[i] for i in members]
            for job in batch[1:]:
                self._queue.remove(job)
            for job in batch:
                job._start()
            self._running = batch
            self._counts["batches"] += 1
            return batch

    def _work(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            try:
                jobs[0]._context.run(self._run, jobs)
            except Exception as exc:  # a bug outside the run itself: the jobs end, the worker goes on
                for job in jobs:
                    self._end(job, JobState.FAILED, _sentence(exc, job))
            finally:
                self._idle()

    def _idle(self) -> None:
        with self._cond:
            self._running = []
            self._cond.notify_all()

    def _run(self, jobs: list[Job]) -> None:
        def on_step(info: StepInfo) -> None:
            image = info.image
            for k, job in enumerate(jobs):
                job._step(info, None if image is None else image[k].detach().float().cpu().clone())

        def watch() -> None:  # once per step: each job's own control (its watch, interrupt, cancel, time limit)
            alive = False
            for job in jobs:
                if job.state in TERMINAL:
                    continue
                if job.control.poll():
                    control.interrupt()  # a job with checkpoints runs alone: the batch is that job
                limit = job.control.time_limit
                if limit is not None and job.control.elapsed > limit:
                    self._end(
                        job,
                        JobState.FAILED,
                        f"the job ran past its time limit of {limit:g} s "
                        f"and was stopped after step {job.progress.step}",
                    )
                elif job.control.cancelled is not None:
                    self._end(job, JobState.CANCELLED)
                alive = alive or job.state not in TERMINAL
            if not alive:
                control.cancel("every job of the batch has ended")

        first = jobs[0]
        control = Control(watch=watch)
        batch = Batch(
            jobs=[job._inputs for job in jobs],
            config=first.config,
            runtime=first._runtime,
            masks=first._masks,
            callback=Callback(on_step, every=SYNC_EVERY, seconds=PREVIEW_SECONDS),
            indices=tuple(range(len(jobs))),
            saving=first._saving,
            control=control,
        )
        results, failure = None, None
        try:
            with self._device:
                results = self.core.run(batch)
        except Exception as exc:  # one job's failure is that job's; the engine goes on
            # Without its traceback: the frames would keep the failed run's tensors (after an OOM, all of them).
            failure = exc.with_traceback(None)
        self._idle()  # before the jobs end: whoever sees a job end sees the engine idle
        if isinstance(failure, Stopped):
            return
        if isinstance(failure, Interrupted):
            first._preview = failure.image[0].float().cpu()
            where = f"step {failure.step} of its scale; its checkpoint is {first._saving.plan.path}"
            self._end(first, JobState.INTERRUPTED, f"job {first.id} was interrupted after {where}")
        elif failure is not None:
            message = _sentence(failure, first)
            if is_out_of_memory(failure) and self.runtime.device.type == "cuda":
                torch.cuda.empty_cache()
            for job in jobs:
                self._end(job, JobState.FAILED, message, exception=failure)
        else:
            for job, result in zip(jobs, results):
                self._end(job, JobState.DONE, result=result)

    def _end(self, job: Job, state: JobState, error=None, result=None, exception=None) -> None:
        if job.state in TERMINAL:
            return
        job._finish(state, error, result, exception)
        with self._cond:
            self._counts[state.value] += 1

    # ---------------------------------------------------------------------------------- closing

    def close(self, *, cancel: bool = False, drain: bool = False, timeout: Optional[float] = None) -> None:
        """Take no more jobs and stop the worker.

        By default the running batch finishes and the jobs still queued end ``interrupted`` (never
        started: a service keeps them and submits them again); ``drain`` runs them first;
        ``cancel`` cancels the running batch after its current step and the queued jobs. ``timeout``:
        the longest wait for the worker (``TimeoutError`` after it).
        """
        with self._cond:
            self._closed = True
            waiting = [] if drain and not cancel else list(self._queue)
            for job in waiting:
                self._queue.remove(job)
            running = list(self._running)
            self._cond.notify_all()
        for job in waiting:
            if cancel:
                self._end(job, JobState.CANCELLED)
            else:
                self._end(job, JobState.INTERRUPTED, f"the engine closed before job {job.id} started; submit it again")
        if cancel:
            for job in running:
                job.control.cancel()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)
            if worker.is_alive():
                raise TimeoutError(f"the engine's running job did not finish within {timeout:g} s")
        self.core.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        # Leaving the block normally runs what was submitted; an exception cancels it.
        self.close(cancel=exc[0] is not None, drain=exc[0] is None)


def _sentence(exc: BaseException, job: Job) -> str:
    """A failure as one sentence for the job's ``error``."""
    if isinstance(exc, UserError):
        return str(exc)
    if is_out_of_memory(exc):
        p = job.progress
        # Before the first step the progress has no scales yet ("scale 1 of 0"): say where it was instead.
        where = (
            f"at step {p.step} of {p.total_steps} (scale {p.scale + 1} of {p.scales})"
            if p.scales
            else "before its first step (preparing the style targets or the first scale)"
        )
        return f"ran out of memory {where}; try a smaller {option('size')} or fewer {option('style_layers')}"
    text = " ".join(str(exc).split()) or "no message"
    return f"the job failed with an internal error ({type(exc).__name__}: {text})"
