"""``nst compare``: several losses or settings on one content/style pair, on one labelled sheet.

The sheet has one column per picture: the content, every style, and each
run's result, every one scaled to the results' height, with a label strip
above it (the loss, each varied setting, and the wall time, one per line).
Each loss first runs one untimed step per scale (a shared warm-up), so the
first column's time does not include loading the weights and first-call costs.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable, Optional, Sequence, Union

import torch
from PIL import Image, ImageDraw, ImageFont

from engine.api import stylize
from engine.config import Config
from engine.errors import UserError
from engine.images import ImageLike, load_image, to_pil

PAD = 8
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


@dataclasses.dataclass
class Column:
    label: str
    image: torch.Tensor  # (3, H, W) in [0, 1]


Vary = tuple[str, Sequence[str]]


def variants(config: Config, losses: Sequence[str], vary: Union[None, Vary, Sequence[Vary]] = None):
    """``[(label, Config)]``: every loss, crossed with every value of each varied field.

    ``vary`` is one ``(field, values)`` pair or a list of them; the label has
    one line for the loss and one per varied field.
    """
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if vary is None:
        vary = []
    elif len(vary) == 2 and isinstance(vary[0], str):
        vary = [vary]
    names = [name for name, _ in vary]
    for name in names:
        if name not in fields or name == "style_loss":
            raise UserError(
                f"--vary names {name!r}, which is not a setting to vary; use a field of engine.Config "
                "such as style_weight or lr"
            )
    if len(set(names)) < len(names):
        raise UserError(f"--vary names {names[0]!r} twice; give all its values in one --vary")
    out = []
    for loss in losses:
        for values in itertools.product(*[list(v) for _, v in vary]):
            changes = {"style_loss": loss}
            lines = [loss]
            for name, value in zip(names, values):
                changes[name] = _parse(fields[name], value)
                lines.append(f"{name}={value}")
            out.append(("\n".join(lines), dataclasses.replace(config, **changes)))
    return out


def _parse(field, text: str):
    kind = str(field.type)
    try:
        if "tuple" in kind:
            return tuple(float(x) if "float" in kind else x for x in text.split("+"))
        if "float" in kind:
            return float(text)
        if "int" in kind:
            return int(text)
    except ValueError:
        raise UserError(f"--vary value {text!r} is not a valid {field.name}") from None
    return text


def run_comparison(
    content: ImageLike,
    styles: Sequence[ImageLike],
    runs: Sequence[tuple[str, Config]],
    on_run: Optional[Callable[[str, float], None]] = None,
    callback=None,
) -> list[Column]:
    """Run every ``(label, config)`` and return the sheet's columns (content, style, results)."""
    if not runs:
        raise UserError("nothing to compare: name at least one loss")
    content_t = load_image(content, "content image")
    style_ts = [load_image(s, "style image") for s in styles]
    names = ["style"] if len(style_ts) == 1 else [f"style {i}" for i in range(1, len(style_ts) + 1)]
    columns = [Column("content", content_t)] + [Column(n, s) for n, s in zip(names, style_ts)]
    warmed = set()
    for label, config in runs:
        if config.style_loss not in warmed:
            # Untimed: weights read, kernels chosen, caches filled, at every scale's shape.
            stylize(content_t, style_ts, dataclasses.replace(config, steps=1))
            warmed.add(config.style_loss)
        started = time.perf_counter()
        result = stylize(content_t, style_ts, config, callback=callback)
        seconds = time.perf_counter() - started
        columns.append(Column(f"{label}\n{seconds:.1f} s", result.image))
        if on_run is not None:
            on_run(label, seconds)
    return columns


def make_sheet(columns: Sequence[Column], height: Optional[int] = None) -> tuple[Image.Image, list[tuple[int, int]]]:
    """The sheet, and each column's ``(left, right)`` pixel span; tiles share ``height`` (default: the last's)."""
    height = height or columns[-1].image.shape[-2]
    font = _font(max(12, height // 18))
    line_h = font.getbbox("Ag")[3] + 2
    label_h = line_h * max(len(c.label.split("\n")) for c in columns) + 2 * PAD
    tiles = []
    for column in columns:
        h, w = column.image.shape[-2:]
        width = max(1, round(w * height / h))
        tiles.append(to_pil(column.image).resize((width, height), Image.Resampling.LANCZOS))
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + PAD * (len(tiles) + 1), height + label_h + PAD), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    spans, x = [], PAD
    for column, tile in zip(columns, tiles):
        sheet.paste(tile, (x, label_h))
        for k, line in enumerate(column.label.split("\n")):  # one line each, so no part is cut for another
            draw.text((x, PAD + k * line_h), _fit(draw, line, font, tile.width), fill=INK, font=font)
        spans.append((x, x + tile.width))
        x += tile.width + PAD
    return sheet, spans


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, shortened with an ellipsis until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
