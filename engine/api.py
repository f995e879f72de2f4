"""The Python entry point: ``stylize(content, styles, config) -> Result``.

Device, precision, layout and CUDA graphs are decided here, once
(``runtime.resolve_runtime``); everything below reads them off the tensors
it is given or the ``Runtime`` it is handed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from . import checkpoint as ckpt
from . import color
from .checkpoint import CheckpointPlan
from .config import INITS, Config
from .criterion import build_criterion
from .errors import UserError, option, plural
from .images import ImageLike, fit_long_side, load_image, resize, save_image, to_pil
from .memory import MemoryPlan, plan_scale
from .optimize import SYNC_EVERY, Callback, Objective, StepInfo, optimize_scale
from .runtime import Runtime, resolve_device, resolve_runtime
from .schedule import build_schedule
from .sizes import check_size, style_size
from .sizes import min_side as network_min_side
from .style_losses import SlicedOTStyleLoss
from .tiling import TiledObjective
from .vgg import BlockCheckpointed, VGGFeatures, conv_shapes, truncated_names
from .weights import load_weights


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


Job = tuple[ImageLike, Union[ImageLike, Sequence[ImageLike]]]


def stylize(
    content: ImageLike,
    styles: Union[ImageLike, Sequence[ImageLike]],
    config: Optional[Config] = None,
    callback: Optional[Callable[[StepInfo], None]] = None,
    checkpoint: Optional[CheckpointPlan] = None,
    resume: Optional[dict] = None,
) -> Result:
    """Repaint ``content`` in the style of ``styles`` (one image or several, blended).

    Images may be paths, PIL images, arrays or tensors. ``callback`` is called
    after every step with a ``StepInfo``; a plain function is called live
    (the losses are read from the device every step), an
    ``engine.optimize.Callback`` in groups. ``checkpoint`` and ``resume``: see
    ``stylize_batch``.
    """
    return stylize_batch([(content, styles)], config, callback, checkpoint=checkpoint, resume=resume)[0]


def stylize_batch(
    jobs: Sequence[Job],
    config: Optional[Config] = None,
    callback: Optional[Callable[[StepInfo], None]] = None,
    on_result: Optional[Callable[[int, Result], None]] = None,
    checkpoint: Optional[CheckpointPlan] = None,
    resume: Optional[dict] = None,
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
    """
    config = config or Config()
    if not jobs:
        raise UserError("no job to run: give at least one content image")
    runtime = resolve_runtime(config)
    if (checkpoint is not None or resume is not None) and len(jobs) != 1:
        raise UserError("checkpoints and resuming work with one content image at a time, not with a folder")
    decoded = _decode_jobs(jobs, config)  # every input read before any work
    if config.init not in INITS and resume is None:  # a resumed run never needs its init image again
        start = load_image(config.init, "init image")
        for job in decoded:
            job.init = start
    masks = _load_masks(config)
    saving = None
    if checkpoint is not None or resume is not None:
        inputs = ckpt.input_digests(decoded[0].content, decoded[0].styles, masks)
        if resume is not None:
            ckpt.check_compatible(resume, config, inputs, resume.get("path", "checkpoint"))
        saving = (checkpoint, inputs, resume)
    min_side = network_min_side(config.model, config.feature_layers)
    extractor = loop_extractor(config, runtime)
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(decoded):
        schedule = build_schedule(*job.content.shape[-2:], config.size, config.min_size, config.steps, min_side)
        groups.setdefault(tuple(schedule), []).append(index)
    per_batch = config.batch_size if config.optimizer == "adam" else 1
    results: list[Optional[Result]] = [None] * len(decoded)
    for schedule, members in groups.items():
        for start in range(0, len(members), per_batch):
            chunk = members[start : start + per_batch]
            started = time.perf_counter()
            images, history = _run_batch(
                [decoded[i] for i in chunk],
                list(schedule),
                config,
                runtime,
                extractor,
                min_side,
                callback,
                tuple(chunk),
                masks,
                saving,
            )
            seconds = time.perf_counter() - started
            for i, image in zip(chunk, images):
                results[i] = Result(image, history, seconds, config)
                if on_result is not None:
                    on_result(i, results[i])
    # The job is done: a checkpoint of it, written now or resumed from, could only repeat it.
    done_with = [checkpoint.path if checkpoint is not None else None, (resume or {}).get("path")]
    for path in dict.fromkeys(p for p in done_with if p):
        if os.path.isfile(path):
            os.unlink(path)
    return results


@dataclass
class _Job:
    content: torch.Tensor  # what is optimised against (grey in luminance mode)
    styles: list[torch.Tensor]
    blend: tuple[float, ...]
    colours: Optional[torch.Tensor] = None  # luminance mode: the content whose chroma the result gets
    init: Optional[torch.Tensor] = None  # the decoded --init image file, if one is given


def _decode_jobs(jobs: Sequence[Job], config: Config) -> list[_Job]:
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
    for content, styles in jobs:
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
        job = _Job(content_t, [load(s, "style image") for s in style_list], tuple(blend))
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


def _load_masks(config: Config) -> Optional[torch.Tensor]:
    """The style masks as one ``(S, 1, H, W)`` tensor in [0, 1] (all resized to the first's size)."""
    if config.style_masks is None:
        return None
    masks = [load_image(path, "style mask").mean(0, keepdim=True) for path in config.style_masks]
    size = tuple(masks[0].shape[-2:])
    return torch.stack([resize(m, size) for m in masks])


def _run_batch(jobs: list[_Job], schedule, config, runtime, extractor, min_side, callback, indices, masks, saving):
    """Optimise a batch of same-size jobs through every scale; ``(images, history)``."""
    plan, inputs, resume = saving or (None, None, None)
    history: list[dict] = [dict(h) for h in resume["history"]] if resume else []
    total_steps = sum(s.steps for s in schedule)
    every, seconds, image_due = _reporting(callback)
    image = None
    carry = None  # Adam's state and the average, handed from each scale to the next
    done = 0  # steps of the scales before this one
    for scale in schedule:
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
                torch.cat([_initial_image(config, c[None], job.init) for c, job in zip(content.cpu(), jobs)])
            )
        else:
            image = runtime.layout(resize(image, size))
        scale_masks = None if masks is None else resize(masks, size).to(runtime.device)
        styles = [(job.styles, job.blend) for job in jobs]
        memory = plan_scale(config, runtime, *size, len(jobs), checkpointable=isinstance(extractor, VGGFeatures))
        criterion = build_criterion(
            config, extractor, content, styles, min_side, runtime, scale_masks, tiling=memory.tiling
        )
        objective = scale_objective(memory, extractor, criterion, runtime, size)
        generators = [m.generator for m in criterion.style.values() if isinstance(m, SlicedOTStyleLoss)]
        if scale_resume is not None:
            ckpt.restore_generators(generators, resume)

        def on_step(i, loss, parts, current, scale=scale):
            record = {"scale": scale.index, "step": i, "loss": loss, **parts}
            history.append(record)
            if callback is not None:
                callback(
                    StepInfo(
                        scale.index,
                        len(schedule),
                        scale.height,
                        scale.width,
                        i,
                        scale.steps,
                        len(history),
                        total_steps,
                        loss,
                        dict(parts),
                        current,
                        indices,
                    )
                )

        def save_state(state, scale=scale, generators=generators):
            ckpt.save(
                plan.path,
                {
                    **state,
                    "scale": scale.index,
                    "config": ckpt.config_state(config),
                    "inputs": inputs,
                    "history": [dict(h) for h in history],
                    "generators": [g.get_state() for g in generators],
                    "generator_device": runtime.device.type,
                    "cli": plan.extra,
                },
            )

        image, carry = optimize_scale(
            image,
            objective,
            scale.steps,
            config.optimizer,
            config.lr,
            on_step,
            runtime=runtime,
            sync_every=every,
            sync_seconds=seconds,
            ema_decay=config.ema_decay,
            report_due=lambda i, done=done: image_due(done + i),
            resume=scale_resume,
            checkpoint=save_state if plan is not None else None,
            checkpoint_due=lambda i, done=done: bool(plan.every) and (done + i) % plan.every == 0,
            should_stop=plan.should_stop if plan is not None else (lambda: False),
            carry=carry,
        )
        done += scale.steps
    images = [im.float().cpu().contiguous() for im in image]
    for k, job in enumerate(jobs):
        if job.colours is not None:  # luminance mode: the result's Y with the content's chroma
            images[k] = color.join_luminance(images[k], resize(job.colours, tuple(images[k].shape[-2:])))
    return images, history


def _reporting(callback) -> tuple[int, float, Callable[[int], bool]]:
    """How often the losses are read for ``callback``: ``(steps, seconds, steps with an image)``."""
    if isinstance(callback, Callback):
        return callback.every, callback.seconds, callback.image_due
    never = lambda total_step: False  # noqa: E731
    return (SYNC_EVERY, 0.0, never) if callback is None else (1, 0.0, never)  # a plain function: live


def scale_objective(memory: MemoryPlan, extractor, criterion, runtime: Runtime, size: tuple[int, int]):
    """The objective of one scale of ``size``, run as ``memory`` plans: untiled, checkpointed or tiled."""
    if memory.mode == "tiled":
        return TiledObjective(extractor, criterion, memory.tiling.grid(*size), runtime.autocast)
    if memory.mode == "checkpoint":
        if not isinstance(extractor, VGGFeatures):
            raise UserError("tile 'checkpoint' needs the eager extractor; use backend eager, or a tile size")
        return Objective(BlockCheckpointed(extractor), criterion, runtime.autocast)
    return Objective(extractor, criterion, runtime.autocast)


def _initial_image(config: Config, content: torch.Tensor, start: Optional[torch.Tensor] = None) -> torch.Tensor:
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
