"""Stylising a video frame by frame, each frame held to the previous output where the flow is reliable.

Ruder, Dosovitskiy and Brox, "Artistic style transfer for videos" (GCPR 2016), on this engine:

* frame 0 runs the full coarse-to-fine schedule of the config, as a still image would;
* frame t > 0 runs at the output size only, ``later_steps x steps`` steps, starting from the previous
  output warped to frame t by the backward flow of the *content* frames (where that is unreliable, from
  the content frame), with a temporal term (engine/temporal.py) that keeps it close to that warped output
  wherever the flow is reliable (video/flow.py); with ``long_term``, also close to the outputs of t-2 and
  t-4 where t-1 does not cover a pixel (a point hidden for a frame comes back as it was).

Every frame's result is written (atomically) to a ``FrameStore`` as soon as it is done, and a frame's
work reads only files: the content video and the stored results of earlier frames (8-bit PNGs, read back
even in an uninterrupted run). So a run stopped at any point and started again skips the frames that are
there and ends with exactly the frames an uninterrupted run writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from engine.config import Config
from engine.control import Control
from engine.core import Batch, Core, decode_jobs, load_masks
from engine.errors import UserError, option
from engine.images import fit_long_side, load_image, resize, save_image
from engine.schedule import Scale, build_schedule
from engine.temporal import TemporalLoss

from . import LATER_STEPS, TEMPORAL_WEIGHT
from . import flow as fl

LONG_TERM = (1, 2, 4)  # the earlier frames the long-term terms look back to


@dataclass(frozen=True)
class VideoSettings:
    temporal_weight: float = TEMPORAL_WEIGHT
    later_steps: float = LATER_STEPS
    long_term: bool = False
    independent: bool = False  # every frame on its own (no flow, no term): the baseline measure.py compares to

    def __post_init__(self):
        for name in ("temporal_weight", "later_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise UserError(f"{option(name)} must be a number of 0 or more, not {value!r}")
        if self.later_steps <= 0:
            raise UserError(f"{option('later_steps')} must be greater than 0, not {self.later_steps!r}")

    def later_step_count(self, config: Config) -> int:
        return max(1, round(self.later_steps * config.steps))


@dataclass
class FrameStore:
    """Where finished frames go: ``folder/names[k]``, written atomically, read back for later frames."""

    folder: Path
    names: list[str] = field(default_factory=list)

    def path(self, k: int) -> Path:
        return self.folder / self.names[k]

    def done(self, k: int) -> bool:
        return self.path(k).is_file()

    def save(self, k: int, image: torch.Tensor) -> None:
        save_image(image, self.path(k), overwrite=True)

    def load(self, k: int) -> torch.Tensor:
        return load_image(self.path(k), "stored frame")

    def first_missing(self) -> int:
        return next((k for k in range(len(self.names)) if not self.done(k)), len(self.names))


def frame_size(height: int, width: int, config: Config, even: bool) -> tuple[int, int]:
    """The output frames' size: the long side ``config.size``, as for a still image; with ``even``, a row or
    column fewer where a side is odd (H.264 in yuv420p halves the colour planes)."""
    h, w = fit_long_side(height, width, config.size)
    return (max(2, h - h % 2), max(2, w - w % 2)) if even else (h, w)


@dataclass(frozen=True)
class FrameDone:
    index: int
    frames: int
    seconds: float
    steps: int
    reliable: Optional[float]  # the share of pixels the temporal term holds (None for frame 0)
    parts: dict  # the loss's parts at the last step (content, style, tv, temporal)


def stylize_frames(
    frames: Iterable[torch.Tensor],
    styles: list[torch.Tensor],
    config: Config,
    settings: VideoSettings,
    store: FrameStore,
    size: tuple[int, int],
    core: Optional[Core] = None,
    callback=None,
    control: Optional[Control] = None,
    on_frame: Optional[Callable[[FrameDone], None]] = None,
) -> None:
    """Stylise ``frames`` (``(3, H, W)`` tensors, any size: resized to ``size``) into ``store``, skipping the
    frames already there. ``control`` stops the run after a step (``engine.control``: the frame in progress
    is dropped, ``Stopped`` or ``Interrupted`` is raised)."""
    core = core or Core.open(config, style_cache_bytes=64 << 20)
    control = control or Control()
    masks = load_masks(config)
    total = len(store.names)
    window: dict[int, torch.Tensor] = {}  # the content frames the next frames look back to
    reach = max(LONG_TERM) if settings.long_term else 1
    h, w = size
    for k, raw in enumerate(frames):
        content = resize(raw, size)
        window[k] = content
        for old in [i for i in window if i < k - reach]:
            del window[old]
        if store.done(k):
            continue
        started = time.perf_counter()
        job = decode_jobs([(content, styles)], config)[0]
        terms, reliable = None, None
        if k == 0 or settings.independent:
            schedule = build_schedule(
                h, w, max(h, w), config.min_size, config.steps, core.min_side, schedule=config.schedule
            )
        else:
            schedule = [Scale(index=0, height=h, width=w, steps=settings.later_step_count(config))]
            gaps = [j for j in (LONG_TERM if settings.long_term else (1,)) if k - j >= 0]
            job.init, target, weight = temporal_target(
                content, [window[k - j] for j in gaps], [store.load(k - j) for j in gaps]
            )
            reliable = float(weight.mean())
            if settings.temporal_weight > 0:
                terms = _terms(settings.temporal_weight, target, weight)
        batch = Batch(
            jobs=[job],
            config=config,
            runtime=core.runtime_for(config),
            masks=masks,
            callback=callback,
            control=control,
            schedule=schedule,
            extra_terms=terms,
        )
        result = core.run(batch)[0]
        store.save(k, result.image)
        if on_frame is not None:
            steps = sum(s.steps for s in schedule)
            last = result.history[-1] if result.history else {}
            parts = {name: last[name] for name in last if name not in ("scale", "step", "loss")}
            on_frame(FrameDone(k, total, time.perf_counter() - started, steps, reliable, parts))


def temporal_target(
    content: torch.Tensor, earlier_contents: list[torch.Tensor], earlier_outputs: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(init, target, weight)`` for a frame from the earlier frames (nearest first): the init is the
    previous output warped, the content where that is unreliable; target and weight combine the
    short- and long-term terms into one (the long-term weights do not overlap, so ``sum_j c_j |x - w_j|^2``
    is ``(sum_j c_j) |x - (sum_j c_j w_j) / sum_j c_j|^2`` plus a constant: the same gradient)."""
    warped, reliable = [], []
    for before, output in zip(earlier_contents, earlier_outputs):
        backward = fl.dis_flow(content, before)
        forward = fl.dis_flow(before, content)
        reliable.append(fl.reliability(forward, backward))
        warped.append(fl.warp(output, backward).clamp(0, 1))
    init = reliable[0] * warped[0] + (1 - reliable[0]) * content
    weights = fl.long_term_weights(reliable)
    weight = sum(weights)
    target = sum(c * w for c, w in zip(weights, warped)) / weight.clamp_min(1e-8)
    target = torch.where(weight > 0, target, content)
    return init, target, weight


def _terms(temporal_weight: float, target: torch.Tensor, weight: torch.Tensor):
    def terms(height: int, width: int) -> dict:
        # Later frames run one scale at the output size: the targets are made at that size.
        assert (height, width) == tuple(target.shape[-2:]), "later frames run at the output size only"
        return {"temporal": (temporal_weight, TemporalLoss(target[None], weight[None, None]))}

    return terms
