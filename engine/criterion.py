"""The loss of one scale: content targets, style targets (Gram, OT or W2, optionally masked), TV.

Targets are computed once per scale, without gradients, under the same
autocast and layout as the loop. Style features are computed once per style
image, however many jobs or losses use them.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from . import structure
from .images import digest, resize
from .losses import ContentLoss, Moments, StyleTransferLoss
from .sizes import style_size
from .style_losses import names as style_loss_names
from .style_losses import style_loss
from .tiling import Tiling, feature_maps, feature_moments

StyleJob = tuple[Sequence[torch.Tensor], Sequence[float]]  # a job's style images and blend weights
StyleFeatures = dict  # layer name -> feature map or Moments, as the style loss needs


class StyleFeatureCache:
    """A style image's features at one size, kept for later scales and jobs (an ``Engine`` holds one).

    The key is what the features depend on, beyond the extractor and runtime the holder fixes: the
    SHA-256 of the resized style image itself (its bytes and shape, so a style used by two jobs or two
    callers hits whoever decoded it), the layers, what is kept (maps or moments) and the tile size.
    Entries stay on the device; the least recently used go first once ``max_bytes`` is exceeded.
    ``hits`` and ``misses`` count lookups.
    """

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self._entries: "OrderedDict[tuple, tuple[StyleFeatures, int]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image: torch.Tensor, settings: tuple, compute: Callable[[], StyleFeatures]) -> StyleFeatures:
        key = (digest(image), settings)
        with self._lock:
            if key in self._entries:
                self.hits += 1
                self._entries.move_to_end(key)
                return self._entries[key][0]
            self.misses += 1
        features = compute()
        size = sum(_nbytes(v) for v in features.values())
        with self._lock:
            if key not in self._entries and size <= self.max_bytes:
                self._entries[key] = (features, size)
                self.bytes += size
                while self.bytes > self.max_bytes:
                    self.bytes -= self._entries.popitem(last=False)[1][1]
        return features

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


def _nbytes(value) -> int:
    if isinstance(value, Moments):
        return _nbytes(value.mean) + _nbytes(value.scatter)
    return value.numel() * value.element_size()


@torch.no_grad()
def build_criterion(
    config,
    extractor,
    content: torch.Tensor,
    styles: Sequence[StyleJob],
    *,
    min_side: int,
    runtime=None,
    masks: Optional[torch.Tensor] = None,
    tiling: Optional[Tiling] = None,
    style_cache: Optional[StyleFeatureCache] = None,
    extra_terms: Optional[Mapping[str, tuple[float, nn.Module]]] = None,
) -> StyleTransferLoss:
    """The loss with this scale's targets, one per job.

    ``content`` is the ``(N, 3, H, W)`` batch; ``styles`` holds, per job, its
    style images and blend weights; ``masks`` (``(S, 1, H, W)``, one per
    style) ties each style to a region (Gram loss only). With ``tiling`` the
    targets are computed tile by tile (the same values, in bounded memory).
    ``style_cache`` keeps each style's features for later scales and jobs of the same size.
    ``extra_terms``: image terms added to the loss as they are (see ``StyleTransferLoss``'s ``extra``).
    ``config.style_loss`` must name a loss: ``auto`` is resolved by the caller, once for the whole run
    (``memory.resolve_style_loss``), so that every scale uses the same one.
    """
    if config.style_loss not in style_loss_names():
        raise ValueError(f"build_criterion needs a registered style loss, not {config.style_loss!r}")
    config = config.with_style_loss(config.style_loss)  # the loss's own weights where the config has none
    autocast = runtime.autocast if runtime is not None else contextlib.nullcontext
    layout = runtime.layout if runtime is not None else (lambda t: t.to(content.device))
    if tiling is not None:
        structure.check_tileable(config)
    if tiling is None:
        with autocast():
            content_feats = extractor(content)
    else:
        content_feats = feature_maps(
            extractor, content, tiling.grid(*content.shape[-2:]), config.content_layers, autocast
        )
    long_side = round(config.style_ratio * max(content.shape[-2:]))
    cache: dict[int, dict[str, torch.Tensor | Moments]] = {}
    loss_class = style_loss(config.style_loss)

    def features_of(style: torch.Tensor) -> dict[str, torch.Tensor | Moments]:
        """The style's feature maps or their Moments, as the style loss declares it ``needs``."""
        if id(style) not in cache:
            h, w = style_size(*style.shape[-2:], long_side, min_side)  # checked by sizes.check_size beforehand
            resized = resize(style, (h, w)).unsqueeze(0)
            keep = loss_class.needs == "maps"

            def compute() -> StyleFeatures:
                image = layout(resized)
                if tiling is not None:
                    return feature_moments(extractor, image, tiling.grid(h, w), config.style_layers, autocast)
                with autocast():
                    maps = extractor(image)
                return {name: maps[name] if keep else Moments.of(maps[name]) for name in config.style_layers}

            settings = (config.style_layers, keep, None if tiling is None else tiling.tile)
            cache[id(style)] = compute() if style_cache is None else style_cache.get(resized, settings, compute)
        return cache[id(style)]

    style = {}
    for name in config.style_layers:
        # Masked styles keep zero-weight entries so that style i still lines up with mask i.
        per_job = [
            [(features_of(s)[name], w) for s, w in zip(imgs, blend) if w != 0 or masks is not None]
            for imgs, blend in styles
        ]
        style[name] = loss_class.build(config=config, layer=name, per_job=per_job, masks=masks)
    return StyleTransferLoss(
        content={name: ContentLoss(content_feats[name]) for name in config.content_layers},
        style=style,
        content_layer_weights=config.content_layer_weights or (1.0,) * len(config.content_layers),
        style_layer_weights=config.style_layer_weights or (1.0,) * len(config.style_layers),
        content_weight=config.content_weight,
        style_weight=config.style_weight,
        tv_weight=config.tv_weight,
        extra=extra_terms,
        # The photo's self-similarity, once per scale: the same features the content targets came from.
        structure=(config.structure_weight, structure.StructureLoss.of(content_feats, structure.layers(config)))
        if config.structure_weight > 0
        else None,
    )
