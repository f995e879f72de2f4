"""The one check for every image size that reaches the network.

A size is refused in one sentence, before any work, when the network's
deepest feature map would fall below one pixel (each pool halves, rounding
down), or when it has more pixels than the limit (``Config.max_pixels``).
Every entry point calls ``check_size``: ``stylize`` (output, each scale,
style images), ``nst validate``, ``nst bench``, ``nst compare`` (through
``stylize``), the exporters' example input.
"""

from __future__ import annotations

from typing import Iterable, Optional

from .errors import UserError, option, pixels
from .images import fit_long_side
from .vgg import downsampling

# A guard against typos (`--size 90000`), not a memory estimate (--tile auto makes any size fit what the
# device has); Config.max_pixels defaults to it.
DEFAULT_MAX_PIXELS = 8192 * 8192


def min_side(model: str, layers: Iterable[str]) -> int:
    """The smallest side that keeps the deepest requested feature map at 1 px or more."""
    return 2 ** downsampling(model, layers)


def _network(source) -> tuple[str, tuple[str, ...], Optional[int]]:
    """``(model, layers, max_pixels)`` of a Config, an extractor, or a ``(model, layers)`` pair."""
    if hasattr(source, "feature_layers"):  # a Config
        return source.model, tuple(source.feature_layers), source.max_pixels
    if hasattr(source, "model_name"):  # a VGGFeatures
        return source.model_name, tuple(source.layers), None
    model, layers = source
    return model, tuple(layers), None


def check_size(
    source,
    height: int,
    width: int,
    what: str,
    *,
    max_pixels: Optional[int] = None,
    advice: str = "",
) -> None:
    """Refuse ``height x width`` for the network of ``source`` (a Config, an extractor or ``(model, layers)``).

    ``what`` names the picture (``"the output"``, ``"style image 2"``) and
    ``advice`` says what to change when it is too small (default: the size
    or the layers). The pixel limit is ``max_pixels``, else the Config's,
    else ``DEFAULT_MAX_PIXELS``.
    """
    model, layers, limit = _network(source)
    limit = max_pixels or limit or DEFAULT_MAX_PIXELS
    need = min_side(model, layers)
    if min(height, width) < need:
        deepest = max(layers, key=lambda name: downsampling(model, [name]))
        raise UserError(
            f"{what} would be {width}x{height} px, but the chosen layers (down to {deepest}) need at least "
            f"{need} px on each side; {advice or 'use a larger ' + option('size') + ' or shallower layers'}"
        )
    if height * width > limit:
        need = ""
        if hasattr(source, "feature_layers"):  # a Config: say what the image-side state of that size takes
            from .memory import GiB, state_bytes_per_pixel  # memory builds on the network, as this module does

            state = state_bytes_per_pixel(source)
            need = (
                f"; the image and its optimiser state alone would take {state * height * width / GiB:.1f} GiB "
                f"({state:.0f} bytes per pixel)"
            )
        raise UserError(
            f"{what} would be {width}x{height} = {pixels(height * width)}, above the {pixels(limit)} limit "
            f"({option('max_pixels')}){need}; use a smaller size, or raise the limit if you mean it"
        )


def style_size(height: int, width: int, long_side: int, need: int) -> tuple[int, int]:
    """A style image's size for a result of ``long_side``: that long side, or larger if the short side would
    fall below ``need`` (a tiny ``style_scale`` or a thin style image), aspect ratio kept."""
    h, w = fit_long_side(height, width, long_side)
    if min(h, w) >= need:
        return h, w
    if height <= width:
        return need, max(need, round(width * need / height))
    return max(need, round(height * need / width)), need
