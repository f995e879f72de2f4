"""The Python entry points: ``stylize(content, styles, config) -> Result`` and ``stylize_batch``.

Both run on a transient ``Engine`` (``engine.service``), built for the call and closed after it: one
code path for a script's single image, a folder, and a service's queue. A caller with many jobs to
run over time keeps an ``Engine`` instead, so that the runtime, the extractor, the style features
and (on CUDA) the captured graphs are made once.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from .checkpoint import CheckpointPlan
from .config import Config
from .images import ImageLike
from .optimize import StepInfo
from .runner import JobSpec, Result, build_extractor, loop_extractor, scale_objective
from .runtime import resolve_device
from .service import Engine
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
    callback: Optional[Callable[[StepInfo], None]] = None,
    checkpoint: Optional[CheckpointPlan] = None,
    resume: Optional[dict] = None,
    share: Optional[TileShare] = None,
) -> Result:
    """Repaint ``content`` in the style of ``styles`` (one image or several, blended).

    Images may be paths, PIL images, arrays or tensors. ``callback`` is called
    after every step with a ``StepInfo``; a plain function is called live
    (the losses are read from the device every step), an
    ``engine.optimize.Callback`` in groups. ``checkpoint``, ``resume`` and
    ``share``: see ``stylize_batch``.
    """
    return stylize_batch([(content, styles)], config, callback, checkpoint=checkpoint, resume=resume, share=share)[0]


def stylize_batch(
    jobs: Sequence[JobSpec],
    config: Optional[Config] = None,
    callback: Optional[Callable[[StepInfo], None]] = None,
    on_result: Optional[Callable[[int, Result], None]] = None,
    checkpoint: Optional[CheckpointPlan] = None,
    resume: Optional[dict] = None,
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

    ``checkpoint`` writes the run's state every ``checkpoint.every`` steps
    and, when ``checkpoint.should_stop()`` turns true, after the current step,
    before raising ``Interrupted``; ``resume`` (a loaded checkpoint) goes on
    from one. Both need a single job.

    ``share`` (``tiling.TileShare``, e.g. ``scale.tiled.ProcessShare``): this
    process is one of several that run the same call together, each
    computing its share of every step's tiles; all of them end with the same
    images, and only the leader writes or deletes checkpoints. It needs a
    tile size (``config.tile``), so that every scale is tiled.

    The jobs run in the caller's thread, on an ``Engine`` made for this call.
    """
    config = config or Config()
    # Nothing is kept past the call: no graphs (on CUDA a kept graph holds its memory while the next scale
    # runs), and only a little room for style features (a folder's batches share their style).
    with Engine(config, max_queued=0, style_cache_bytes=64 << 20, graphs_kept=0) as engine:
        return engine.stylize_batch(jobs, config, callback, on_result, checkpoint, resume, share)
