"""Checking what a client sends before anything runs: the options (through ``Config``) and the images.

Every refusal is a ``UserError`` of one sentence, which the app answers with a 4xx. Images are checked in
two stages: the header (format and pixel count, read without decoding, so a decompression bomb costs
nothing), then a full decode (so a truncated file is refused now, not halfway through a job).
"""

from __future__ import annotations

import dataclasses
import io
import typing
from dataclasses import dataclass
from typing import Optional

import torch
from PIL import Image, UnidentifiedImageError

from engine.config import INITS, Config
from engine.errors import UserError, pixels
from engine.images import FORMATS, MAX_INPUT_PIXELS, pil_to_tensor

# The settings a client may choose. Left out: anything that names a file on the server (weights, init
# images, style masks), what the Engine is built with (the network and its layers, device, precision:
# engine.service.FIXED, set by `nst serve` options), how it computes (tiling, batching) and its limits
# (max_pixels), which are the operator's.
# The options a client may set: the Config fields marked "http" (engine/config.py); the rest are the server's.
CLIENT_OPTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata.get("http"))
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)
DECODABLE = tuple(dict.fromkeys(FORMATS.values()))  # PNG, JPEG, TIFF, WEBP, BMP


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int  # the whole request body
    max_pixels: int  # each uploaded image, checked from its header before decoding


def parse_options(form: dict[str, str]) -> dict:
    """The client's settings as typed values, each checked by name; ``Config`` checks the values themselves."""
    options = {}
    for name, text in form.items():
        if name not in CLIENT_OPTIONS:
            if name in _FIELDS:
                raise UserError(f"{name} is chosen by the server, not per job; options a job may set: {_listing()}")
            raise UserError(f"unknown option {name!r}; options a job may set: {_listing()}")
        options[name] = _typed(name, text.strip())
    if options.get("init", "content") not in INITS:
        raise UserError(f"init must be one of {', '.join(INITS)} over HTTP, not {options['init']!r}")
    return options


def options_schema(base: Config) -> list[dict]:
    """Every option a client may set, from ``Config``'s fields and their metadata (nothing here names a value):
    name, type, default (the server's), help, and choices where the field declares them."""
    fields = {f.name: f for f in dataclasses.fields(Config)}  # read now: choices may be registered late
    out = []
    for name in CLIENT_OPTIONS:
        kind, nullable = _HINTS[name], False
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind, nullable = typing.get_args(kind)[0], True
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            type_name = "numbers" if item is float else "names"  # comma-separated, as Config reads them
        else:
            type_name = {int: "integer", float: "number"}.get(kind, "string")
        default = getattr(base, name)
        entry = {
            "name": name,
            "type": type_name,
            "nullable": nullable,
            "default": list(default) if isinstance(default, tuple) else default,
            "help": fields[name].metadata.get("help", ""),
        }
        choices = INITS if name == "init" else fields[name].metadata.get("choices")  # no files over HTTP
        if choices:
            entry["choices"] = list(choices)
        out.append(entry)
    return out


def job_config(base: Config, options: dict) -> Config:
    """The job's whole ``Config``: the server's settings with the client's options on top (validated here)."""
    values = {f: getattr(base, f) for f in _FIELDS}
    values.update(options)
    return Config(**values)


def _listing() -> str:
    return ", ".join(CLIENT_OPTIONS)


def _typed(name: str, text: str):
    kind = _HINTS[name]
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        if text == "":
            return None
        kind = typing.get_args(kind)[0]
    if "tuple" in str(kind):
        return text  # Config splits comma-separated lists and says what is wrong with them
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{name} must be a whole number, not {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"{name} must be a number, not {text!r}") from None
    return text


def display_name(filename: Optional[str], fallback: str) -> str:
    """A client's file name as shown back to it: the last path part, printable, short. Never opened."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:80]
    return name or fallback


# Above this many pixels an upload is reduced while it is decoded (``shrink_to``): a JPEG at a coarser DCT
# scale, an 8-bit image by whole-pixel box averaging, both to at least twice the size the job uses, so that a
# 49 Mpx upload never exists as 49 Mpx of float32 (600 MB). Smaller images take the exact path (the same
# pixels as ``nst stylize``).
LARGE_PIXELS = 16_000_000
_BOXABLE = ("RGB", "L", "CMYK", "YCbCr")


def check_image(
    data: bytes,
    what: str,
    limits: UploadLimits,
    shrink_to: Optional[typing.Callable[[int, int], tuple[int, int]]] = None,
) -> torch.Tensor:
    """Decode an uploaded image after checking its header; a ``UserError`` naming ``what`` when it is refused.

    ``shrink_to(height, width)``: the size the image will be used at; a large image is reduced towards it
    while it is decoded (see ``LARGE_PIXELS``), never below twice that size.
    """
    if not data:
        raise UserError(f"{what} is empty")
    limit = min(limits.max_pixels, MAX_INPUT_PIXELS)
    refuse = f"above this server's {pixels(limit)} limit for uploads; refusing to decode it"
    try:
        # Pillow refuses by itself past twice its MAX_IMAGE_PIXELS (and warns past it, which the limit here,
        # at most MAX_INPUT_PIXELS, makes moot); no warnings filter: it is process-wide, and requests are
        # checked in threads.
        with Image.open(io.BytesIO(data), formats=DECODABLE) as img:
            width, height = img.size  # from the header: nothing is decoded yet
            if width * height > limit:
                raise UserError(f"{what} is {width}x{height} = {pixels(width * height)}, {refuse}")
            if shrink_to is None or width * height <= LARGE_PIXELS:
                img.load()
                return pil_to_tensor(img)
            th, tw = shrink_to(height, width)
            if img.format == "JPEG":
                img.draft("RGB", (2 * tw, 2 * th))  # decodes at 1/2, 1/4 or 1/8 scale, still >= 2x the target
            img.load()
            factor = min(img.size[1] // (2 * th), img.size[0] // (2 * tw))
            if factor >= 2 and img.mode in _BOXABLE:
                img = img.reduce(factor)
            return pil_to_tensor(img)
    except Image.DecompressionBombError:
        raise UserError(f"{what} declares a size {refuse}") from None
    except UnidentifiedImageError:
        raise UserError(f"{what} is not an image in a format this server reads ({', '.join(DECODABLE)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's words for truncated or corrupt data
        if isinstance(exc, UserError):
            raise
        detail = str(exc).split("\n")[0][:100]
        raise UserError(f"{what} could not be decoded; it is truncated or damaged ({detail})") from None
