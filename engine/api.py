"""The Python entry points: ``stylize(content, styles, config) -> Result`` and ``stylize_batch``.

Both run on a transient ``Core`` (``engine.core``), opened for the call and closed after it, in the
caller's thread: one code path for a script's single image, a folder, a Ray worker's batch and a
torchrun rank. A caller with many jobs to run over time keeps a ``Core`` (synchronous) or an ``Engine``
(a queue and a worker thread over one), so that the runtime, the extractor, the style features and
(on CUDA) the captured graphs are made once.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from .checkpoint import CheckpointPlan
from .config import Config
from .control import Control
from .core import Core, JobSpec, Result, build_extractor, loop_extractor, scale_objective
from .images import ImageLike
from .optimize import StepInfo
from .runtime import resolve_device
from .tiling import TileShare

__all__ = [
    "Result",
    "build_extractor",
    "loop_extractor",
    "resolve_device",
    "scale_objective",
    "stylize",
    "stylize_batch",
]


def stylize(
    content: ImageLike,
    styles: Union[ImageLike, Sequence[ImageLike]],
    config: Optional[Config] = None,
    *,
    callback: Optional[Callable[[StepInfo], None]] = None,
    checkpoint: Optional[CheckpointPlan] = None,
    resume: Optional[dict] = None,
    control: Optional[Control] = None,
    share: Optional[TileShare] = None,
) -> Result:
    """Repaint ``content`` in the style of ``styles`` (one image or several, blended).

    Images may be paths, PIL images, arrays or tensors. ``callback`` is called
    after every step with a ``StepInfo``; a plain function is called live
    (the losses are read from the device every step), an
    ``engine.optimize.Callback`` in groups. ``checkpoint``, ``resume``,
    ``control`` and ``share``: see ``stylize_batch``.
    """
    return stylize_batch(
        [(content, styles)],
        config,
        callback=callback,
        checkpoint=checkpoint,
        resume=resume,
        control=control,
        share=share,
    )[0]


def stylize_batch(
    jobs: Sequence[JobSpec],
    config: Optional[Config] = None,
    *,
    callback: Optional[Callable[[StepInfo], None]] = None,
    on_result: Optional[Callable[[int, Result], None]] = None,
    checkpoint: Optional[CheckpointPlan] = None,
    resume: Optional[dict] = None,
    control: Optional[Control] = None,
    share: Optional[TileShare] = None,
) -> list[Result]:
    """Run several ``(content, styles)`` jobs; one ``Result`` per job, in order.

    Jobs whose contents have the same size share the extractor: up to
    ``config.batch_size`` of them are optimised together, one forward and
    backward per step for the whole batch. Each job's loss is its own (the
    batch loss is their sum), and Adam moves each pixel independently, so a
    job ends where it would alone, up to floating-point summation order.
    L-BFGS couples the jobs through its line search, so it runs one job at a time.
    ``on_result(index, result)`` is called as soon as a job is done.

    ``control`` (``engine.control.Control``) stops the run from outside, after a whole step: its
    ``interrupt()`` raises ``Interrupted`` (after writing a checkpoint, with ``checkpoint``), its
    ``cancel()`` or time limit raises ``Stopped``. ``checkpoint`` also writes the run's state every
    ``checkpoint.every`` steps; ``resume`` (a loaded checkpoint) goes on from one. Both need a single job.

    ``share`` (``tiling.TileShare``, e.g. ``scale.tiled.ProcessShare``): this
    process is one of several that run the same call together, each
    computing its share of every step's tiles; all of them end with the same
    images, and only the leader writes or deletes checkpoints. It needs a
    tile size (``config.tile``), so that every scale is tiled.
    """
    config = config or Config()
    # Nothing is kept past the call: no graphs (on CUDA a kept graph holds its memory while the next scale
    # runs), and only a little room for style features (a folder's batches share their style).
    core = Core.open(config, style_cache_bytes=64 << 20, graphs_kept=0, share=share)
    try:
        return core.stylize_batch(
            jobs, config, callback=callback, on_result=on_result, checkpoint=checkpoint, resume=resume, control=control
        )
    finally:
        core.close()
