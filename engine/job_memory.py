"""What one job costs in memory before it runs: the images it holds while it waits, and its run's peak.

A service uses this to refuse a job that could never fit and to share one budget between the jobs it holds
(``nst serve --memory-budget``). It is the model of ``memory.py`` (activations, the image-side state of a
scale in the mode ``plan_scale`` would pick, and the style loss's targets and per-step buffers as its class
declares them, with the job's real style sizes) plus what that model leaves out because a one-off run never
needed it: the decoded images kept from submission to the end and the style images' forward pass.

Only a model: it aims to be an upper bound within some tens of percent; the tests check it against
measured peaks only for the terms a client can blow up (image sizes, styles, projections).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .config import Config
from .images import fit_long_side
from .memory import OutOfBudget, layer_bytes, plan_scale
from .sizes import min_side as network_min_side
from .sizes import style_size

FLOAT = 4
RGB_FLOAT = 3 * FLOAT  # a decoded image, (3, H, W) float32


@dataclass(frozen=True)
class JobMemory:
    """Bytes a job holds while it waits (``held``: its decoded images) and adds at its run's peak (``run``)."""

    held: int
    run: int

    @property
    def total(self) -> int:
        return self.held + self.run


def style_shape(config: Config, height: int, width: int) -> tuple[int, int]:
    """The largest a style image of ``height x width`` gets in a job: its size at the last scale."""
    need = network_min_side(config.model, config.feature_layers)
    return style_size(height, width, round(config.style_ratio * config.size), need)


def job_memory(
    config: Config,
    content: tuple[int, int],
    styles: Sequence[tuple[int, int]],
    runtime=None,
    budget: Optional[float] = None,
) -> JobMemory:
    """The memory of a job whose content is ``content`` (H, W) and styles ``styles`` as decoded.

    ``budget``: the bytes ``tile auto`` plans each scale for (as the run will: pass the same budget), so that
    a job that would be tiled is counted as tiled.
    """
    out_h, out_w = fit_long_side(*content, config.size)
    # The content is kept at the output size at most (core.decode_jobs shrinks a larger one).
    kept_content = min(content[0] * content[1], out_h * out_w)
    shapes = [style_shape(config, *hw) for hw in styles]
    style_pixels = [h * w for h, w in shapes]
    copies = 2 if config.preserve_colors == "luminance" else 1  # the grey content beside the colour one
    held = RGB_FLOAT * (kept_content * copies + sum(style_pixels))

    try:
        run = plan_scale(config, runtime, out_h, out_w, budget=budget, style_pixels=style_pixels).estimate
    except OutOfBudget as exc:  # what it would need: the caller compares that with its budget and says so
        run = exc.needed
    sizes = layer_bytes(config.model, config.feature_layers, FLOAT)
    # Each style's features are computed once, one style at a time, without gradients.
    style_forward = sum(sizes.values()) * max(style_pixels, default=0)
    return JobMemory(int(held), int(run + style_forward))
