"""Image decoding, resizing and atomic, no-clobber writing. All images are made here."""

import hashlib
import os

import numpy as np
import png
import pytest
import tifffile
import torch
from PIL import Image

from engine import UserError
from engine import images as images_mod
from engine.images import fit_long_side, load_image, resize, save_image


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corner_image(w=6, h=4, block=1):
    """White image with a red block in the top-left corner."""
    arr = np.full((h, w, 3), 255, np.uint8)
    arr[:block, :block] = (255, 0, 0)
    return Image.fromarray(arr, "RGB")


# A 8x12 (w x h) picture with red at its top-left, stored with an EXIF Orientation tag:
# 6 = shown rotated 90 degrees clockwise, 8 = counter-clockwise, 3 = upside down.
@pytest.mark.parametrize("orientation,shape,red_at", [(6, (8, 12), (0, 11)), (8, (8, 12), (7, 0)), (3, (12, 8), (11, 7))])
def test_exif_orientation_applied(tmp_path, orientation, shape, red_at):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    corner_image(8, 12, block=3).save(path, quality=100, subsampling=0, exif=exif)
    t = load_image(path)
    assert tuple(t.shape) == (3, *shape)
    y, x = red_at
    assert t[0, y, x] > 0.8 and t[1, y, x] < 0.3, t[:, y, x]
    assert t[1, shape[0] - 1 - y, shape[1] - 1 - x] > 0.8  # the opposite corner stays white


def test_modes_are_converted(tmp_path):
    gray = Image.fromarray(np.array([[0, 128], [255, 64]], np.uint8), "L")
    t = load_image(gray)
    assert t.shape == (3, 2, 2) and t.dtype == torch.float32
    torch.testing.assert_close(t[:, 0, 1], torch.full((3,), 128 / 255), rtol=0, atol=1e-6)

    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    t = load_image(rgba)
    torch.testing.assert_close(t[:, 0, 0], torch.ones(3), rtol=0, atol=1e-6)  # transparent -> white
    torch.testing.assert_close(t[:, 0, 1], torch.tensor([10, 20, 30]) / 255, rtol=0, atol=1e-6)

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    t = load_image(path)
    torch.testing.assert_close(t[:, 0, 0], torch.ones(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(t[:, 0, 1], torch.tensor([200 / 255, 0, 0]), rtol=0, atol=1e-6)

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    t = load_image(cmyk)
    assert t.shape == (3, 8, 8) and t[0].mean() > 0.8 and t[1].mean() < 0.2

    bilevel = Image.new("1", (3, 3), 1)
    assert load_image(bilevel).min() == 1.0


def test_16bit_grayscale_keeps_its_range(tmp_path):
    path = tmp_path / "deep.png"
    arr = np.array([[0, 32768, 65535]], np.uint16)
    with open(path, "wb") as fh:
        png.Writer(3, 1, greyscale=True, bitdepth=16).write(fh, arr)
    t = load_image(path)
    torch.testing.assert_close(t[0, 0], torch.tensor([0.0, 32768 / 65535, 1.0]), rtol=0, atol=1e-6)


def test_animated_gif_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    t = load_image(path)
    assert t.shape == (3, 4, 4) and t[0].mean() > 0.9 and t[2].mean() < 0.1


def test_arrays_and_tensors_accepted():
    chw = torch.rand(3, 5, 7)
    torch.testing.assert_close(load_image(chw), chw, rtol=0, atol=0)
    torch.testing.assert_close(load_image(chw[None]), chw, rtol=0, atol=0)
    hwc = (np.random.default_rng(0).random((5, 7, 3)) * 255).astype(np.uint8)
    torch.testing.assert_close(load_image(hwc), torch.from_numpy(hwc).permute(2, 0, 1).float() / 255, rtol=0, atol=0)
    with pytest.raises(UserError, match="shape"):
        load_image(torch.rand(2, 3, 4, 4))
    with pytest.raises(UserError, match="NaN"):
        load_image(torch.full((3, 2, 2), float("nan")))


def test_fit_long_side_and_resize():
    assert fit_long_side(768, 1024, 256) == (192, 256)
    assert fit_long_side(1, 10000, 64) == (1, 64)
    img = torch.zeros(3, 40, 60)
    img[:, ::2] = 1.0  # stripes: bicubic would overshoot without the clamp
    out = resize(img, (27, 41))
    assert out.shape == (3, 27, 41)
    assert out.min() >= 0 and out.max() <= 1
    # Antialiasing averages the stripes instead of aliasing them.
    assert abs(out.mean().item() - 0.5) < 0.05 and out.std() < 0.2


@pytest.fixture
def image():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 9, 11, generator=g)


def test_png_and_jpeg_round_trip(tmp_path, image):
    save_image(image, tmp_path / "a.png")
    torch.testing.assert_close(load_image(tmp_path / "a.png"), image, rtol=0, atol=0.5 / 255 + 1e-6)
    save_image(image, tmp_path / "a.jpg")
    assert load_image(tmp_path / "a.jpg").shape == image.shape


def test_16bit_png_and_tiff_really_hold_16_bits(tmp_path, image):
    save_image(image, tmp_path / "a.png", bit_depth=16)
    w, h, rows, info = png.Reader(filename=str(tmp_path / "a.png")).read()
    assert info["bitdepth"] == 16 and (w, h) == (11, 9)
    got = torch.tensor(np.vstack([np.asarray(r, np.float64) for r in rows])).reshape(9, 11, 3).permute(2, 0, 1) / 65535
    torch.testing.assert_close(got, image.double(), rtol=0, atol=0.5 / 65535 + 1e-7)  # half a 16-bit step, plus float32 rounding
    save_image(image, tmp_path / "a.tif", bit_depth=16)
    arr = tifffile.imread(tmp_path / "a.tif")
    assert arr.dtype == np.uint16
    got = torch.from_numpy(arr.astype(np.float64)).permute(2, 0, 1) / 65535
    torch.testing.assert_close(got, image.double(), rtol=0, atol=0.5 / 65535 + 1e-7)  # half a 16-bit step, plus float32 rounding
    # Finer than 8 bits: values that 8 bits cannot represent survive.
    assert (got * 255 - (got * 255).round()).abs().max() > 0.1


def test_no_overwrite_unless_asked(tmp_path, image):
    target = tmp_path / "keep.png"
    target.write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists"):
        save_image(image, target)
    assert target.read_bytes() == b"precious"
    save_image(image, target, overwrite=True)
    assert load_image(target).shape == image.shape
    assert os.listdir(tmp_path) == ["keep.png"]


@pytest.mark.parametrize(
    "name,bits,match",
    [("x.gif2", 8, "unknown extension"), ("x.jpg", 16, "16-bit output"), ("missing/x.png", 8, "does not exist")],
)
def test_bad_output_paths(tmp_path, image, name, bits, match):
    with pytest.raises(UserError, match=match):
        save_image(image, tmp_path / name, bit_depth=bits)


def test_failed_write_leaves_nothing_behind(tmp_path, image, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    before = sha(target)

    def broken_save(self, fh, *args, **kwargs):
        fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_image(image, target, overwrite=True)
    assert sha(target) == before
    assert os.listdir(tmp_path) == ["out.png"]  # no .part file left


@pytest.mark.parametrize(
    "kind,match",
    [("missing", "does not exist"), ("dir", "is a directory"), ("empty", "could not be read"),
     ("text", "could not be read"), ("truncated", "could not be read")],
)
def test_unreadable_inputs_are_one_sentence(tmp_path, kind, match):
    path = tmp_path / "in.png"
    if kind == "dir":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path = tmp_path / "notes.jpg"
        path.write_text("this is not an image\n")
    elif kind == "truncated":
        corner_image(64, 64).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=match) as info:
        load_image(path, "content image")
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and msg.startswith("content image")


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(images_mod, "MAX_INPUT_PIXELS", 5000)  # stands in for a huge declared size
    with pytest.raises(UserError, match="refusing to decode"):
        load_image(path)
