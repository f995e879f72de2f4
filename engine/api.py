"""The Python entry point: ``stylize(content, styles, config) -> Result``.

Device and dtype are decided here, once; everything below reads them off
the tensors it is given.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from .config import Config
from .errors import UserError
from .images import ImageLike, fit_long_side, load_image, resize, save_image, to_pil
from .losses import ContentLoss, GramStyleLoss, StyleTransferLoss
from .optimize import StepInfo, optimize_scale
from .schedule import build_schedule
from .vgg import VGGFeatures, conv_shapes, downsampling, truncated_names
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def build_extractor(config: Config, device: Optional[torch.device] = None) -> VGGFeatures:
    """The truncated VGG for ``config``'s layers and weights, on ``device``."""
    needed = [n for n in truncated_names(config.model, config.feature_layers) if n in conv_shapes(config.model)]
    convs, normalize = load_weights(config.model, config.weights, config.preprocess, needed)
    extractor = VGGFeatures(config.model, convs, normalize, config.feature_layers, config.pooling)
    return extractor.to(device or resolve_device(config.device))


def loop_extractor(config: Config, device: Optional[torch.device] = None) -> Callable:
    """The extractor the optimisation runs on, as ``config.backend`` asks: eager or TorchScript."""
    extractor = build_extractor(config, device)
    if config.backend == "torchscript":
        # export/ builds on engine/, so it is imported only here, when asked for.
        from export.torchscript import cached

        return cached(extractor)
    return extractor


def stylize(
    content: ImageLike,
    styles: Union[ImageLike, Sequence[ImageLike]],
    config: Optional[Config] = None,
    callback: Optional[Callable[[StepInfo], None]] = None,
) -> Result:
    """Repaint ``content`` in the style of ``styles`` (one image or several, blended).

    Images may be paths, PIL images, arrays or tensors. ``callback`` is called
    after every step with a ``StepInfo``.
    """
    config = config or Config()
    started = time.perf_counter()
    style_list = list(styles) if isinstance(styles, (list, tuple)) else [styles]
    if not style_list:
        raise UserError("at least one style image is needed")
    blend = config.style_blend_weights or (1.0,) * len(style_list)
    if len(blend) != len(style_list):
        raise UserError(f"style_blend_weights has {len(blend)} values but there are {len(style_list)} style images")
    device = resolve_device(config.device)

    content_img = load_image(content, "content image")
    style_imgs = [load_image(s, "style image") for s in style_list]
    min_side = 2 ** downsampling(config.model, config.feature_layers)
    schedule = build_schedule(*content_img.shape[-2:], config.size, config.min_size, config.steps, min_side)
    extractor = loop_extractor(config, device)
    generator = torch.Generator().manual_seed(config.seed)

    history: list[dict] = []
    total_steps = sum(s.steps for s in schedule)
    image = None
    for scale in schedule:
        size = (scale.height, scale.width)
        content_t = resize(content_img, size).unsqueeze(0).to(device)
        if image is None:
            image = _initial_image(config.init, content_t, generator)
        else:
            image = resize(image, size)
        criterion = build_criterion(config, extractor, content_t, style_imgs, blend, min_side)

        def on_step(i, total, parts, live, scale=scale):
            record = {"scale": scale.index, "step": i, "loss": total.item()}
            record.update({k: v.item() for k, v in parts.items()})
            history.append(record)
            if callback is not None:
                callback(StepInfo(
                    scale.index, len(schedule), scale.height, scale.width, i, scale.steps,
                    len(history), total_steps, record["loss"], {k: record[k] for k in parts}, live.detach(),
                ))

        image = optimize_scale(image, extractor, criterion, scale.steps, config.optimizer, config.lr, on_step)
    return Result(image[0].float().cpu(), history, time.perf_counter() - started, config)


def _initial_image(init: str, content: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if init == "content":
        return content.clone()
    if init == "gray":
        return torch.full_like(content, 0.5)
    return torch.rand(content.shape, generator=generator).to(content)


@torch.no_grad()
def build_criterion(config, extractor, content, style_imgs, blend, min_side) -> StyleTransferLoss:
    """Loss with this scale's targets: content features and the blended style Grams."""
    content_feats = extractor(content)
    long_side = round(config.style_scale * max(content.shape[-2:]))
    grams: dict[str, torch.Tensor] = {}
    total_w = float(sum(blend))
    for style, w in zip(style_imgs, blend):
        if w == 0:
            continue
        h, w_px = fit_long_side(*style.shape[-2:], long_side)
        if min(h, w_px) < min_side:  # tiny style_scale or a thin style image
            h, w_px = fit_long_side(*style.shape[-2:], round(long_side * min_side / min(h, w_px)))
        feats = extractor(resize(style, (h, w_px)).unsqueeze(0).to(content.device))
        for name in config.style_layers:
            g = GramStyleLoss.target_from(feats[name]) * (w / total_w)
            grams[name] = grams[name] + g if name in grams else g
    return StyleTransferLoss(
        content={name: ContentLoss(content_feats[name]) for name in config.content_layers},
        style={name: GramStyleLoss(grams[name]) for name in config.style_layers},
        content_layer_weights=config.content_layer_weights or (1.0,) * len(config.content_layers),
        style_layer_weights=config.style_layer_weights or (1.0,) * len(config.style_layers),
        content_weight=config.content_weight,
        style_weight=config.style_weight,
        tv_weight=config.tv_weight,
    )
