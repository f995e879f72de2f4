"""The synchronous core: the one code path under ``stylize()``, the CLI, ``Engine``, Ray workers and torchrun ranks.

Three small objects, from the longest-lived to the shortest:

* ``Core``: what stays the same for every job of a run or of a service's life: the runtime (device,
  precision, layout, decided once here), the extractor, the cache of style features, the kept CUDA
  graphs, and the processes sharing each step's tiles (``share``), if any.
* ``Batch``: jobs of one size optimised together through every scale, with one config, one callback,
  one ``Control`` and, for a single job, its checkpoints (``Saving``).
* ``optimize.ScaleProblem``: one scale of a batch (``Core.run`` builds one per scale).

``Core.run(batch)`` is the only function that runs the optimisation, to the end, in the caller's thread.
``plan_batches`` is the one grouping of jobs into batches: ``Core.stylize_batch`` (scripts, CLI folders),
``service.Engine``'s queue (a thin threaded wrapper over a ``Core``) and the Ray driver all use it.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Sequence, Union

import torch

from . import checkpoint as ckpt
from . import color
from .checkpoint import CheckpointPlan
from .config import EXTRACTOR_FIELDS, INITS, RUNTIME_FIELDS, Config
from .control import Control
from .criterion import StyleFeatureCache, build_criterion
from .errors import UserError, option, plural
from .images import ImageLike, at_most, fit_long_side, load_image, resize, save_image, to_pil
from .job_memory import style_shape
from .memory import MemoryPlan, plan_scale, resolve_style_loss
from .optimize import (
    SYNC_EVERY,
    Callback,
    Checkpointing,
    Objective,
    Plateau,
    Reporting,
    ScaleProblem,
    StepInfo,
    StepPool,
    optimize_scale,
)
from .runtime import Runtime, decide_runtime, resolve_device, resolve_runtime, set_flags
from .schedule import Scale, build_schedule
from .sizes import check_size, style_size
from .sizes import min_side as network_min_side
from .tiling import TiledObjective, TileShare
from .vgg import BlockCheckpointed, VGGFeatures, conv_shapes, truncated_names
from .weights import load_weights

JobSpec = tuple[ImageLike, Union[ImageLike, Sequence[ImageLike]]]  # (content, style or styles)
# Settings the extractor and runtime are built from: every job a Core runs must ask for the Core's.
FIXED = EXTRACTOR_FIELDS + RUNTIME_FIELDS


@dataclass(kw_only=True)
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
    extractor = VGGFeatures(
        model=config.model,
        convs=convs,
        normalize=normalize,
        layers=config.feature_layers,
        pooling=config.pooling,
        padding=config.padding,
    )
    return extractor.to(device or resolve_device(config.device))


def loop_extractor(config: Config, runtime: Optional[Runtime] = None) -> Callable:
    """The extractor the optimisation runs on: laid out for ``runtime``, eager or TorchScript as configured."""
    runtime = runtime or resolve_runtime(config)
    extractor = runtime.prepare(build_extractor(config, runtime.device))
    if config.backend != "eager":
        return _backend(config.backend)(extractor)
    return extractor


def _backend(name: str) -> Callable:
    """The function that turns the eager extractor into backend ``name``'s: export/ registers its own through
    the ``nst.backends`` entry point, since export/ builds on engine/ and engine/ never imports it."""
    from importlib.metadata import entry_points

    found = [e for e in entry_points(group="nst.backends") if e.name == name]
    if not found:
        raise UserError(f"{option('backend')} {name!r} is not installed here; reinstall nst-engine (pip install -e .)")
    return found[0].load()


@dataclass(kw_only=True)
class Core:
    """The resources every job of a run (or of an ``Engine``'s life) shares; built once by ``open``.

    ``share`` (``tiling.TileShare``, e.g. ``scale.tiled.ProcessShare``): this process is one of several
    that run the same jobs together, each computing its share of every step's tiles; all of them end
    with the same images, and only the leader writes or deletes files.
    """

    _open: ClassVar[dict[int, str]] = {}  # the precision of every open Core on CUDA: they share the process's flags
    _open_lock: ClassVar[threading.Lock] = threading.Lock()

    config: Config  # the settings the extractor and runtime were made from
    runtime: Runtime
    extractor: Callable
    min_side: int
    style_cache: Optional[StyleFeatureCache] = None
    steps_pool: Optional[StepPool] = None
    share: Optional[TileShare] = None

    @classmethod
    def open(
        cls, config: Config, *, style_cache_bytes: int = 0, graphs_kept: int = 0, share: Optional[TileShare] = None
    ) -> "Core":
        """Decide the runtime and build the extractor; keep up to ``style_cache_bytes`` of style features and
        ``graphs_kept`` captured CUDA graphs for later jobs (0: none)."""
        if share is not None and not config.tile.isdigit():
            raise UserError(
                f"{option('tile')} must be a tile size in pixels when processes share the image, not {config.tile!r}"
            )
        # The runtime sets torch's TF32 and cuDNN flags, which belong to the process: a second open Core on
        # CUDA with another precision would switch them under the first, so it is refused.
        runtime = decide_runtime(config)  # the one decision: each job's runtime_for only varies it per optimiser
        with cls._open_lock:
            other = next((p for p in cls._open.values() if p != runtime.precision), None)
            if runtime.device.type == "cuda" and other is not None:
                raise UserError(
                    f"an open Engine with {option('precision')} {other!r} set this process's CUDA math flags; "
                    f"one with {runtime.precision!r} would change them under it (close it first)"
                )
        set_flags(runtime)
        core = cls(
            config=config,
            runtime=runtime,
            extractor=loop_extractor(config, runtime),
            min_side=network_min_side(config.model, config.feature_layers),
            style_cache=StyleFeatureCache(style_cache_bytes) if style_cache_bytes else None,
            steps_pool=StepPool(graphs_kept) if graphs_kept and runtime.cuda_graphs else None,
            share=share,
        )
        if runtime.device.type == "cuda":
            with cls._open_lock:
                cls._open[id(core)] = runtime.precision
        return core

    def close(self) -> None:
        """Drop the kept style features and graphs, and the claim on the process's CUDA flags."""
        if self.style_cache is not None:
            self.style_cache.clear()
        if self.steps_pool is not None:
            self.steps_pool.clear()
        with Core._open_lock:
            Core._open.pop(id(self), None)

    def runtime_for(self, config: Config) -> Runtime:
        """A job's runtime on this core's device (its graph and layout choices); refuses settings the core fixed."""
        for name in FIXED:
            if getattr(config, name) != getattr(self.config, name):
                raise UserError(
                    f"{option(name)} is {getattr(config, name)!r} but this engine was built with "
                    f"{getattr(self.config, name)!r}; a job may change every setting but {', '.join(FIXED)}"
                )
        missing = [n for n in config.feature_layers if n not in self.config.feature_layers]
        if missing:  # e.g. the structure term's layers, beyond the style layers this engine was built for
            raise UserError(
                f"this job reads layer {missing[0]}, which this engine's network does not compute; build the engine "
                f"with the job's {option('structure_weight')} (or {option('style_layers')} that include it)"
            )
        runtime = decide_runtime(config, self.runtime.device)
        if runtime.channels_last != self.runtime.channels_last:
            raise UserError(
                f"{option('optimizer')} {config.optimizer!r} needs another memory layout than this engine's "
                f"({config.memory_format!r} with {self.config.optimizer!r}); build the engine with "
                f"{option('memory_format')} contiguous to mix optimizers"
            )
        return runtime

    def stylize_batch(
        self,
        specs: Sequence[JobSpec],
        config: Optional[Config] = None,
        *,
        callback: Optional[Callable[[StepInfo], None]] = None,
        on_result: Optional[Callable[[int, Result], None]] = None,
        checkpoint: Optional[CheckpointPlan] = None,
        resume: Optional[dict] = None,
        control: Optional[Control] = None,
    ) -> list[Result]:
        """``engine.stylize_batch`` on this core: jobs decoded and checked, planned into batches, each run."""
        config = config or self.config
        runtime = self.runtime_for(config)
        decoded, masks, saving = prepare_jobs(specs, config, checkpoint is not None, resume)
        if saving is not None:
            saving.plan = checkpoint
        control = control or Control()
        results: list[Optional[Result]] = [None] * len(decoded)
        for members in plan_batches([job.schedule(config, self.min_side) for job in decoded], config):
            batch = Batch(
                jobs=[decoded[i] for i in members],
                config=config,
                runtime=runtime,
                masks=masks,
                callback=callback,
                indices=tuple(members),
                saving=saving,
                control=control,
            )
            for i, result in zip(members, self.run(batch)):
                results[i] = result
                if on_result is not None:
                    on_result(i, result)
        return results

    def run(self, batch: "Batch") -> list[Result]:
        """Optimise a batch of same-size jobs through every scale, to the end; one ``Result`` per job."""
        return run_batch(self, batch)


@dataclass(kw_only=True)
class JobInput:
    """One job's decoded images."""

    content: torch.Tensor  # what is optimised against (grey in luminance mode)
    styles: list[torch.Tensor]
    blend: tuple[float, ...]
    colours: Optional[torch.Tensor] = None  # luminance mode: the content whose chroma the result gets
    init: Optional[torch.Tensor] = None  # the decoded --init image file, if one is given

    def schedule(self, config: Config, min_side: int) -> list[Scale]:
        return build_schedule(
            *self.content.shape[-2:], config.size, config.min_size, config.steps, min_side, schedule=config.schedule
        )

    def with_colours(self, image: torch.Tensor) -> torch.Tensor:
        """A result (or preview) of this job as the user sees it: in luminance mode, with the content's chroma."""
        if self.colours is None:
            return image
        return color.join_luminance(image, resize(self.colours, tuple(image.shape[-2:])))


@dataclass
class Saving:
    """A single job's checkpoints: where they go (``plan``), what they were made from, where to resume."""

    plan: Optional[CheckpointPlan]
    inputs: dict  # SHA-256 digests of the decoded inputs
    resume: Optional[dict] = None


@dataclass(kw_only=True)
class Batch:
    """Same-size jobs optimised together through every scale (made by ``plan_batches``' grouping).

    ``runtime`` is the job config's (its graph and layout decisions) on the core's device; ``control``
    stops the batch from outside (see ``engine.control``).
    """

    jobs: list[JobInput]
    config: Config
    runtime: Runtime
    masks: Optional[torch.Tensor] = None
    callback: Optional[Callable[[StepInfo], None]] = None
    indices: tuple[int, ...] = (0,)  # the jobs' places in the caller's list, for StepInfo.jobs
    saving: Optional[Saving] = None
    control: Control = field(default_factory=Control)
    schedule: Optional[list[Scale]] = None  # None: the jobs' own coarse-to-fine schedule (from config)
    # Image terms beside content, style and TV, made per scale: ``(height, width) -> {name: (weight, term)}`` with
    # one target per job (see ``losses.StyleTransferLoss``'s ``extra``); video/ brings its temporal term this way.
    extra_terms: Optional[Callable[[int, int], dict]] = None

    def scales(self, min_side: int) -> list[Scale]:
        return self.schedule or self.jobs[0].schedule(self.config, min_side)


def plan_batches(schedules: Sequence[Sequence[Scale]], config: Config) -> list[list[int]]:
    """Jobs, given by their schedules, grouped into batches of indices: the same schedule (so the same size
    at every scale), in order of first appearance, at most ``config.batch_size`` together with Adam (L-BFGS
    couples a batch's jobs through its line search, so it runs one at a time)."""
    groups: dict[tuple, list[int]] = {}
    for index, schedule in enumerate(schedules):
        groups.setdefault(tuple(schedule), []).append(index)
    per_batch = config.batch_size if config.optimizer == "adam" else 1
    return [members[i : i + per_batch] for members in groups.values() for i in range(0, len(members), per_batch)]


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


def run_batch(core: Core, batch: Batch) -> list[Result]:
    """``Core.run``: optimise a batch of same-size jobs through every scale; one ``Result`` per job.

    A single job with checkpoints: the checkpoint it was given or resumed from is removed once the
    job is done (it could only repeat it).
    """
    started = time.perf_counter()
    config, runtime, jobs, share, control = batch.config, batch.runtime, batch.jobs, core.share, batch.control
    schedule = batch.scales(core.min_side)
    leader = share is None or share.leader  # of processes sharing the jobs, only one writes files
    saving = batch.saving or Saving(None, {}, None)
    plan, resume = saving.plan, saving.resume
    history: list[dict] = [dict(h) for h in resume["history"]] if resume else []
    total_steps = sum(s.steps for s in schedule)
    every, seconds, image_due = _reporting(batch.callback)
    image = None
    carry = None  # Adam's state and the average, handed from each scale to the next
    done = 0  # steps of the scales before this one
    skipped = 0  # steps that scales ended by a plateau did not take (the total reported shrinks by them)
    if share is None:
        should_interrupt = control.poll
    else:  # one process alone stopping would leave the others waiting for it: a stop is everyone's or no one's
        should_interrupt = lambda: share.any(control.poll())  # noqa: E731
    checkpointable = isinstance(core.extractor, VGGFeatures)
    # --style-loss auto is decided once, for the last (largest) scale, so that every scale uses the same loss;
    # a resumed run keeps the loss its checkpoint was made with.
    if resume is not None and "style_loss" in resume:
        config = config.with_style_loss(resume["style_loss"])
    else:
        last = schedule[-1]
        config = resolve_style_loss(
            config,
            runtime,
            last.height,
            last.width,
            batch=len(jobs),
            checkpointable=checkpointable,
            style_pixels=[math.prod(style_shape(config, *s.shape[-2:])) for job in jobs for s in job.styles],
        )
    control.start()
    for scale in schedule:
        if resume is not None and scale.index < resume["scale"]:
            done += scale.steps
            skipped += scale.steps - sum(1 for h in history if h["scale"] == scale.index)
            continue
        size = (scale.height, scale.width)
        content = runtime.layout(torch.stack([resize(job.content, size) for job in jobs]))
        scale_resume = resume if resume is not None and scale.index == resume["scale"] else None
        if scale_resume is not None:
            image = runtime.layout(resume["image"])
        elif image is None:
            image = runtime.layout(
                torch.cat([initial_image(config, c[None], job) for c, job in zip(content.cpu(), jobs)])
            )
        else:
            image = runtime.layout(finer(image, content=content, jobs=jobs, config=config))
        scale_masks = None if batch.masks is None else resize(batch.masks, size).to(runtime.device)
        styles = [(job.styles, job.blend) for job in jobs]
        extractor = core.extractor
        memory = plan_scale(config, runtime, *size, batch=len(jobs), checkpointable=checkpointable)
        criterion = build_criterion(
            config,
            extractor,
            content,
            styles,
            min_side=core.min_side,
            runtime=runtime,
            masks=scale_masks,
            tiling=memory.tiling,
            style_cache=core.style_cache,
            extra_terms=None
            if batch.extra_terms is None
            else {k: (w, term.to(runtime.device)) for k, (w, term) in batch.extra_terms(*size).items()},
        )
        objective = scale_objective(
            memory=memory,
            extractor=extractor,
            criterion=criterion,
            runtime=runtime,
            size=size,
            share=share,
            stats=config.tile_stats,
        )
        generators = [g for loss in criterion.style.values() for g in loss.generators()]
        if scale_resume is not None:
            ckpt.restore_generators(generators, resume)
            if isinstance(objective, TiledObjective):  # lagged statistics: the gradient of the next step takes them
                objective.load_state_dict(resume.get("tile_stats"))

        def on_step(i, loss, parts, current, scale=scale, total=total_steps - skipped):
            history.append({"scale": scale.index, "step": i, "loss": loss, **parts})
            if batch.callback is not None:
                batch.callback(
                    StepInfo(
                        scale=scale.index,
                        scales=len(schedule),
                        height=scale.height,
                        width=scale.width,
                        step=i,
                        steps=scale.steps,
                        total_step=len(history),
                        total_steps=total,
                        loss=loss,
                        parts=dict(parts),
                        source=current,
                        jobs=batch.indices,
                    )
                )

        def save_state(state, scale=scale, generators=generators, objective=objective):
            if not leader:
                return
            tile_stats = objective.state_dict() if isinstance(objective, TiledObjective) else {}
            ckpt.save(
                plan.path,
                {
                    **state,
                    "scale": scale.index,
                    "config": ckpt.config_state(batch.config),  # as asked (check_compatible compares it)
                    "style_loss": config.style_loss,  # what auto resolved to
                    "inputs": saving.inputs,
                    "history": [dict(h) for h in history],
                    "generators": [g.get_state() for g in generators],
                    "generator_device": runtime.device.type,
                    "tile_stats": tile_stats,
                    "cli": plan.extra,
                },
            )

        image, carry = optimize_scale(
            ScaleProblem(
                image=image,
                objective=objective,
                steps=scale.steps,
                optimizer=config.optimizer,
                lr=config.lr,
                ema_decay=config.ema_decay,
                runtime=runtime,
                reporting=Reporting(
                    on_step=on_step, every=every, seconds=seconds, due=lambda i, done=done: image_due(done + i)
                ),
                checkpointing=Checkpointing(
                    save=save_state if plan is not None else None,
                    due=lambda i, done=done: plan is not None and bool(plan.every) and (done + i) % plan.every == 0,
                    should_stop=should_interrupt,
                    resume=scale_resume,
                ),
                after_step=control.check,
                steps_pool=core.steps_pool,
                carry=carry,
                plateau=Plateau(tolerance=config.plateau) if config.plateau else None,
            )
        )
        done += scale.steps
        skipped += scale.steps - carry.steps
    images = [job.with_colours(im.float().cpu().contiguous()) for im, job in zip(image, jobs)]
    seconds = time.perf_counter() - started
    # The job is done: a checkpoint of it, written now or resumed from, could only repeat it.
    if leader:
        ckpt.discard(plan.path if plan is not None else None, (resume or {}).get("path"))
    return [Result(image=im, history=history, seconds=seconds, config=config) for im in images]


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
        # Only ever used at the output size or below: keeping the full-size decode of every photo in a
        # folder would cost N x (camera resolution) of memory instead of N x size^2.
        content_t = at_most(content_t, config.size)
        job = JobInput(content=content_t, styles=[load(s, "style image") for s in style_list], blend=tuple(blend))
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
    *,
    memory: MemoryPlan,
    extractor,
    criterion,
    runtime: Runtime,
    size: tuple[int, int],
    share: Optional[TileShare] = None,
    stats: str = "exact",
):
    """The objective of one scale of ``size``, run as ``memory`` plans: untiled, checkpointed or tiled
    (this process's ``share`` of the tiles, if several processes share the image; ``stats``: how tiles
    get the whole image's style statistics, ``Config.tile_stats``)."""
    if memory.mode == "tiled":
        return TiledObjective(
            extractor, criterion, memory.tiling.grid(*size), autocast=runtime.autocast, share=share, stats=stats
        )
    if memory.mode == "checkpoint":
        if not isinstance(extractor, VGGFeatures):
            raise UserError("tile 'checkpoint' needs the eager extractor; use backend eager, or a tile size")
        return Objective(BlockCheckpointed(extractor), criterion, runtime.autocast)
    return Objective(extractor, criterion, runtime.autocast)


def initial_image(config: Config, content: torch.Tensor, job: JobInput) -> torch.Tensor:
    """The starting image ``(1, 3, H, W)`` of one job, ``content`` being its photo at the first scale's size;
    noise is seeded per job, so batching does not change it.

    ``job.init`` is the decoded ``config.init`` file, if it names one: resized to the content's size. ``palette``
    maps the photo's colours onto the job's style images' (``color.palette_start``).
    """
    if job.init is not None:
        return resize(job.init, tuple(content.shape[-2:]))[None]
    if config.init == "palette":
        return color.palette_start(content[0], job.styles, job.blend)[None]
    if config.init == "content":
        return content.clone()
    if config.init == "gray":
        return torch.full_like(content, 0.5)
    return torch.rand(content.shape, generator=torch.Generator().manual_seed(config.seed))


def finer(image: torch.Tensor, *, content: torch.Tensor, jobs: Sequence[JobInput], config: Config) -> torch.Tensor:
    """The previous scale's results ``image`` (one per job) as the start of the next, finer scale, whose
    photos ``content`` (``(N, 3, H, W)``, the scale's content targets) give its size.

    Upsampled, they lack the detail the smaller size could not hold, which the content loss would then
    have to draw back step by step. With ``config.detail`` > 0 (and a run that starts from the photo,
    ``--init content`` or ``palette``), that detail is added back from the photo itself: its own loss
    between the two sizes, ``photo(size) - up(photo(previous size))``, times ``detail``. The style's
    texture is left to the steps of the new scale, as before (docs/speed.md, "The schedule").
    """
    size = tuple(content.shape[-2:])
    up = resize(image, size)
    if not config.detail or config.init not in ("content", "palette"):
        return up
    previous = tuple(image.shape[-2:])
    lost = [
        torch.zeros(3, *size)
        if job.init is not None  # a start image of the caller's own (a video's warped frame): not the photo's
        else photo - resize(resize(job.content, previous), size)
        for photo, job in zip(content.cpu(), jobs)
    ]
    return (up + config.detail * torch.stack(lost).to(up)).clamp_(0, 1)
