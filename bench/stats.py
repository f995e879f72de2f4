"""The statistics behind the bench's figures: spreads of repeated timings, ratios between runs, a cost model.

Timings on a shared machine are skewed (a step is sometimes slowed, never sped
up), so every figure is a median, and its uncertainty comes from a percentile
bootstrap over the repeats: resample the repeats with replacement, take the
median, repeat ``RESAMPLES`` times, keep the 2.5th and 97.5th percentiles.
The generator is seeded, so the same samples always give the same interval.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

RESAMPLES = 4000
LEVEL = 0.95


def _rng() -> np.random.Generator:
    return np.random.default_rng(20261124)


def _bootstrap_medians(samples: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    data = np.asarray(samples, dtype=float)
    picks = rng.integers(0, len(data), size=(RESAMPLES, len(data)))
    return np.median(data[picks], axis=1)


def _interval(values: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def summary(samples: Sequence[float]) -> dict:
    """Median, quartiles and the bootstrap 95% interval of the median of ``samples``."""
    if not samples:
        raise ValueError("no samples")
    data = np.asarray(samples, dtype=float)
    q1, median, q3 = np.percentile(data, [25, 50, 75])
    low, high = _interval(_bootstrap_medians(data, _rng()))
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "ci_low": low, "ci_high": high}


def ratio_interval(old: Sequence[float], new: Sequence[float]) -> tuple[float, float, float]:
    """``(ratio, low, high)``: median(new) / median(old) and its bootstrap 95% interval (each side resampled)."""
    rng = _rng()
    ratios = _bootstrap_medians(new, rng) / _bootstrap_medians(old, rng)
    low, high = _interval(ratios)
    return float(np.median(new) / np.median(old)), low, high


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds per step = ``fixed_s + per_pixel_s * pixels``, fitted to medians at several sizes."""

    fixed_s: float
    per_pixel_s: float
    worst_residual: float  # the largest |fit - measured| / measured over the sizes fitted

    def predict(self, pixels: float) -> float:
        return self.fixed_s + self.per_pixel_s * pixels

    def describe(self) -> str:
        return (
            f"{self.fixed_s * 1e3:.1f} ms + {self.per_pixel_s * 1e9:.1f} ms per Mpx "
            f"(fits every size within {100 * self.worst_residual:.1f}%)"
        )


def fit_cost(pixels: Sequence[float], seconds: Sequence[float]) -> CostModel:
    """Least squares on *relative* errors, so that small sizes (small times) weigh as much as large ones.

    Needs two sizes or more. Either coefficient may come out negative when the
    data are not linear in the pixel count; the residual says how well it fits.
    """
    p = np.asarray(pixels, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if len(np.unique(p)) < 2:
        raise ValueError("a cost model needs timings at two sizes or more")
    # Minimise sum(((a + b p - t) / t)^2): the rows [1/t, p/t] against a target of ones.
    design = np.stack([1 / t, p / t], axis=1)
    (fixed, per_pixel), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    worst = float(np.max(np.abs(fixed + per_pixel * p - t) / t))
    return CostModel(float(fixed), float(per_pixel), worst)
