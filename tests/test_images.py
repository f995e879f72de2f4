"""Image decoding, resizing and atomic, no-clobber writing. All images are made here, in tmp_path."""

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

EXACT = {"rtol": 0, "atol": 1e-6}  # values that must survive unchanged (k/255 computed in float32)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder):
    return sorted(os.listdir(folder))


def corner_image(w=6, h=4, block=1):
    """White image with a red block in the top-left corner."""
    arr = np.full((h, w, 3), 255, np.uint8)
    arr[:block, :block] = (255, 0, 0)
    return Image.fromarray(arr)


def assert_engine_image(t, h, w):
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert tuple(t.shape) == (3, h, w)
    assert t.min() >= 0 and t.max() <= 1


# ---------------------------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------------------------


# An 8 wide x 12 tall picture with a 3x3 red block at its top-left, stored with an EXIF Orientation
# tag: 1 = as stored, 6 = shown rotated 90 degrees clockwise, 8 = counter-clockwise, 3 = upside down.
@pytest.mark.parametrize("ext", ["jpg", "png"])
@pytest.mark.parametrize(
    "orientation,shape,red_at",
    [(1, (12, 8), (0, 0)), (6, (8, 12), (0, 11)), (8, (8, 12), (7, 0)), (3, (12, 8), (11, 7))],
)
def test_exif_orientation_applied(tmp_path, ext, orientation, shape, red_at):
    path = tmp_path / f"rot.{ext}"
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 100, "subsampling": 0} if ext == "jpg" else {}
    corner_image(8, 12, block=3).save(path, exif=exif, **options)
    assert Image.open(path).getexif()[0x0112] == orientation  # the tag really is in the file
    t = load_image(path)
    assert_engine_image(t, *shape)
    y, x = red_at
    assert t[0, y, x] > 0.9 and t[1, y, x] < 0.1 and t[2, y, x] < 0.1, t[:, y, x]
    opposite = t[:, shape[0] - 1 - y, shape[1] - 1 - x]
    torch.testing.assert_close(opposite, torch.ones(3), rtol=0, atol=0.05)  # the opposite corner stays white
    # Exactly one 3x3 block is red, wherever it landed.
    assert int(((t[0] > 0.5) & (t[1] < 0.5)).sum()) == 9


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def test_grayscale_L(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.array([[0, 128], [255, 64]], np.uint8)).save(path)
    assert Image.open(path).mode == "L"
    t = load_image(path)
    assert_engine_image(t, 2, 2)
    expected = torch.tensor([[0, 128], [255, 64]], dtype=torch.float32) / 255
    torch.testing.assert_close(t, expected.expand(3, 2, 2), **EXACT)


def test_palette_with_transparency(tmp_path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [0] * 759)
    for i in range(3):
        pal.putpixel((i, 0), i)
    path = tmp_path / "pal.png"
    # Index 0 fully transparent, 1 half transparent, 2 opaque.
    pal.save(path, transparency=bytes([0, 128, 255]))
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    t = load_image(path)
    assert_engine_image(t, 1, 3)
    half = lambda c: (c * 128 + 255 * 127) / 255 / 255  # noqa: E731  (composited on white)
    expected = torch.tensor([[1.0, 1.0, 1.0], [half(200), half(0), half(0)], [0, 200 / 255, 0]]).T
    torch.testing.assert_close(t[:, 0, :], expected, rtol=0, atol=1.01 / 255)


def test_palette_without_transparency_keeps_colours(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 0), 1)
    path = tmp_path / "pal.gif"
    pal.save(path)
    t = load_image(path)
    torch.testing.assert_close(t[:, 0, 0], torch.zeros(3), **EXACT)  # black stays black, not white
    torch.testing.assert_close(t[:, 0, 1], torch.tensor([10, 20, 30]) / 255, **EXACT)


def test_rgba_transparent_becomes_white(tmp_path):
    arr = np.array([[(10, 20, 30, 0), (10, 20, 30, 255), (200, 0, 100, 128)]], np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode == "RGBA"
    t = load_image(path)
    assert_engine_image(t, 1, 3)
    torch.testing.assert_close(t[:, 0, 0], torch.ones(3), **EXACT)  # fully transparent -> white
    torch.testing.assert_close(t[:, 0, 1], torch.tensor([10, 20, 30]) / 255, **EXACT)  # opaque kept
    over_white = torch.tensor([200 * 128 + 255 * 127, 0 * 128 + 255 * 127, 100 * 128 + 255 * 127]) / 255 / 255
    torch.testing.assert_close(t[:, 0, 2], over_white, rtol=0, atol=1.01 / 255)


def test_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red on the left half...
    img.paste((0, 0, 0, 255), (8, 0, 16, 8))  # ...black (K only) on the right half
    path = tmp_path / "cmyk.jpg"
    img.save(path, quality=100)
    assert Image.open(path).mode == "CMYK"
    t = load_image(path)
    assert_engine_image(t, 8, 16)
    torch.testing.assert_close(t[:, 2:6, 1:6].mean((1, 2)), torch.tensor([1.0, 0.0, 0.0]), rtol=0, atol=0.06)
    torch.testing.assert_close(t[:, 2:6, 10:15].mean((1, 2)), torch.zeros(3), rtol=0, atol=0.06)


@pytest.mark.parametrize("writer", ["pypng", "tifffile-big-endian"])
def test_16bit_grayscale_keeps_its_range(tmp_path, writer):
    # 1000 would read as 1.0 if the decoder clipped at 255; 32768 checks the scale is 65535.
    arr = np.array([[0, 1000, 32768, 65535]], np.uint16)
    if writer == "pypng":
        path = tmp_path / "deep.png"
        with open(path, "wb") as fh:
            png.Writer(4, 1, greyscale=True, bitdepth=16).write(fh, arr)
        assert Image.open(path).mode == "I;16"
    else:
        path = tmp_path / "deep.tif"
        tifffile.imwrite(path, arr, byteorder=">")
        assert Image.open(path).mode == "I;16B"
    t = load_image(path)
    assert_engine_image(t, 1, 4)
    expected = torch.tensor([0.0, 1000 / 65535, 32768 / 65535, 1.0])
    torch.testing.assert_close(t[0, 0], expected, **EXACT)
    assert abs(t[0, 0, 2].item() - 0.5) < 1e-4
    torch.testing.assert_close(t[1], t[0], rtol=0, atol=0)  # gray: three equal channels
    torch.testing.assert_close(t[2], t[0], rtol=0, atol=0)


def test_animated_gif_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 2
    t = load_image(path)
    assert_engine_image(t, 4, 4)
    torch.testing.assert_close(t, torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 4, 4), rtol=0, atol=0.02)


def test_bilevel_1(tmp_path):
    bits = (np.indices((3, 4)).sum(0) % 2).astype(bool)  # checkerboard
    path = tmp_path / "bits.png"
    Image.fromarray(bits).save(path)
    assert Image.open(path).mode == "1"
    t = load_image(path)
    assert_engine_image(t, 3, 4)
    expected = torch.from_numpy(bits).float().expand(3, 3, 4)
    torch.testing.assert_close(t, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Tensors and arrays
# ---------------------------------------------------------------------------------------------


def test_tensors_and_arrays_accepted():
    g = torch.Generator().manual_seed(0)
    chw = torch.rand(3, 5, 7, generator=g)
    torch.testing.assert_close(load_image(chw), chw, rtol=0, atol=0)
    torch.testing.assert_close(load_image(chw[None]), chw, rtol=0, atol=0)
    hwc = (np.random.default_rng(0).random((5, 7, 3)) * 255).astype(np.uint8)
    t = load_image(hwc)
    assert_engine_image(t, 5, 7)
    torch.testing.assert_close(t, torch.from_numpy(hwc).permute(2, 0, 1).float() / 255, **EXACT)
    # uint8 tensors are scaled by 255 too, whatever their layout.
    torch.testing.assert_close(load_image(torch.from_numpy(hwc).permute(2, 0, 1)[None]), t, rtol=0, atol=0)
    # Out-of-range floats are clamped, not rejected.
    wild = torch.tensor([-0.5, 0.25, 1.5]).reshape(3, 1, 1)
    torch.testing.assert_close(load_image(wild), torch.tensor([0.0, 0.25, 1.0]).reshape(3, 1, 1), rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.rand(2, 3, 4, 4), "shape"),  # a batch of two
        (torch.rand(4, 5, 5), "shape"),  # RGBA channels first
        (torch.rand(5), "shape"),
        (np.zeros((5, 6, 4), np.uint8), "shape"),  # RGBA array
        (torch.full((3, 2, 2), float("nan")), "NaN"),
        (torch.tensor([0.5, float("inf"), 0.5]).reshape(3, 1, 1), "infinite"),
        (np.full((2, 2, 3), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_tensors_are_user_errors(bad, match):
    with pytest.raises(UserError, match=match) as info:
        load_image(bad, "style image")
    kind = "array" if isinstance(bad, np.ndarray) else "tensor"
    assert str(info.value).startswith(f"style image {kind} ")


def test_short_hwc_array_is_read_as_hwc():
    arr = np.array(Image.new("RGB", (5, 3), (255, 0, 0)))
    assert arr.shape == (3, 5, 3)  # (H, W, 3), as numpy gets it from Pillow
    t = load_image(arr)
    assert tuple(t.shape) == (3, 3, 5)
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# fit_long_side and resize
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h,w,long_side,expected",
    [
        (768, 1024, 256, (192, 256)),  # landscape
        (1024, 768, 256, (256, 192)),  # portrait
        (40, 48, 48, (40, 48)),  # already there
        (100, 100, 32, (32, 32)),
        (30, 45, 64, (43, 64)),  # upscaling, 42.67 rounds up
        (1, 10000, 64, (1, 64)),  # never below one pixel
    ],
)
def test_fit_long_side(h, w, long_side, expected):
    assert fit_long_side(h, w, long_side) == expected


def test_resize_is_exact_antialiased_and_clamped():
    img = torch.zeros(3, 40, 60)
    img[:, ::2] = 1.0  # one-pixel stripes: bicubic overshoots without the clamp, aliases without antialias
    out = resize(img, (27, 41))
    assert tuple(out.shape) == (3, 27, 41) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    # Antialiasing averages the stripes instead of picking rows of them.
    assert abs(out.mean().item() - 0.5) < 0.05 and out.std() < 0.2
    aliased = torch.nn.functional.interpolate(img[None], size=(27, 41), mode="bicubic", antialias=False)[0]
    assert aliased.std() > 0.3  # the same resize without antialias would not pass the check above


def test_resize_overshoot_is_clamped():
    img = torch.zeros(1, 1, 8, 8)
    img[..., :, 4:] = 1.0  # a hard edge: bicubic upsampling rings past 0 and 1
    raw = torch.nn.functional.interpolate(img, size=(8, 27), mode="bicubic", antialias=True)
    assert raw.min() < -0.01 and raw.max() > 1.01  # there is overshoot to clamp
    out = resize(img, (8, 27))
    assert tuple(out.shape) == (1, 1, 8, 27)  # batched input stays batched
    torch.testing.assert_close(out, raw.clamp(0, 1), rtol=0, atol=1e-6)


def test_resize_keeps_constants_and_same_size_is_identity():
    flat = torch.full((3, 20, 30), 0.3)
    torch.testing.assert_close(resize(flat, (7, 45)), torch.full((3, 7, 45), 0.3), rtol=0, atol=1e-5)
    img = torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(resize(img, (9, 11)), img, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# save_image
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def image():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 9, 11, generator=g)


def test_png_round_trip_is_exact(tmp_path, image):
    levels = torch.randint(0, 256, (3, 9, 11), generator=torch.Generator().manual_seed(2)).float() / 255
    returned = save_image(levels, tmp_path / "levels.png")
    assert returned == tmp_path / "levels.png"
    assert (tmp_path / "levels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    torch.testing.assert_close(load_image(tmp_path / "levels.png"), levels, **EXACT)
    save_image(image, tmp_path / "a.png")  # arbitrary floats: nearest 8-bit level
    torch.testing.assert_close(load_image(tmp_path / "a.png"), image, rtol=0, atol=0.5 / 255 + 1e-6)


def test_jpeg_round_trip_is_close(tmp_path):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 48), indexing="ij")
    smooth = torch.stack([xx, yy, (xx + yy) / 2])
    save_image(smooth, tmp_path / "a.jpeg")
    assert (tmp_path / "a.jpeg").read_bytes()[:3] == b"\xff\xd8\xff"
    back = load_image(tmp_path / "a.jpeg")
    assert_engine_image(back, 32, 48)
    torch.testing.assert_close(back, smooth, rtol=0, atol=0.06)
    assert (back - smooth).abs().mean() < 0.01


# Levels that 8 bits cannot hold: none is a multiple of 257 (the 16-bit images of the 8-bit levels).
DEEP = [1, 300, 12345, 30001, 32768, 40000, 65534, 0, 65535]


def deep_image():
    k = torch.tensor(DEEP, dtype=torch.float64).reshape(3, 1, 3)
    return (k / 65535).float(), k.long()


def test_16bit_png_really_holds_16_bits(tmp_path, image):
    img, levels = deep_image()
    save_image(img, tmp_path / "deep.png", bit_depth=16)
    w, h, rows, info = png.Reader(filename=str(tmp_path / "deep.png")).read()
    assert (w, h) == (3, 1) and info["bitdepth"] == 16 and not info["greyscale"] and info["planes"] == 3
    got = torch.tensor(np.vstack([np.asarray(r, np.int64) for r in rows])).reshape(h, w, 3).permute(2, 0, 1)
    torch.testing.assert_close(got, levels, rtol=0, atol=0)
    assert any(k % 257 for k in got.flatten().tolist())  # not 8-bit values scaled up

    save_image(image, tmp_path / "rand.png", bit_depth=16)
    w, h, rows, _ = png.Reader(filename=str(tmp_path / "rand.png")).read()
    got = torch.tensor(np.vstack([np.asarray(r, np.float64) for r in rows])).reshape(9, 11, 3).permute(2, 0, 1)
    # Half a 16-bit step, plus float32 rounding.
    torch.testing.assert_close(got / 65535, image.double(), rtol=0, atol=0.5 / 65535 + 1e-7)


def test_16bit_tiff_really_holds_16_bits(tmp_path, image):
    img, levels = deep_image()
    save_image(img, tmp_path / "deep.tiff", bit_depth=16)
    arr = tifffile.imread(tmp_path / "deep.tiff")
    assert arr.dtype == np.uint16 and arr.shape == (1, 3, 3)
    torch.testing.assert_close(torch.from_numpy(arr.astype(np.int64)).permute(2, 0, 1), levels, rtol=0, atol=0)

    save_image(image, tmp_path / "rand.tif", bit_depth=16)
    got = torch.from_numpy(tifffile.imread(tmp_path / "rand.tif").astype(np.float64)).permute(2, 0, 1) / 65535
    torch.testing.assert_close(got, image.double(), rtol=0, atol=0.5 / 65535 + 1e-7)
    assert (got * 255 - (got * 255).round()).abs().max() > 0.1  # finer than 8 bits


@pytest.mark.parametrize("name,bits", [("keep.png", 8), ("keep.jpg", 8), ("keep.png", 16), ("keep.tif", 16)])
def test_no_overwrite_unless_asked(tmp_path, image, name, bits):
    target = tmp_path / name
    target.write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists") as info:
        save_image(image, target, bit_depth=bits)
    assert str(target) in str(info.value)
    assert target.read_bytes() == b"precious"
    assert listing(tmp_path) == [name]
    save_image(image, target, overwrite=True, bit_depth=bits)
    assert target.read_bytes() != b"precious"
    assert load_image(target).shape == image.shape
    assert listing(tmp_path) == [name]  # no .part file left after success


@pytest.mark.parametrize(
    "name,bits,match",
    [
        ("x.gif2", 8, "unknown extension"),
        ("x", 8, "unknown extension"),
        ("x.jpg", 16, "16-bit output"),
        ("x.webp", 16, "16-bit output"),
        ("x.png", 12, "bit depth must be 8 or 16"),
        ("missing/x.png", 8, "does not exist"),
        ("adir.png", 8, "is a directory"),
    ],
)
def test_bad_output_paths(tmp_path, image, name, bits, match):
    (tmp_path / "adir.png").mkdir()
    with pytest.raises(UserError, match=match):
        save_image(image, tmp_path / name, bit_depth=bits)
    assert listing(tmp_path) == ["adir.png"]  # nothing written, nothing half-written
    assert listing(tmp_path / "adir.png") == []


def _break_pillow(monkeypatch, exc):
    def broken(self, fh, *args, **kwargs):
        fh.write(b"\x89PNG half a file")
        raise exc

    monkeypatch.setattr(Image.Image, "save", broken)


def _break_pypng(monkeypatch, exc):
    def broken(self, outfile, rows):
        outfile.write(b"\x89PNG half a file")
        raise exc

    monkeypatch.setattr(png.Writer, "write", broken)


def _break_tifffile(monkeypatch, exc):
    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr(tifffile, "imwrite", broken)


@pytest.mark.parametrize("overwrite", [True, False], ids=["replacing", "new-file"])
@pytest.mark.parametrize(
    "name,bits,breaker",
    [("out.png", 8, _break_pillow), ("out.png", 16, _break_pypng), ("out.tif", 16, _break_tifffile)],
    ids=["png8", "png16", "tiff16"],
)
def test_failed_write_leaves_nothing_behind(tmp_path, image, monkeypatch, name, bits, breaker, overwrite):
    target = tmp_path / name
    if overwrite:
        target.write_bytes(b"old")
    before = listing(tmp_path)
    breaker(monkeypatch, OSError(28, "No space left on device"))
    # One sentence for the user, naming the file and the reason.
    with pytest.raises(UserError, match=rf"could not write output '.*{name}' \(No space left on device\)"):
        save_image(image, target, overwrite=overwrite, bit_depth=bits)
    assert listing(tmp_path) == before  # no .part file, and no new file
    if overwrite:
        assert target.read_bytes() == b"old"


def test_interrupted_write_leaves_nothing_behind(tmp_path, image, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    _break_pillow(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_image(image, target, overwrite=True)
    assert listing(tmp_path) == ["out.png"] and target.read_bytes() == b"old"


def test_file_appearing_during_write_is_not_clobbered(tmp_path, image, monkeypatch):
    # The early check passed (the name was free), then someone else wrote the file before the rename.
    target = tmp_path / "out.png"
    target.write_bytes(b"someone else's")
    before = sha(target)
    monkeypatch.setattr(images_mod, "check_output_path", lambda path, overwrite, bit_depth: path)
    with pytest.raises(UserError, match="already exists"):
        save_image(image, target)
    assert sha(target) == before
    assert listing(tmp_path) == ["out.png"]


def test_output_permissions_follow_umask(tmp_path, image):
    old = os.umask(0o022)
    try:
        save_image(image, tmp_path / "out.png")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "out.png").st_mode & 0o777) == oct(0o644)


# ---------------------------------------------------------------------------------------------
# load_image errors
# ---------------------------------------------------------------------------------------------


def _truncated(path, fmt):
    rng = np.random.default_rng(0)  # noise: so that half the file is half the pixels
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "kind,match",
    [
        ("missing", "does not exist"),
        ("dir", "is a directory"),
        ("empty", "could not be read"),
        ("text", "could not be read"),
        ("truncated-png", "could not be read"),
        ("truncated-jpeg", "could not be read"),
    ],
)
@pytest.mark.parametrize("as_str", [False, True], ids=["Path", "str"])
def test_unreadable_inputs_are_one_sentence(tmp_path, kind, match, as_str):
    path = tmp_path / "in.png"
    if kind == "dir":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path = tmp_path / "notes.jpg"
        path.write_text("this is not an image\n")
    elif kind == "truncated-png":
        _truncated(path, "PNG")
    elif kind == "truncated-jpeg":
        path = tmp_path / "in.jpg"
        _truncated(path, "JPEG")
    with pytest.raises(UserError, match=match) as info:
        load_image(str(path) if as_str else path, "content image")
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and len(msg) < 300
    assert msg.startswith("content image") and repr(str(path)) in msg


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(path)
    # load_image sets Pillow's global limit; put it back after this test.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setattr(images_mod, "MAX_INPUT_PIXELS", 5000)  # stands in for a huge declared size
    with pytest.raises(UserError, match="refusing to decode") as info:
        load_image(path)
    assert str(path) in str(info.value)
    monkeypatch.setattr(images_mod, "MAX_INPUT_PIXELS", 10000)  # exactly at the limit is fine
    assert_engine_image(load_image(path), 100, 100)
