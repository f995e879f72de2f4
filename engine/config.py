"""The one configuration of a style-transfer run.

``Config`` is frozen and validated on construction: a bad value raises a
``UserError`` naming the field, the value and what is allowed. The CLI builds
its options from these fields and takes its defaults from here, so this file
is the single source of truth for every default.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Optional

from . import structure
from .color import MODES as COLOR_MODES
from .errors import UserError, option, plural
from .images import FORMATS as IMAGE_FORMATS
from .runtime import MEMORY_FORMATS, PRECISIONS, SWITCHES
from .schedule import SCHEDULES
from .sizes import DEFAULT_MAX_PIXELS
from .style_losses import AUTO, AUTO_STYLE_LOSSES, Names
from .style_losses import style_loss as registered_loss
from .vgg import MODELS, PADDINGS, POOLINGS, check_layers
from .weights import PREPROCESS

OPTIMIZERS = ("adam", "lbfgs")
INITS = ("content", "palette", "noise", "gray")
TILE_STATS = ("exact", "lagged")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("eager", "torchscript")
# The registered style losses (engine/style_losses/): a live view, so that a loss registered later is a choice.
STYLE_LOSSES = Names()
# --style-loss also takes "auto": the first of AUTO_STYLE_LOSSES that can run the job (memory.resolve_style_loss).
STYLE_LOSS_CHOICES = Names(extra=(AUTO,))
# The settings the extractor is built from (`nst export`, `nst validate`), and with the runtime's, those a
# long-lived Engine is built from (engine.service.FIXED).
EXTRACTOR_FIELDS = ("model", "weights", "preprocess", "pooling", "padding", "content_layers", "style_layers", "device")
RUNTIME_FIELDS = ("precision", "memory_format", "backend", "cuda_graphs")
MIN_SIZE_DEFAULT = 128
# A sanity bound, not a memory estimate: beyond this a typo is far likelier than intent.
MAX_SIZE = 16384


@dataclass(frozen=True, kw_only=True)
class Config:
    # A field whose metadata has "http": True is one a client of `nst serve` may set (serve/uploads.py reads
    # the mark); the others (devices, paths, limits) are the server's alone.
    # What to compute with.
    model: str = field(default="vgg19", metadata={"help": "VGG architecture", "choices": MODELS})
    weights: str = field(
        default="caffe",
        metadata={"help": "'caffe' (bundled original VGG19), 'imagenet' (torchvision) or a state-dict file"},
    )
    preprocess: str = field(
        default="auto", metadata={"help": "input preprocessing; 'auto' follows the weights", "choices": PREPROCESS}
    )
    pooling: str = field(default="max", metadata={"help": "pooling layers", "choices": POOLINGS})
    padding: str = field(
        default="zeros",
        metadata={
            "help": "how the first convolution extends the image past its border: zeros (the mean colour), "
            "replicate (the edge pixels) or reflect",
            "choices": PADDINGS,
        },
    )
    # What to match.
    content_layers: Optional[tuple[str, ...]] = field(
        default=None, metadata={"help": "content layers (default: the style loss's own, see docs/losses.md)"}
    )
    content_layer_weights: Optional[tuple[float, ...]] = field(
        default=None, metadata={"http": True, "help": "one weight per content layer (default: equal)"}
    )
    style_layers: tuple[str, ...] = field(
        default=("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"), metadata={"help": "style layers"}
    )
    style_layer_weights: Optional[tuple[float, ...]] = field(
        default=None,
        metadata={
            "http": True,
            "help": "one weight per style layer (default: the style loss's own, see docs/losses.md)",
        },
    )
    content_weight: float = field(default=1.0, metadata={"http": True, "help": "weight of the content loss"})
    style_weight: Optional[float] = field(
        default=None,
        metadata={"http": True, "help": "weight of the style loss (default: the style loss's own, see docs/losses.md)"},
    )
    tv_weight: float = field(default=2.0, metadata={"http": True, "help": "weight of the total-variation loss"})
    structure_weight: float = field(
        default=0.0,
        metadata={
            "http": True,
            "help": "weight of the structure term (after STROTSS): which places of the result look alike must "
            "match the photo's, which keeps its layout and leaves its look to the style; 0: off; not with tiles",
        },
    )
    style_blend_weights: Optional[tuple[float, ...]] = field(
        default=None, metadata={"http": True, "help": "one weight per style image (default: equal)"}
    )
    style_loss: str = field(
        default=AUTO,
        metadata={
            "http": True,
            "help": f"style loss, one of the registered ones (see docs/losses.md); {AUTO!r} is "
            f"{' where it can run, else '.join(AUTO_STYLE_LOSSES)} (it cannot with tiles, style masks, CUDA graphs "
            "or when only tiles fit the memory)",
            "choices": STYLE_LOSS_CHOICES,
        },
    )
    ot_projections: int = field(
        default=64, metadata={"http": True, "help": "random directions per layer and step for --style-loss ot"}
    )
    preserve_colors: str = field(
        default="none",
        metadata={
            "http": True,
            "help": "keep the content's colours: 'luminance' (transfer on luminance only) or 'histogram' "
            "(style colours matched to the content first)",
            "choices": COLOR_MODES,
        },
    )
    style_masks: Optional[tuple[str, ...]] = field(
        default=None,
        metadata={"help": "one mask image per style: style i is painted where mask i is white (gram loss only)"},
    )
    style_scale: float = field(
        default=1.0, metadata={"http": True, "help": "style image size relative to the output's long side"}
    )
    style_size: Optional[int] = field(
        default=None,
        metadata={
            "http": True,
            "help": "long side of the style images in pixels at the output size, instead of --style-scale "
            "(coarser scales shrink it alike)",
        },
    )
    # How to optimise.
    size: int = field(default=512, metadata={"http": True, "help": "long side of the output in pixels"})
    min_size: int = field(
        default=MIN_SIZE_DEFAULT,
        metadata={
            "http": True,
            "help": "long side of the first, coarsest scale (--schedule says how the scales grow); at most "
            f"--size, except the default {MIN_SIZE_DEFAULT}, which means one scale when --size is smaller",
        },
    )
    steps: int = field(
        default=200,
        metadata={"http": True, "help": "steps at the coarsest scale; --schedule says how many each finer one takes"},
    )
    schedule: str = field(
        default="sqrt2",
        metadata={
            "http": True,
            "help": "scales and their steps, in proportion to --steps: 'sqrt2' (scales sqrt(2) apart, each "
            "finer one 1/sqrt(2) as many steps) or 'lean' (scales twice as far apart, the ones between "
            "--steps/16, the last --steps/2**(scales-1): a cheaper draft); see docs/cli.md",
            "choices": tuple(SCHEDULES),
        },
    )
    detail: float = field(
        default=0.0,
        metadata={
            "http": True,
            "help": "at each finer scale, add back this fraction (0-1) of the photo's detail that the coarser "
            "scale could not hold (with --init content or palette); 0: plain upsampling",
        },
    )
    plateau: float = field(
        default=0.0,
        metadata={
            "http": True,
            "help": "end a scale early once its last 20 steps lowered the loss by less than this fraction "
            "(e.g. 0.01; checked every 5 steps); 0: every scale takes all its steps",
        },
    )
    optimizer: str = field(default="adam", metadata={"http": True, "help": "optimiser", "choices": OPTIMIZERS})
    lr: float = field(
        default=0.02, metadata={"http": True, "help": "Adam learning rate in pixel units (L-BFGS uses 1)"}
    )
    ema_decay: float = field(
        default=0.9,
        metadata={
            "http": True,
            "help": "the output is an exponential moving average of the image with this decay (0: the last step)",
        },
    )
    init: str = field(
        default="content",
        metadata={
            "http": True,
            "help": "starting image: content (the photo), palette (the photo in the style images' colours: "
            "their mean and covariance), noise, gray, or an image file (resized to each job's content)",
        },
    )
    seed: int = field(default=0, metadata={"http": True, "help": "random seed"})
    max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS,
        metadata={
            "help": "refuse outputs (and scaled style images) with more pixels than this: a guard against "
            "typos; raise it for very large prints"
        },
    )
    device: str = field(default="auto", metadata={"help": "'auto' picks CUDA when present", "choices": DEVICES})
    precision: str = field(
        default="auto",
        metadata={
            "help": "math precision: fp32, tf32 (CUDA), bf16 or fp16 (autocast; image, optimiser and losses "
            "stay float32); 'auto' is tf32 on CUDA, and on the CPU bf16 with adam where the CPU has AMX "
            "(Intel Xeon since 2023), else fp32",
            "choices": PRECISIONS,
        },
    )
    memory_format: str = field(
        default="auto",
        metadata={
            "help": "tensor layout of the image and the network; 'auto' is channels_last with adam, "
            "contiguous with lbfgs",
            "choices": MEMORY_FORMATS,
        },
    )
    cuda_graphs: str = field(
        default="auto",
        metadata={
            "help": "capture each scale's Adam step as a CUDA graph and replay it; 'auto' is on for CUDA + adam",
            "choices": SWITCHES,
        },
    )
    batch_size: int = field(
        default=4, metadata={"help": "jobs of the same size run through one extractor call (folder inputs)"}
    )
    tile: str = field(
        default="auto",
        metadata={
            "help": "memory mode of each scale: 'off' (whole image), 'checkpoint' (recompute VGG blocks), a "
            "tile size in pixels (exact tiling), or 'auto' (the fastest that fits the memory budget)"
        },
    )
    tile_stats: str = field(
        default="exact",
        metadata={
            "help": "with tiles: 'exact' sums the whole image's style statistics in a pass of their own before "
            "the gradient pass (two passes per step); 'lagged' takes them from the previous step's gradient "
            "pass (one pass per step; each scale's first step is exact; adam only; see "
            "docs/high-resolution.md)",
            "choices": TILE_STATS,
        },
    )
    memory_budget: float = field(
        default=0.0,
        metadata={"help": "GiB that --tile auto plans for; 0 means 80 percent of what the device has free"},
    )
    backend: str = field(
        default="eager",
        metadata={
            "help": "what runs the extractor: eager PyTorch or its frozen TorchScript graph (cached on disk)",
            "choices": BACKENDS,
        },
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("layers", "weights", "masks")) and f.name != "weights":
                object.__setattr__(self, f.name, _sequence(f.name, value, float if "float" in str(f.type) else str))
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise UserError(f"{option(f.name)} must be one of {', '.join(choices)}, not {value!r}")
        check_layers(self.model, self.possible_content_layers + self.style_layers)
        if not self.style_layers:
            raise UserError(f"{option('style_layers')} must name at least one layer")
        for name in ("content_weight", "style_weight", "tv_weight", "structure_weight", "style_scale", "lr"):
            if name == "style_weight" and self.style_weight is None:
                continue  # the style loss's own
            _check_number(name, getattr(self, name), allow_zero=name.endswith("_weight"))
        if isinstance(self.plateau, bool) or not isinstance(self.plateau, (int, float)) or not 0 <= self.plateau < 1:
            raise UserError(f"{option('plateau')} must be a fraction at least 0 and below 1, not {self.plateau!r}")
        if isinstance(self.detail, bool) or not isinstance(self.detail, (int, float)) or not 0 <= self.detail <= 1:
            raise UserError(f"{option('detail')} must be a fraction from 0 to 1, not {self.detail!r}")
        if self.content_layer_weights is not None and self.content_layers is None and self.style_loss == AUTO:
            raise UserError(
                f"{option('content_layer_weights')} needs {option('content_layers')} with {option('style_loss')} "
                f"auto: each style loss has its own content layers, so the number of weights is not known"
            )
        for name, layers in (
            ("content_layer_weights", self.possible_content_layers),
            ("style_layer_weights", self.style_layers),
        ):
            _check_weights(name, getattr(self, name), len(layers), name[:-8].replace("_", " "))
        _check_weights("style_blend_weights", self.style_blend_weights, None, "style image")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise UserError(f"{option('ema_decay')} must be at least 0 and below 1, not {self.ema_decay!r}")
        if (
            self.style_masks is not None
            and self.style_loss != AUTO  # auto picks a loss that takes them
            and not registered_loss(self.style_loss).takes_masks
        ):
            takes = ", ".join(name for name in STYLE_LOSSES if registered_loss(name).takes_masks)
            raise UserError(f"{option('style_masks')} work with the {takes} style loss only, not {self.style_loss!r}")
        for name in ("size", "min_size", "steps", "batch_size", "ot_projections", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{option(name)} must be a positive whole number, not {value!r}")
        if self.style_size is not None and (
            isinstance(self.style_size, bool)
            or not isinstance(self.style_size, int)
            or not 0 < self.style_size <= MAX_SIZE
        ):
            raise UserError(
                f"{option('style_size')} must be a whole number from 1 to {MAX_SIZE}, not {self.style_size!r}"
            )
        if self.min_size > self.size and self.min_size != MIN_SIZE_DEFAULT:
            # The default (128) stays valid below it (a 64 px run is one scale); a chosen one says what it means.
            raise UserError(
                f"{option('min_size')} {self.min_size} is larger than {option('size')} {self.size}: the first scale "
                f"cannot be larger than the last; give a {option('min_size')} of at most {self.size} (equal: one scale)"
            )
        if self.size > MAX_SIZE:
            raise UserError(f"{option('size')} {self.size} is larger than the {MAX_SIZE} px this engine accepts")
        if self.style_scale * self.size > MAX_SIZE:
            raise UserError(
                f"{option('style_scale')} {self.style_scale} makes the style images "
                f"{self.style_scale * self.size:.0f} px, "
                f"larger than the {MAX_SIZE} px this engine accepts"
            )
        _check_tile(self)
        if self.tile.isdigit():
            structure.check_tileable(self)
        if self.tile_stats == "lagged" and self.optimizer != "adam":
            # A line search compares losses and gradients at trial points; a gradient one step behind its
            # loss would mislead it, and "the previous step" is not defined between trial points.
            raise UserError(f"{option('tile_stats')} lagged works with {option('optimizer')} adam only, not lbfgs")
        _check_number("memory_budget", self.memory_budget, allow_zero=True)
        if not isinstance(self.init, str) or (
            self.init not in INITS and os.path.splitext(self.init)[1].lower() not in IMAGE_FORMATS
        ):
            raise UserError(f"{option('init')} must be one of {', '.join(INITS)}, or an image file, not {self.init!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"{option('seed')} must be a whole number, not {self.seed!r}")

    def with_style_loss(self, name: str) -> "Config":
        """This config with ``--style-loss name`` (a registered loss) and that loss's own style weight, layer
        weights and content layers wherever this config leaves them unset."""
        loss = registered_loss(name)
        return dataclasses.replace(
            self,
            style_loss=name,
            style_weight=loss.weight if self.style_weight is None else self.style_weight,
            content_layers=loss.content_layers if self.content_layers is None else self.content_layers,
            style_layer_weights=self.style_layer_weights or loss.default_layer_weights(self.style_layers),
        )

    @property
    def style_ratio(self) -> float:
        """Style images' long side over the result's: ``style_size / size`` when given, else ``style_scale``."""
        return self.style_size / self.size if self.style_size else self.style_scale

    @property
    def possible_content_layers(self) -> tuple[str, ...]:
        """The content layers: as given, or while unset, those of every style loss this config may run with
        (``auto``'s candidates), so that one extractor serves whichever of them a job resolves to."""
        if self.content_layers is not None:
            return self.content_layers
        names = AUTO_STYLE_LOSSES if self.style_loss == AUTO else (self.style_loss,)
        return tuple(dict.fromkeys(layer for name in names for layer in registered_loss(name).content_layers))

    @property
    def feature_layers(self) -> tuple[str, ...]:
        """Every layer the losses read, content first, then style, then the structure term's, without repeats."""
        return tuple(dict.fromkeys(self.possible_content_layers + self.style_layers + structure.layers(self)))


TILE_MODES = ("auto", "off", "checkpoint")


def _check_tile(config: "Config") -> None:
    value = config.tile
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
        object.__setattr__(config, "tile", value)  # the CLI gives strings; one type either way
    if isinstance(value, str) and (value in TILE_MODES or (value.isdigit() and 0 < int(value) <= MAX_SIZE)):
        return
    raise UserError(
        f"{option('tile')} must be auto, off, checkpoint or a tile size in pixels from 1 to {MAX_SIZE}, not {value!r}"
    )


def _sequence(name: str, value, item: type):
    """A list setting as a tuple: from a tuple or list, or a comma-separated string as on the command line."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        kind = "names" if item is str else "numbers"
        raise UserError(f"{option(name)} must be a list of {kind} or a comma-separated string, not {value!r}")
    if item is float:
        try:
            value = [float(v) if isinstance(v, str) else v for v in value]
        except ValueError:
            raise UserError(f"{option(name)} must be numbers, not {value!r}") from None
    elif not all(isinstance(v, str) for v in value):
        raise UserError(f"{option(name)} must be names (strings), not {value!r}")
    return tuple(value)  # lists from callers; keep the config hashable


def _check_number(name: str, value, allow_zero: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "greater than zero"
        raise UserError(f"{option(name)} must be a finite number {bound}, not {value!r}")


def _check_weights(name: str, weights, count: Optional[int], what: str) -> None:
    if weights is None:
        return
    if count is not None and len(weights) != count:
        raise UserError(
            f"{option(name)} has {plural(len(weights), 'value')} but there "
            f"{'is' if count == 1 else 'are'} {plural(count, what)}"
        )
    for w in weights:
        _check_number(name, w, allow_zero=True)
    if sum(weights) <= 0:
        raise UserError(f"{option(name)} must not all be zero")
