"""Many jobs over a Ray cluster: ``nst stylize FOLDER STYLE... -o OUTFOLDER --ray [ADDRESS]``.

One Ray actor per GPU (on a cluster without GPUs, one per ``cpus_per_worker``
cores), each holding an ``engine.Engine``: the weights, the extractor and the
style features are made once per worker, not per job. The driver groups the
jobs as a plain folder run does (same schedule, ``batch_size`` at a time), so
each job ends with the same image; it hands the batches out one at a time to
whichever worker is free, and each result comes back to the driver, which
calls ``on_result`` as it arrives (the CLI writes it atomically there, through
``engine.files``, and counts it on the progress bar).

The driver reads and decodes the inputs and sends pixels, so the workers need
no shared file system. Faults:

* a worker that dies (a killed actor, a lost node) fails its batch with
  ``RayActorError``: the batch goes back to the front of the queue, for
  another worker, and a new worker is started in its place (up to
  ``RESTARTS`` per worker);
* a job that fails on its own (an unreadable image, a size out of range, a
  loss that became NaN) fails alone with its one sentence: a batch that fails
  is run again one job at a time, so that only the bad job is lost;
* the CLI skips outputs that already exist, so the same command run again
  after a crash does only the rest.

Ray is an optional extra (``pip install 'nst-engine[ray]'``); this module is
imported only for ``--ray`` (through the ``nst.runners`` entry point) or by
callers who ask for it.
"""

from __future__ import annotations

import collections
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from PIL import Image

from engine.config import Config
from engine.core import JobSpec, Result, plan_batches
from engine.errors import UserError, plural
from engine.images import ImageLike, at_most, fit_long_side, load_image
from engine.schedule import build_schedule
from engine.sizes import min_side

RESTARTS = 2  # new workers started in place of dead ones, per worker asked for
WORKER_NAME = "nst-worker"  # actors are named WORKER_NAME-<run>-<k> (in the driver's namespace)


@dataclass(frozen=True)
class JobFailed:
    """A job that failed on its own: ``message`` is its one sentence."""

    index: int
    message: str


Outcome = Union[Result, JobFailed]


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray, an optional extra: pip install 'nst-engine[ray]'") from None
    return ray


def connect(ray, address: Optional[str]) -> bool:
    """Join the cluster at ``address`` unless the caller already has; True when this call did (and the caller
    shuts it down)."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, logging_level="warning")
    except (ConnectionError, ValueError, RuntimeError) as exc:
        detail = str(exc).split("\n")[0][:160]
        hint = "" if os.environ.get("RAY_AUTH_MODE") else "; a cluster that takes a token needs RAY_AUTH_MODE=token"
        raise UserError(f"could not reach the Ray cluster at {address or 'RAY_ADDRESS'} ({detail}){hint}") from None
    return True


class Worker:
    """The actor: one synchronous ``Core`` for the worker's life; ``run`` stylises one batch of decoded jobs."""

    def __init__(self, config: Config, threads: int):
        torch.set_num_threads(threads)
        from engine.core import Core

        self.config = config
        # The batches of a folder run share their style images: their features are kept for the next batch.
        self.core = Core.open(config, style_cache_bytes=256 << 20, graphs_kept=16)  # as an Engine keeps

    def run(self, batch: list[tuple[int, torch.Tensor, list]]) -> list[tuple[int, Optional[Result], str]]:
        """``[(index, content, style refs)]`` -> ``[(index, result or None, error sentence or "")]``."""
        ray = _ray()
        specs = [(content, ray.get(list(styles))) for _, content, styles in batch]
        try:
            results = self.core.stylize_batch(specs, self.config)
        except UserError as exc:
            if len(batch) == 1:
                return [(batch[0][0], None, str(exc))]
            return [out for job in batch for out in self.run([job])]  # find the bad job; the others go on
        return [(index, result, "") for (index, _, _), result in zip(batch, results)]


def stylize_on_ray(
    jobs: Sequence[JobSpec],
    config: Optional[Config] = None,
    address: Optional[str] = None,
    *,
    cpus_per_worker: int = 1,
    workers: Optional[int] = None,
    on_result: Optional[Callable[[int, Outcome], None]] = None,
) -> list[Outcome]:
    """Run ``(content, styles)`` jobs on a Ray cluster; one ``Result`` or ``JobFailed`` per job, in order.

    ``address``: the cluster to join (``ray.init``'s: ``auto``, ``host:port``, ``ray://host:10001``; None:
    ``RAY_ADDRESS``, else a local cluster of this machine's cores); ignored when the caller has already
    called ``ray.init``. ``workers``: at most this many actors (default: one per GPU of the cluster, else
    one per ``cpus_per_worker`` cores). ``on_result(index, outcome)`` is called in this thread as each
    job's outcome arrives.
    """
    config = config or Config()
    ray = _ray()
    if cpus_per_worker < 1:
        raise UserError(f"cpus_per_worker must be 1 or more, not {cpus_per_worker}")
    started_here = connect(ray, address)
    try:
        return _Run(
            ray=ray,
            jobs=list(jobs),
            config=config,
            cpus_per_worker=cpus_per_worker,
            workers=workers,
            on_result=on_result,
        ).run()
    finally:
        if started_here:
            ray.shutdown()


class _Run:
    def __init__(self, *, ray, jobs, config: Config, cpus_per_worker: int, workers: Optional[int], on_result):
        self.ray, self.jobs, self.config, self.on_result = ray, jobs, config, on_result
        self.outcomes: list[Optional[Outcome]] = [None] * len(jobs)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if config.device != "cpu" else 0
        if gpus:
            count, options, threads = gpus, {"num_gpus": 1, "num_cpus": 1}, 1
        else:
            cpus = int(resources.get("CPU", 1))
            count, options, threads = max(1, cpus // cpus_per_worker), {"num_cpus": cpus_per_worker}, cpus_per_worker
        self.count = min(count, workers or count)
        self.actor = ray.remote(max_restarts=0, max_task_retries=0, **options)(Worker)
        self.threads, self.name = threads, f"{WORKER_NAME}-{uuid.uuid4().hex[:8]}"
        self.started = 0
        self.styles: dict[str, object] = {}  # path -> object ref of the decoded style, put once

    def run(self) -> list[Outcome]:
        ray = self.ray
        pending = collections.deque(self._batches())
        idle = [self._start() for _ in range(min(self.count, len(pending)))]  # no more workers than batches
        running: dict = {}  # object ref -> (actor, batch)
        try:
            while pending or running:
                while pending and idle:
                    batch = self._decoded(pending.popleft())
                    if batch:
                        actor = idle.pop()
                        running[actor.run.remote(batch)] = (actor, batch)
                if not running:
                    break
                (ref,), _ = ray.wait(list(running), num_returns=1)
                actor, batch = running.pop(ref)
                try:
                    outs = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    # The worker died with the batch: another one (or its replacement) does it again.
                    pending.appendleft(batch)
                    if self.started < self.count * (1 + RESTARTS):
                        idle.append(self._start())
                    elif not idle and not running:
                        detail = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
                        raise UserError(
                            f"every Ray worker died ({self.started} started, the last with: {detail}); "
                            f"{plural(sum(len(b) for b in pending), 'job')} not done"
                        ) from None
                    continue
                except ray.exceptions.RayTaskError as exc:  # not the job's fault, nor the worker's death: a bug
                    detail = str(exc).strip().splitlines()[-1][:200]
                    outs = [(index, None, f"the worker failed ({detail})") for index, _, _ in batch]
                idle.append(actor)
                for index, result, error in outs:
                    self._done(index, result if result is not None else JobFailed(index, error))
        finally:
            for actor in idle + [a for a, _ in running.values()]:
                ray.kill(actor)
        return self.outcomes

    def _start(self):
        self.started += 1
        name = f"{self.name}-{self.started}"
        return self.actor.options(name=name).remote(self.config, self.threads)

    def _done(self, index: int, outcome: Outcome) -> None:
        self.outcomes[index] = outcome
        if self.on_result is not None:
            self.on_result(index, outcome)

    def _batches(self) -> list[list[int]]:
        """Job indices grouped as ``stylize_batch`` groups them (same schedule, ``batch_size`` at a time)."""
        need = min_side(self.config.model, self.config.feature_layers)
        indices, schedules = [], []
        for index, (content, _) in enumerate(self.jobs):
            try:
                height, width = _size(content)
            except UserError as exc:
                self._done(index, JobFailed(index, str(exc)))
                continue
            if max(height, width) > self.config.size:
                height, width = fit_long_side(height, width, self.config.size)
            try:
                schedules.append(
                    build_schedule(
                        height, width, self.config.size, self.config.min_size, 1, need, schedule=self.config.schedule
                    )
                )
            except UserError as exc:
                self._done(index, JobFailed(index, str(exc)))
                continue
            indices.append(index)
        return [[indices[k] for k in batch] for batch in plan_batches(schedules, self.config)]

    def _decoded(self, batch) -> list[tuple[int, torch.Tensor, list]]:
        """The batch's contents decoded (as ``stylize_batch`` would: shrunk to ``size``), styles as refs.

        A batch given back by a dead worker is already decoded. A job whose image cannot be read fails here.
        """
        if batch and not isinstance(batch[0], int):
            return batch
        out = []
        for index in batch:
            content, styles = self.jobs[index]
            try:
                image = at_most(load_image(content, "content image"), self.config.size)
                refs = [self._style(s) for s in (styles if isinstance(styles, (list, tuple)) else [styles])]
            except UserError as exc:
                self._done(index, JobFailed(index, str(exc)))
                continue
            out.append((index, image, refs))
        return out

    def _style(self, style: ImageLike):
        if not isinstance(style, (str, os.PathLike)):
            return self.ray.put(load_image(style, "style image"))
        key = os.fspath(style)
        if key not in self.styles:
            self.styles[key] = self.ray.put(load_image(style, "style image"))
        return self.styles[key]


def _size(content: ImageLike) -> tuple[int, int]:
    """``(H, W)`` of a content image as ``load_image`` will give it, from the header only for files."""
    if not isinstance(content, (str, os.PathLike)):
        return tuple(load_image(content, "content image").shape[-2:])
    try:
        with Image.open(content) as img:
            width, height = img.size
            rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
        return (width, height) if rotated else (height, width)
    except Exception:
        load_image(content, "content image")  # the same one sentence as a plain run
        raise


# ---------------------------------------------------------------------------------------------- the CLI


def run_folder(args, config: Config, jobs: Sequence[JobSpec], outputs: Sequence[Path]) -> int:
    """``nst stylize FOLDER ... --ray [ADDRESS]``: ``jobs`` and their ``outputs`` (those not written yet)."""
    started = time.perf_counter()
    written, failed = [], []
    bar = _JobBar(len(jobs), args.quiet)

    def on_result(index: int, outcome: Outcome) -> None:
        if isinstance(outcome, JobFailed):
            failed.append(index)
            bar.write(f"nst: {Path(jobs[index][0]).name}: {outcome.message}")
        else:
            written.append(outcome.save(outputs[index], overwrite=args.overwrite, bit_depth=args.bit_depth))
        bar.update()

    try:
        stylize_on_ray(jobs, config, args.ray or None, on_result=on_result)
    finally:
        bar.close()
    outdir = Path(outputs[0]).parent if outputs else Path(args.output)
    tail = f"; {plural(len(failed), 'image')} failed (see above)" if failed else ""
    print(f"wrote {plural(len(written), 'image')} to {outdir} in {time.perf_counter() - started:.1f} s{tail}")
    return 1 if failed else 0


class _JobBar:
    """Progress counted in jobs: a tqdm bar on a terminal, a line per job in a log, nothing with --quiet."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet, self.bar = total, 0, quiet, None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="job", desc="ray", dynamic_ncols=True, file=sys.stderr)

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif not self.quiet:
            print(f"ray: {self.done}/{self.total} jobs done", file=sys.stderr)

    def write(self, text: str) -> None:
        (self.bar.write if self.bar is not None else lambda t: print(t, file=sys.stderr))(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
