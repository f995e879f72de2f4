"""The coarse-to-fine schedule.

Optimising at a small size first and upsampling the result gives the large
structures of the style room to form (a VGG receptive field covers more of a
small image) and makes most steps cheap. Scales grow by sqrt(2), so each
has twice the pixels of the previous one; steps shrink by sqrt(2) per scale
because the upsampled result is already close to the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UserError, option
from .images import fit_long_side

FACTOR = math.sqrt(2.0)


@dataclass(frozen=True, kw_only=True)
class Scale:
    index: int
    height: int
    width: int
    steps: int


def long_sides(size: int, min_size: int) -> list[int]:
    """Long sides from about ``min_size`` up to ``size``, a factor sqrt(2) apart."""
    sides = [size]
    while round(sides[-1] / FACTOR) >= min_size:
        sides.append(round(sides[-1] / FACTOR))
    return sides[::-1]


def build_schedule(height: int, width: int, size: int, min_size: int, steps: int, min_side: int = 1) -> list[Scale]:
    """Scales for a content image of ``height x width``.

    ``min_side`` is the smallest short side the network accepts (2 ** pools);
    scales whose short side would fall below it are skipped.
    """
    scales = []
    for side in long_sides(size, min_size):
        h, w = fit_long_side(height, width, side)
        if min(h, w) >= min_side:
            scales.append((h, w))
    if not scales:
        h, w = fit_long_side(height, width, size)
        raise UserError(
            f"at size {size} the content becomes {w}x{h} px, but the chosen layers need at least "
            f"{min_side} px on each side; use a larger {option('size')} or shallower layers"
        )
    return [
        Scale(index=i, height=h, width=w, steps=max(1, round(steps / FACTOR**i))) for i, (h, w) in enumerate(scales)
    ]
