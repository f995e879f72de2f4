"""Reading, resizing and writing images.

Inside the engine an image is a float32 tensor ``(3, H, W)`` of RGB in
[0, 1]. Decoding is Pillow's, with EXIF orientation applied; odd modes are
converted here so that nothing downstream has to care. Writing is atomic and
never replaces an existing file unless asked to.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .files import check_writable, write_atomically

ImageLike = Union[str, os.PathLike, Image.Image, torch.Tensor, np.ndarray]

FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
    ".bmp": "BMP",
}
SIXTEEN_BIT = (".png", ".tif", ".tiff")
# Pillow's default guard against decompression bombs is 89 Mpx with a warning and
# 179 Mpx with an error; we turn the warning into a refusal at our own limit.
MAX_INPUT_PIXELS = 256 * 1024 * 1024


def load_image(source: ImageLike, what: str = "image") -> torch.Tensor:
    """Any supported image source as a float32 ``(3, H, W)`` tensor in [0, 1]."""
    if isinstance(source, torch.Tensor):
        return _tensor_image(source, what)
    if isinstance(source, np.ndarray):
        # numpy images are (H, W, C) or (H, W), as Pillow, imageio and OpenCV give them: no guessing,
        # since a 3-row picture would otherwise look like channels first.
        if source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[-1] not in (1, 3)):
            raise UserError(f"{what} array has shape {source.shape}; expected (H, W, 3), (H, W, 1) or (H, W)")
        chw = source if source.ndim == 2 else source.transpose(2, 0, 1)
        return _tensor_image(torch.from_numpy(np.ascontiguousarray(chw)), what, kind="array")
    if isinstance(source, Image.Image):
        return pil_to_tensor(source)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a directory, not an image file")
    Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return pil_to_tensor(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(
            f"{what} {str(path)!r} declares more than {MAX_INPUT_PIXELS} pixels; refusing to decode it"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError/ValueError.
        detail = str(exc).split("\n")[0][:100]
        raise UserError(f"{what} {str(path)!r} could not be read as an image ({detail})") from None


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert any Pillow mode to RGB float in [0, 1], honouring EXIF orientation."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Deep grayscale: scale by the real range, not Pillow's 8-bit clip.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = max(1.0, float(arr.max(initial=0)))
        gray = torch.from_numpy(np.clip(arr / top, 0, 1)).float()
        return gray.expand(3, *gray.shape).contiguous()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, as in a viewer on a white page.
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    img = img.convert("RGB")  # covers L, P, CMYK, YCbCr, LAB, 1
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _tensor_image(t: torch.Tensor, what: str, kind: str = "tensor") -> torch.Tensor:
    """``kind`` "array": already channels first (from a numpy image); "tensor": (C, H, W) or (H, W, 3)."""
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if kind == "tensor" and t.dim() == 3 and t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):
        t = t.permute(2, 0, 1)  # an (H, W, 3) tensor made from a numpy image; unambiguous only here
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise UserError(f"{what} {kind} has shape {tuple(t.shape)}; expected (3, H, W), (1, 3, H, W) or (H, W, 3)")
    t = t.detach().cpu()
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif t.dtype == torch.uint16:  # 16-bit images as imageio, OpenCV and tifffile give them
        t = t.float() / 65535.0
    elif t.dtype == torch.bool or not t.dtype.is_floating_point:
        raise UserError(
            f"{what} {kind} has dtype {str(t.dtype).removeprefix('torch.')}; use uint8 (0-255), "
            "uint16 (0-65535) or floats in [0, 1]"
        )
    t = t.float()
    if not torch.isfinite(t).all():
        raise UserError(f"{what} {kind} has NaN or infinite values")
    # Clamping would turn a 0-255 float picture into a near-white one; a small overshoot (resampling) is fine.
    top = t.max().item() if t.numel() else 0.0
    if top > 1.5:
        raise UserError(
            f"{what} {kind} has float values up to {top:g}; floats must be in [0, 1] (divide by 255), or pass uint8"
        )
    return t.expand(3, -1, -1).clamp(0, 1).contiguous()


def fit_long_side(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the given long side and the same aspect ratio, each at least 1."""
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of ``(..., C, H, W)``; clamped because bicubic overshoots."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    batched = image if image.dim() == 4 else image.unsqueeze(0)
    out = F.interpolate(batched, size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    return out if image.dim() == 4 else out[0]


def check_output_path(path: Union[str, os.PathLike], overwrite: bool, bit_depth: int = 8) -> Path:
    """Fail before any work when ``path`` cannot be written as asked."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise UserError(f"output {str(path)!r} has an unknown extension; use one of {', '.join(FORMATS)}")
    if bit_depth not in (8, 16):
        raise UserError(f"bit depth must be 8 or 16, not {bit_depth!r}")
    if bit_depth == 16 and ext not in SIXTEEN_BIT:
        raise UserError(f"16-bit output needs a .png or .tif file, not {str(path)!r}")
    return check_writable(path, overwrite)


def save_image(image: torch.Tensor, path: Union[str, os.PathLike], overwrite: bool = False, bit_depth: int = 8) -> Path:
    """Write ``(3, H, W)`` in [0, 1] to ``path`` atomically: a temporary file, then a rename."""
    path = check_output_path(path, overwrite, bit_depth)
    ext = path.suffix.lower()
    arr = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()

    def write(fh):
        if bit_depth == 16:
            _write_16bit(fh, np.rint(arr * 65535).astype(np.uint16), ext)
        else:
            pil = Image.fromarray(np.rint(arr * 255).astype(np.uint8), "RGB")
            options = {"quality": 95} if FORMATS[ext] in ("JPEG", "WEBP") else {}
            pil.save(fh, format=FORMATS[ext], **options)

    return write_atomically(path, write, overwrite)


def _write_16bit(fh, arr: np.ndarray, ext: str) -> None:
    # Pillow cannot write 16-bit RGB; pypng and tifffile are small, pure-Python writers.
    if ext == ".png":
        import png

        h, w, _ = arr.shape
        png.Writer(w, h, greyscale=False, bitdepth=16).write(fh, arr.reshape(h, w * 3))
    else:
        import io

        import tifffile

        # tifffile reads the handle's .name, which is an int for os.fdopen handles.
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, arr, photometric="rgb")
        fh.write(buffer.getbuffer())


def to_pil(image: torch.Tensor) -> Image.Image:
    arr = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return Image.fromarray(np.rint(arr * 255).astype(np.uint8), "RGB")


def digest(image: torch.Tensor) -> str:
    """SHA-256 of a tensor's float32 values and shape: what a checkpoint and the style cache know an image by."""
    t = image.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def at_most(image: torch.Tensor, size: int) -> torch.Tensor:
    """``image`` shrunk so that its long side is at most ``size`` (as it is when it is no larger)."""
    if max(image.shape[-2:]) <= size:
        return image
    return resize(image, fit_long_side(*image.shape[-2:], size))
