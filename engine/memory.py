"""How much memory a scale needs, and how to run it in what the device has: untiled, checkpointed or tiled.

The model counts bytes per input pixel from the network's layer list, so it
follows the layers and the precision a run asks for:

* **activations** an untiled step keeps for its backward pass: every layer's
  output (``channels / factor^2`` values per input pixel, ``factor`` the
  layer's downsampling), the max-pool indices (int64), and the two largest
  gradient buffers alive during the backward pass;
* **checkpointed** (``torch.utils.checkpoint`` on the first VGG blocks): the
  outputs the losses read and the inputs of the checkpointed blocks, one of
  them recomputed at a time, and the later blocks' activations whole;
* **tiled**: the activations of one crop (tile plus halo), whatever the image;
* the **image-side state**, which no mode removes: the image, its gradient,
  Adam's two moments, the moving average, the content image and the previous
  scale's result (4 bytes x 3 channels each), and the content targets (see
  ``state_bytes_per_pixel``).

``tests/test_tiling.py`` checks the model against peaks measured on the CPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import structure
from .errors import UserError, option
from .optimize import LBFGS_HISTORY
from .style_losses import AUTO, AUTO_STYLE_LOSSES, check_tileable, style_loss
from .tiling import Geometry, Tiling
from .vgg import blocks_of, channels, recomputed_blocks, truncated_names

GiB = 1024**3
# Share of the free memory a run plans to use: the allocator's fragmentation, the framework's own
# buffers and whatever else starts meanwhile need the rest.
HEADROOM = 0.8
IMAGE_COPIES = 6  # image, gradient, Adam's exp_avg and exp_avg_sq, moving average, content image
PREVIOUS_SCALE = 1  # the last scale's result, alive while it is resized to this one


def layer_bytes(model: str, layers, element: int) -> dict[str, float]:
    """Bytes per input pixel of each layer's output in the truncated network."""
    geometry = Geometry.of(model, layers)
    # "conv3_2", "relu3_2", "pool3": the fifth character is the block, which sets the channels.
    return {name: channels(name) * element / geometry.factors[name] ** 2 for name in truncated_names(model, layers)}


def activation_bytes_per_pixel(model: str, layers, element: int = 4, mode: str = "untiled") -> float:
    """What one step keeps alive per input pixel of one image, for ``mode`` ``untiled`` or ``checkpoint``."""
    sizes = layer_bytes(model, layers, element)
    # Max pooling saves the index of each window's maximum (int64) for its backward pass.
    indices = sum(v * 8 / element for name, v in sizes.items() if name.startswith("pool"))
    transient = 2 * max(sizes.values())  # the gradient flowing back and the one being made
    if mode == "untiled":
        return sum(sizes.values()) + indices + transient
    # The first ``recomputed`` blocks keep their outputs the losses read and their pools' outputs (the next
    # block's input) and are recomputed one at a time; the later blocks keep everything, and are freed
    # before the largest recomputed block runs again (see vgg.recomputed_blocks).
    recomputed = recomputed_blocks(model, layers)
    blocks = [
        sum(sizes[n] + (sizes[n] * 8 / element if n.startswith("pool") else 0) for n in block)
        for block in blocks_of(sizes)
    ]
    kept = sum(
        sizes[n] for block in blocks_of(sizes)[:recomputed] for n in block if n in layers or n.startswith("pool")
    )
    return kept + max(max(blocks[:recomputed]), sum(blocks[recomputed:])) + transient


def state_bytes_per_pixel(config) -> float:
    """Per output pixel, what the run holds outside the network whatever the mode (float32)."""
    # The content layers are the style loss's own unless given. Asked before auto is resolved (the --max-pixels
    # message, about sizes only tiles reach), the loss auto takes when nothing else fits brings them.
    layers = config.content_layers
    if layers is None:
        layers = style_loss(AUTO_STYLE_LOSSES[-1] if config.style_loss == AUTO else config.style_loss).content_layers
    content_targets = sum(layer_bytes(config.model, config.feature_layers, 4)[n] for n in layers)
    copies = IMAGE_COPIES + PREVIOUS_SCALE
    if config.optimizer == "lbfgs":
        copies += 2 * LBFGS_HISTORY + 3  # curvature pairs, direction, previous gradient and point
    masks = len(config.style_masks or ()) * 4
    return copies * 3 * 4 + content_targets + masks


def loss_state_bytes(config, pixels: int, style_pixels: Optional[Sequence[int]] = None) -> float:
    """What the style loss holds in a scale of ``pixels`` output pixels (its class says: ``StyleLoss.state_bytes``);
    without ``style_pixels``, one style image of ``style_ratio^2`` of the output's pixels is assumed."""
    if style_pixels is None:
        style_pixels = [round(pixels * config.style_ratio**2)]
    return style_loss(config.style_loss).state_bytes(
        config,
        pixels=pixels,
        style_pixels=style_pixels,
        layer_bytes=layer_bytes(config.model, config.feature_layers, 4),
    )


def available_bytes(device: torch.device) -> int:
    """Memory this process can still use on ``device``: free CUDA memory, or the kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class OutOfBudget(UserError):
    """No mode of a scale fits the memory budget; ``needed`` is the bytes the leanest mode would take."""

    def __init__(self, message: str, needed: float):
        super().__init__(message)
        self.needed = needed


@dataclass(frozen=True)
class MemoryPlan:
    """How one scale runs: ``untiled``, ``checkpoint`` or ``tiled`` (with ``tiling``), and the bytes it expects."""

    mode: str
    estimate: float
    tiling: Optional[Tiling] = None


def element_bytes(runtime) -> int:
    return 2 if runtime is not None and runtime.autocast_dtype is not None else 4


def plan_scale(
    config,
    runtime,
    height: int,
    width: int,
    *,
    batch: int = 1,
    budget: Optional[float] = None,
    checkpointable: bool = True,
    style_pixels: Optional[Sequence[int]] = None,
) -> MemoryPlan:
    """Pick the mode for a ``batch`` of ``height x width`` images from ``config.tile`` and the memory budget.

    ``auto`` takes the first mode whose estimate fits the budget: untiled
    (fastest), checkpointed (recomputes the first blocks' forward: about 1.15x),
    tiled with the largest tile that fits (the same recompute plus the halo).
    ``budget`` (bytes) defaults to ``config.memory_budget`` GiB, or to
    ``HEADROOM`` of what the device has free. ``--style-loss auto`` is resolved at this size first
    (``resolve_style_loss``).
    """
    if config.style_loss == AUTO:
        where = dict(batch=batch, budget=budget, checkpointable=checkpointable, style_pixels=style_pixels)
        config = resolve_style_loss(config, runtime, height, width, **where)
    layers, model = config.feature_layers, config.model
    element = element_bytes(runtime)
    geometry = Geometry.of(model, layers)
    pixels = height * width * batch
    # The image-side state, what the style loss holds (its targets and per-step buffers) and the structure
    # term's matrices (with it on, up to 6 x 2048^2 x 4 bytes = 96 MiB per job).
    state = (
        state_bytes_per_pixel(config) * pixels
        + loss_state_bytes(config, pixels, style_pixels)
        + structure.state_bytes(config, height, width, batch)
    )
    untiled = state + activation_bytes_per_pixel(model, layers, element) * pixels
    checkpointed = state + activation_bytes_per_pixel(model, layers, element, "checkpoint") * pixels
    per_crop_pixel = activation_bytes_per_pixel(model, layers, element) * batch

    def tiled(tile: int) -> MemoryPlan:
        check_tileable(config.style_loss)
        structure.check_tileable(config)
        tiling = Tiling(tile, geometry)
        grid = tiling.grid(height, width)
        crop = max((t.crop[1] - t.crop[0]) * (t.crop[3] - t.crop[2]) for t in grid.tiles)
        return MemoryPlan("tiled", state + per_crop_pixel * crop, tiling)

    if config.tile == "off":
        return MemoryPlan("untiled", untiled)
    if config.tile == "checkpoint":
        return MemoryPlan("checkpoint", checkpointed)
    if config.tile != "auto":
        return tiled(int(config.tile))
    if budget is None:
        device = runtime.device if runtime is not None else torch.device("cpu")
        budget = config.memory_budget * GiB if config.memory_budget else HEADROOM * available_bytes(device)
    if untiled <= budget:
        return MemoryPlan("untiled", untiled)
    if checkpointable and checkpointed <= budget:
        return MemoryPlan("checkpoint", checkpointed)
    refusal = style_loss(config.style_loss).tile_refusal()
    if refusal is not None or structure.tile_refusal(config):  # no tiles: the leanest mode is checkpointed blocks
        leanest = checkpointed if checkpointable else untiled
        what, other = (
            (f"the {config.style_loss} style loss", "another --style-loss")
            if refusal is not None
            else ("the structure term", f"{option('structure_weight')} 0")
        )
        raise OutOfBudget(
            f"a {width}x{height} image needs about {leanest / GiB:.1f} GiB with {what}, "
            f"which cannot be tiled, but the budget is {budget / GiB:.1f} GiB; use a smaller --size, {other}, "
            "or free memory",
            leanest,
        )
    room = (budget - state) / per_crop_pixel
    if room > 0:
        # The largest square crop that fits, less the halo on both sides, in whole strides.
        tile = (int(math.sqrt(room)) - 2 * geometry.halo) // geometry.stride * geometry.stride
        if tile >= geometry.stride:
            plan = tiled(tile)
            if plan.estimate <= budget:
                return plan
    smallest = tiled(geometry.stride).estimate
    raise OutOfBudget(
        f"a {width}x{height} image needs about {smallest / GiB:.1f} GiB even in the smallest tiles "
        f"({state / GiB:.1f} GiB of it for the image, its gradient, Adam's state, the average, the content "
        f"targets ({state_bytes_per_pixel(config):.0f} bytes per pixel) and the style loss's own), but the budget "
        f"is {budget / GiB:.1f} GiB; use a smaller --size, or free memory",
        smallest,
    )


def resolve_style_loss(config, runtime, height: int, width: int, **where):
    """``config`` with a registered style loss in place of ``auto``, and that loss's own weights where the
    config leaves them unset (``Config.with_style_loss``). ``where``: ``plan_scale``'s keywords (``batch``,
    ``budget``, ``checkpointable``, ``style_pixels``), which it is asked with.

    ``auto`` takes the first of ``AUTO_STYLE_LOSSES`` that can run a ``batch`` of ``height x width`` images as
    asked: one that takes the style masks if there are any, that a CUDA graph can capture if
    ``--cuda-graphs on``, that tiles can split if a tile size is given, and whose memory plan needs no tiles
    (with ``--tile auto``: what fits the budget untiled or checkpointed). The last of them is the fallback.
    """
    if config.style_loss != AUTO:
        return config.with_style_loss(config.style_loss)
    *preferred, fallback = AUTO_STYLE_LOSSES
    for name in preferred:
        loss = style_loss(name)
        if config.style_masks is not None and not loss.takes_masks:
            continue
        if config.cuda_graphs == "on" and loss.uncapturable:
            continue
        if config.tile.isdigit() and loss.tile_refusal() is not None:
            continue
        candidate = config.with_style_loss(name)
        try:
            plan = plan_scale(candidate, runtime, height, width, **where)
        except OutOfBudget:
            continue
        if plan.mode != "tiled":
            return candidate
    return config.with_style_loss(fallback)
