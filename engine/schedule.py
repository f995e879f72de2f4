"""The coarse-to-fine schedule.

Optimising at a small size first and upsampling the result gives the large
structures of the style room to form (a VGG receptive field covers more of a
small image) and makes most steps cheap. The schedule (``SCHEDULES``, the
``--schedule`` option) says how far apart the scales are and how many steps
each takes, all in proportion to ``--steps``, the steps of the first scale:

* ``sqrt2`` (the default): scales sqrt(2) apart, so each has twice the pixels
  of the one before, and each finer scale takes 1/sqrt(2) as many steps,
  because the upsampled result is already close to the answer. Each scale
  then costs sqrt(2) times the pixel-steps of the one before: the last two
  scales take about half the time.
* ``lean``: scales twice as far apart, ``steps`` at the first,
  ``steps / 16`` at each between and ``steps / 2 ** (scales - 1)`` at the
  last (see ``_lean``): about 41% of ``sqrt2``'s pixel-steps at print
  sizes. Alone it is a draft; with starts that carry the photo's detail and
  the painting's colours up the scales (``--init palette --detail 1``,
  engine/core.py) and ``--style-weight 5`` it reached ``sqrt2``'s judged
  quality on the bundled pair, but not on every pair (docs/speed.md, "The
  schedule").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .errors import UserError, option
from .images import fit_long_side

FACTOR = math.sqrt(2.0)


@dataclass(frozen=True, kw_only=True)
class Scale:
    index: int
    height: int
    width: int
    steps: int


def long_sides(size: int, min_size: int, factor: float = FACTOR) -> list[int]:
    """Long sides from about ``min_size`` up to ``size``, ``factor`` apart."""
    sides = [size]
    while round(sides[-1] / factor) >= min_size:
        sides.append(round(sides[-1] / factor))
    return sides[::-1]


def _sqrt2(index: int, count: int, steps: int) -> int:
    return round(steps / FACTOR**index)


def _lean(index: int, count: int, steps: int) -> int:
    """With scales twice as far apart: the first ``steps``; the scales between ``steps / 16``; the last
    ``steps / 2 ** (count - 1)``, what ``sqrt2`` gives the last scale of the same size. The last scale's steps
    are what the judge of quality reads most; the scales between carry the picture up to it."""
    if index == 0:
        return steps
    if index == count - 1:
        return round(steps / 2 ** (count - 1))
    return round(steps / 16)


@dataclass(frozen=True)
class Schedule:
    factor: float  # between the long sides of consecutive scales
    steps: Callable[[int, int, int], int]  # (index, number of scales, --steps) -> steps of that scale


SCHEDULES = {"lean": Schedule(2.0, _lean), "sqrt2": Schedule(FACTOR, _sqrt2)}


def build_schedule(
    height: int, width: int, size: int, min_size: int, steps: int, min_side: int = 1, *, schedule: str
) -> list[Scale]:
    """Scales for a content image of ``height x width``, with ``schedule``'s steps (``SCHEDULES``).

    ``min_side`` is the smallest short side the network accepts (2 ** pools);
    scales whose short side would fall below it are skipped.
    """
    rule = SCHEDULES[schedule]
    scales = []
    for side in long_sides(size, min_size, rule.factor):
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
        Scale(index=i, height=h, width=w, steps=max(1, rule.steps(i, len(scales), steps)))
        for i, (h, w) in enumerate(scales)
    ]
