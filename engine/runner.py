"""How jobs run: the one code path under ``stylize()``, ``stylize_batch()`` and ``Engine``.

Three small objects, from the longest-lived to the shortest:

* ``Session``: what stays the same for every job of a run or of a service's life: the runtime
  (device, precision, layout), the extractor, the cache of style features, the kept CUDA graphs.
* ``Batch``: jobs of one size optimised together through every scale, with one config, one
  callback and, for a single job, its checkpoints (``Saving``).
* ``optimize.ScaleProblem``: one scale of a batch (``run_batch`` builds one per scale).

``run_batch(session, batch)`` is the only function that runs the optimisation; ``run_jobs`` groups
jobs into batches for ``stylize_batch``, and ``service.Engine``'s worker builds its batches from its queue.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from . import checkpoint as ckpt
from . import color
from .checkpoint import CheckpointPlan
from .config import INITS, Config
from .criterion import StyleFeatureCache, build_criterion
from .errors import UserError, option, plural
from .images import ImageLike, fit_long_side, load_image, resize, save_image, to_pil
from .memory import MemoryPlan, plan_scale
from .optimize import (
    SYNC_EVERY,
    Callback,
    Checkpointing,
    Objective,
    Reporting,
    ScaleProblem,
    StepInfo,
    StepPool,
    optimize_scale,
)
from .runtime import Runtime, resolve_device, resolve_runtime
from .schedule import Scale, build_schedule
from .sizes import check_size, style_size
from .sizes import min_side as network_min_side
from .style_losses import SlicedOTStyleLoss
from .tiling import TiledObjective, TileShare
from .vgg import BlockCheckpointed, VGGFeatures, conv_shapes, truncated_names
from .weights import load_weights

JobSpec = tuple[ImageLike, Union[ImageLike, Sequence[ImageLike]]]  # (content, style or styles)


@dataclass
class Result:
    """The stylised image, ``(3, H, W)`` float32 on the CPU in [0, 1], and how it was made."""

    image: torch.Tensor
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    config: Optional[Config] = None

    def to_pil(self):
        return to_pil(self.image)

    def save(self, path: Union[str, os.PathLike], overwrite: bool = False, bit_depth: int = 8):
        return save_image(self.image, path, overwrite=overwrite, bit_depth=bit_depth)


def build_extractor(config: Config, device: Optional[torch.device] = None) -> VGGFeatures:
    """The truncated VGG for ``config``'s layers and weights, on ``device`` (eager, float32, contiguous)."""
    needed = [n for n in truncated_names(config.model, config.feature_layers) if n in conv_shapes(config.model)]
    convs, normalize = load_weights(config.model, config.weights, config.preprocess, needed)
    extractor = VGGFeatures(config.model, convs, normalize, config.feature_layers, config.pooling, config.padding)
    return extractor.to(device or resolve_device(config.device))


def loop_extractor(config: Config, runtime: Optional[Runtime] = None) -> Callable:
    """The extractor the optimisation runs on: laid out for ``runtime``, eager or TorchScript as configured."""
    runtime = runtime or resolve_runtime(config)
    extractor = runtime.prepare(build_extractor(config, runtime.device))
    if config.backend == "torchscript":
        # export/ builds on engine/, so it is imported only here, when asked for.
        from export.torchscript import cached

        return cached(extractor)
    return extractor


@dataclass
class Session:
    """The resources every job of a run (or of an ``Engine``'s life) shares; built once by ``open``."""

    config: Config  # the settings the extractor and runtime were made from
    runtime: Runtime
    extractor: Callable
    min_side: int
    style_cache: Optional[StyleFeatureCache] = None
    steps_pool: Optional[StepPool] = None

    @classmethod
    def open(cls, config: Config, style_bytes: int = 0, graphs: int = 0) -> "Session":
        """Resolve the runtime and build the extractor; keep up to ``style_bytes`` of style features and
        ``graphs`` captured CUDA graphs for later jobs (0: none)."""
        runtime = resolve_runtime(config)
        return cls(
            config,
            runtime,
            loop_extractor(config, runtime),
            network_min_side(config.model, config.feature_layers),
            StyleFeatureCache(style_bytes) if style_bytes else None,
            StepPool(graphs) if graphs and runtime.cuda_graphs else None,
        )


@dataclass
class JobInput:
    """One job's decoded images."""

    content: torch.Tensor  # what is optimised against (grey in luminance mode)
    styles: list[torch.Tensor]
    blend: tuple[float, ...]
    colours: Optional[torch.Tensor] = None  # luminance mode: the content whose chroma the result gets
    init: Optional[torch.Tensor] = None  # the decoded --init image file, if one is given

    def schedule(self, config: Config, min_side: int) -> list[Scale]:
        return build_schedule(*self.content.shape[-2:], config.size, config.min_size, config.steps, min_side)


@dataclass
class Saving:
    """A single job's checkpoints: where they go (``plan``), what they were made from, where to resume."""

    plan: Optional[CheckpointPlan]
    inputs: dict  # SHA-256 digests of the decoded inputs
    resume: Optional[dict] = None


@dataclass
class Batch:
    """Same-size jobs optimised together through every scale.

    ``after_step()`` runs after every step on the host (raising stops the batch: a cancel, a time
    limit); ``runtime`` is the job config's (its graph and layout decisions) on the session's device.
    """

    jobs: list[JobInput]
    config: Config
    schedule: list[Scale]
    runtime: Runtime
    masks: Optional[torch.Tensor] = None
    callback: Optional[Callable[[StepInfo], None]] = None
    indices: tuple[int, ...] = (0,)  # the jobs' places in the caller's list, for StepInfo.jobs
    saving: Optional[Saving] = None
    after_step: Callable[[], None] = lambda: None
    share: Optional[TileShare] = None  # processes computing these jobs together (see stylize_batch)
    # Extra image terms for this batch, made per scale: ``(height, width) -> {name: (weight, term)}`` with
    # one target per job (see losses.StyleTransferLoss's ``extra``); video/ brings its temporal term this way.
    extra_terms: Optional[Callable[[int, int], dict]] = None


def prepare_jobs(
    specs: Sequence[JobSpec], config: Config, saving: bool = False, resume: Optional[dict] = None
) -> tuple[list[JobInput], Optional[torch.Tensor], Optional[Saving]]:
    """Decode and check every input before any work: ``(jobs, masks, saving)``; bad input is a UserError.

    ``saving`` (or ``resume``): the run writes or reads checkpoints, which needs a single job.
    """
    if not specs:
        raise UserError("no job to run: give at least one content image")
    if (saving or resume is not None) and len(specs) != 1:
        raise UserError("checkpoints and resuming work with one content image at a time, not with a folder")
    decoded = decode_jobs(specs, config)
    if config.init not in INITS and resume is None:  # a resumed run never needs its init image again
        start = load_image(config.init, "init image")
        for job in decoded:
            job.init = start
    masks = load_masks(config)
    plan = None
    if saving or resume is not None:
        inputs = ckpt.input_digests(decoded[0].content, decoded[0].styles, masks)
        if resume is not None:
            ckpt.check_compatible(resume, config, inputs, resume.get("path", "checkpoint"))
        plan = Saving(None, inputs, resume)
    return decoded, masks, plan


def run_jobs(
    session: Session,
    specs: Sequence[JobSpec],
    config: Config,
    runtime: Runtime,
    callback: Optional[Callable[[StepInfo], None]] = None,
    on_result: Optional[Callable[[int, Result], None]] = None,
    checkpoint: Optional[CheckpointPlan] = None,
    resume: Optional[dict] = None,
    share: Optional[TileShare] = None,
) -> list[Result]:
    """``stylize_batch``'s work on ``session``: jobs grouped by size into batches, one ``run_batch`` each."""
    if share is not None and not config.tile.isdigit():
        raise UserError(
            f"{option('tile')} must be a tile size in pixels when processes share the image, not {config.tile!r}"
        )
    if share is not None and checkpoint is not None:
        # One process alone stopping would leave the others waiting for it: a stop is everyone's or no one's.
        asked = checkpoint.should_stop
        checkpoint = dataclasses.replace(checkpoint, should_stop=lambda: share.any(asked()))
    decoded, masks, saving = prepare_jobs(specs, config, checkpoint is not None, resume)
    if saving is not None:
        saving.plan = checkpoint
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(decoded):
        groups.setdefault(tuple(job.schedule(config, session.min_side)), []).append(index)
    per_batch = config.batch_size if config.optimizer == "adam" else 1
    results: list[Optional[Result]] = [None] * len(decoded)
    for schedule, members in groups.items():
        for start in range(0, len(members), per_batch):
            chunk = members[start : start + per_batch]
            batch = Batch(
                [decoded[i] for i in chunk],
                config,
                list(schedule),
                runtime,
                masks,
                callback,
                tuple(chunk),
                saving,
                share=share,
            )
            for i, result in zip(chunk, run_batch(session, batch)):
                results[i] = result
                if on_result is not None:
                    on_result(i, result)
    return results


def run_batch(session: Session, batch: Batch) -> list[Result]:
    """Optimise a batch of same-size jobs through every scale; one ``Result`` per job.

    A single job with checkpoints: the checkpoint it was given or resumed from is removed once the
    job is done (it could only repeat it).
    """
    started = time.perf_counter()
    config, runtime, jobs = batch.config, batch.runtime, batch.jobs
    leader = batch.share is None or batch.share.leader  # of processes sharing the jobs, only one writes files
    saving = batch.saving or Saving(None, {}, None)
    plan, resume = saving.plan, saving.resume
    history: list[dict] = [dict(h) for h in resume["history"]] if resume else []
    total_steps = sum(s.steps for s in batch.schedule)
    every, seconds, image_due = _reporting(batch.callback)
    image = None
    carry = None  # Adam's state and the average, handed from each scale to the next
    done = 0  # steps of the scales before this one
    for scale in batch.schedule:
        if resume is not None and scale.index < resume["scale"]:
            done += scale.steps
            continue
        size = (scale.height, scale.width)
        content = runtime.layout(torch.stack([resize(job.content, size) for job in jobs]))
        scale_resume = resume if resume is not None and scale.index == resume["scale"] else None
        if scale_resume is not None:
            image = runtime.layout(resume["image"])
        elif image is None:
            image = runtime.layout(
                torch.cat([initial_image(config, c[None], job.init) for c, job in zip(content.cpu(), jobs)])
            )
        else:
            image = runtime.layout(resize(image, size))
        scale_masks = None if batch.masks is None else resize(batch.masks, size).to(runtime.device)
        styles = [(job.styles, job.blend) for job in jobs]
        extractor = session.extractor
        memory = plan_scale(config, runtime, *size, len(jobs), checkpointable=isinstance(extractor, VGGFeatures))
        criterion = build_criterion(
            config,
            extractor,
            content,
            styles,
            session.min_side,
            runtime,
            scale_masks,
            tiling=memory.tiling,
            style_cache=session.style_cache,
            extra_terms=None
            if batch.extra_terms is None
            else {k: (w, term.to(runtime.device)) for k, (w, term) in batch.extra_terms(*size).items()},
        )
        objective = scale_objective(memory, extractor, criterion, runtime, size, batch.share)
        generators = [m.generator for m in criterion.style.values() if isinstance(m, SlicedOTStyleLoss)]
        if scale_resume is not None:
            ckpt.restore_generators(generators, resume)

        def on_step(i, loss, parts, current, scale=scale):
            history.append({"scale": scale.index, "step": i, "loss": loss, **parts})
            if batch.callback is not None:
                batch.callback(
                    StepInfo(
                        scale.index,
                        len(batch.schedule),
                        scale.height,
                        scale.width,
                        i,
                        scale.steps,
                        len(history),
                        total_steps,
                        loss,
                        dict(parts),
                        current,
                        batch.indices,
                    )
                )

        def save_state(state, scale=scale, generators=generators):
            if not leader:
                return
            ckpt.save(
                plan.path,
                {
                    **state,
                    "scale": scale.index,
                    "config": ckpt.config_state(config),
                    "inputs": saving.inputs,
                    "history": [dict(h) for h in history],
                    "generators": [g.get_state() for g in generators],
                    "generator_device": runtime.device.type,
                    "cli": plan.extra,
                },
            )

        image, carry = optimize_scale(
            ScaleProblem(
                image,
                objective,
                scale.steps,
                config.optimizer,
                config.lr,
                config.ema_decay,
                runtime,
                Reporting(on_step, every, seconds, lambda i, done=done: image_due(done + i)),
                Checkpointing(
                    save_state if plan is not None else None,
                    lambda i, done=done: bool(plan.every) and (done + i) % plan.every == 0,
                    plan.should_stop if plan is not None else (lambda: False),
                    scale_resume,
                ),
                after_step=lambda i: batch.after_step(),
                steps_pool=session.steps_pool,
                carry=carry,
            )
        )
        done += scale.steps
    images = [im.float().cpu().contiguous() for im in image]
    for k, job in enumerate(jobs):
        if job.colours is not None:  # luminance mode: the result's Y with the content's chroma
            images[k] = color.join_luminance(images[k], resize(job.colours, tuple(images[k].shape[-2:])))
    seconds = time.perf_counter() - started
    # The job is done: a checkpoint of it, written now or resumed from, could only repeat it.
    done_with = [plan.path if plan is not None else None, (resume or {}).get("path")]
    for path in dict.fromkeys(p for p in done_with if p and leader):
        if os.path.isfile(path):
            os.unlink(path)
    return [Result(im, history, seconds, config) for im in images]


def decode_jobs(specs: Sequence[JobSpec], config: Config) -> list[JobInput]:
    """Every job's images as tensors, colour mode applied; a file used by many jobs is decoded once."""
    cache: dict[str, torch.Tensor] = {}

    def load(source, what):
        if isinstance(source, (str, os.PathLike)):
            key = os.fspath(source)
            if key not in cache:
                cache[key] = load_image(source, what)
            return cache[key]
        return load_image(source, what)

    decoded = []
    for content, styles in specs:
        style_list = list(styles) if isinstance(styles, (list, tuple)) else [styles]
        if not style_list:
            raise UserError("at least one style image is needed")
        blend = config.style_blend_weights or (1.0,) * len(style_list)
        if len(blend) != len(style_list):
            raise UserError(
                f"{option('style_blend_weights')} has {plural(len(blend), 'value')} but there "
                f"{'is' if len(style_list) == 1 else 'are'} {plural(len(style_list), 'style image')}"
            )
        if config.style_masks is not None and len(config.style_masks) != len(style_list):
            raise UserError(
                f"{option('style_masks')} has {plural(len(config.style_masks), 'mask')} but there "
                f"{'is' if len(style_list) == 1 else 'are'} {plural(len(style_list), 'style image')}"
            )
        content_t = load(content, "content image")
        check_size(config, *fit_long_side(*content_t.shape[-2:], config.size), "the output")
        if max(content_t.shape[-2:]) > config.size:
            # Only ever used at the output size or below: keeping the full-size decode of every photo in a
            # folder would cost N x (camera resolution) of memory instead of N x size^2.
            content_t = resize(content_t, fit_long_side(*content_t.shape[-2:], config.size))
        job = JobInput(content_t, [load(s, "style image") for s in style_list], tuple(blend))
        need = network_min_side(config.model, config.feature_layers)
        for number, style in enumerate(job.styles, start=1):
            # The largest a style image gets: at the last scale, whose long side is config.size.
            hw = style_size(*style.shape[-2:], round(config.style_ratio * config.size), need)
            check_size(
                config,
                *hw,
                f"style image {number}" if len(job.styles) > 1 else "the style image",
                advice=f"use a larger {option('style_scale')} or {option('style_size')}",
            )
        if config.preserve_colors == "histogram":
            job.styles = [color.match_colours(s, job.content) for s in job.styles]
        elif config.preserve_colors == "luminance":
            job.colours = job.content
            pairs = [color.luminance_pair(job.content, s) for s in job.styles]
            job.content, job.styles = pairs[0][0], [style for _, style in pairs]
        decoded.append(job)
    return decoded


def load_masks(config: Config) -> Optional[torch.Tensor]:
    """The style masks as one ``(S, 1, H, W)`` tensor in [0, 1] (all resized to the first's size)."""
    if config.style_masks is None:
        return None
    masks = [load_image(path, "style mask").mean(0, keepdim=True) for path in config.style_masks]
    size = tuple(masks[0].shape[-2:])
    return torch.stack([resize(m, size) for m in masks])


def _reporting(callback) -> tuple[int, float, Callable[[int], bool]]:
    """How often the losses are read for ``callback``: ``(steps, seconds, steps with an image)``."""
    if isinstance(callback, Callback):
        return callback.every, callback.seconds, callback.image_due
    never = lambda total_step: False  # noqa: E731
    return (SYNC_EVERY, 0.0, never) if callback is None else (1, 0.0, never)  # a plain function: live


def scale_objective(
    memory: MemoryPlan,
    extractor,
    criterion,
    runtime: Runtime,
    size: tuple[int, int],
    share: Optional[TileShare] = None,
):
    """The objective of one scale of ``size``, run as ``memory`` plans: untiled, checkpointed or tiled
    (this process's ``share`` of the tiles, if several processes share the image)."""
    if memory.mode == "tiled":
        return TiledObjective(extractor, criterion, memory.tiling.grid(*size), runtime.autocast, share)
    if memory.mode == "checkpoint":
        if not isinstance(extractor, VGGFeatures):
            raise UserError("tile 'checkpoint' needs the eager extractor; use backend eager, or a tile size")
        return Objective(BlockCheckpointed(extractor), criterion, runtime.autocast)
    return Objective(extractor, criterion, runtime.autocast)


def initial_image(config: Config, content: torch.Tensor, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The starting image of one job; noise is seeded per job, so batching does not change it.

    ``start`` is the decoded ``config.init`` file, if it names one: resized to the content's size.
    """
    if start is not None:
        return resize(start, tuple(content.shape[-2:]))[None]
    if config.init == "content":
        return content.clone()
    if config.init == "gray":
        return torch.full_like(content, 0.5)
    return torch.rand(content.shape, generator=torch.Generator().manual_seed(config.seed))
