"""The bad-input corpus, generated here (nothing binary is committed), run through the CLI as a user would.

Every case either gives a sensible result (valid but odd images) or exits 2 with one line naming the
problem; never a traceback, and no file that existed before is changed or removed.
"""

import hashlib
import io
import subprocess

import numpy as np
import pytest
from helpers import one_error_line, run_together, tree
from PIL import Image

TINY = [
    "--size",
    "32",
    "--min-size",
    "32",
    "--steps",
    "1",
    "-q",
    "--device",
    "cpu",
    "--content-layers",
    "relu1_2",
    "--style-layers",
    "relu1_1,relu2_1",
]


def _rgb(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _png_bytes(img: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _jpeg_bytes(img: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    return _jpeg_bytes(Image.fromarray(_rgb(24, 40)), exif=exif)


def _animated_gif() -> bytes:
    frames = [Image.fromarray(_rgb(30, 30, seed)).convert("P") for seed in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def _palette_transparent() -> bytes:
    img = Image.fromarray(_rgb(30, 36)).convert("P")
    return _png_bytes(img, transparency=0)


def _bomb() -> bytes:
    # 17000 x 17000 = 289 Mpx declared, a few kB on disk: more than the 256 Mpx the engine decodes.
    return _png_bytes(Image.new("1", (17000, 17000)))


# name: (file bytes or None for a directory, expected outcome)
# outcome: ("ok", (width, height) of the output) or ("error", text the one line must contain)
IMAGES = {
    "zero-byte.png": (b"", ("error", "could not be read as an image")),
    "truncated.png": (_png_bytes(Image.fromarray(_rgb(40, 40)))[:300], ("error", "could not be read as an image")),
    "truncated.jpg": (_jpeg_bytes(Image.fromarray(_rgb(40, 40)))[:400], ("error", "could not be read as an image")),
    "text.jpg": (b"this is not a picture\n", ("error", "could not be read as an image")),
    # A directory as CONTENT means "every image in it" (see nst stylize FOLDER); this one has none.
    "folder.png": (None, ("error", "content folder 'folder.png' has no images")),
    "one-pixel.png": (_png_bytes(Image.fromarray(_rgb(1, 1))), ("ok", (32, 32))),
    "sliver.png": (
        _png_bytes(Image.fromarray(_rgb(1, 10000))),
        ("error", "the output would be 32x1 px, but the chosen layers (down to relu2_1) need at least 2 px"),
    ),
    "bomb.png": (_bomb(), ("error", "refusing to decode it")),
    "cmyk.jpg": (_jpeg_bytes(Image.fromarray(_rgb(24, 32)).convert("CMYK")), ("ok", (32, 24))),
    "16bit.png": (
        _png_bytes(Image.fromarray((np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16))),
        ("ok", (32, 24)),
    ),
    "palette-alpha.png": (_palette_transparent(), ("ok", (32, 27))),
    "exif-rotated.jpg": (_exif_rotated(), ("ok", (19, 32))),
    "animated.gif": (_animated_gif(), ("ok", (32, 32))),
    "grey.png": (_png_bytes(Image.fromarray(_rgb(24, 32)[..., 0])), ("ok", (32, 24))),
}

# name: (extra arguments, text the one line must contain); content and style are valid here.
OPTIONS = {
    "unknown layer": (["--style-layers", "relu1_1,relu9_9"], "unknown layer 'relu9_9'"),
    "negative weight": (["--style-weight", "-3"], "--style-weight must be a finite number zero or more, not -3.0"),
    "nan weight": (["--tv-weight", "nan"], "--tv-weight must be a finite number zero or more, not nan"),
    "size 0": (["--size", "0"], "--size must be a positive whole number, not 0"),
    "absurd size": (["--size", "200000"], "size 200000 is larger than the 16384 px"),
    "too many pixels": (
        ["--size", "9000", "--max-pixels", "16000000"],
        "above the 16.0 Mpx limit (--max-pixels); the image",
    ),
    "bad tile": (["--tile", "huge"], "--tile must be auto, off, checkpoint or a tile size in pixels"),
    "unknown optimizer": (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
    "unknown loss": (["--style-loss", "fourier"], "argument --style-loss: invalid choice: 'fourier'"),
    "steps 0": (["--steps", "0"], "--steps must be a positive whole number, not 0"),
    "unwritable output dir": (["-o", "/proc/out.png"], "output directory '/proc' is not writable"),
    "missing output dir": (["-o", "nowhere/out.png"], "output directory 'nowhere' does not exist"),
    "output is an input": (["-o", "style.png", "--overwrite"], "output 'style.png' is also an input"),
    "output exists": (["-o", "taken.png"], "output 'taken.png' already exists; pass --overwrite"),
}

# More cases, run in this process through cli.main.main (each subprocess costs a torch import, and the
# machine is shared): the same contract, one line and exit 2, nothing touched.
OPTIONS_IN_PROCESS = {
    # Every size that reaches the network is checked in one place (engine/sizes.py), the limit included.
    "tiny pixel limit": (
        ["--max-pixels", "10"],
        "the output would be 32x24 = 768 px, above the 10 px limit (--max-pixels)",
    ),
    "huge style image": (
        ["--style-scale", "100", "--max-pixels", "100000"],
        "the style image would be 3200x3200 = 10.2 Mpx, above the 100000 px limit (--max-pixels)",
    ),
    "output is the mask": (
        ["-o", "mask.png", "--style-masks", "mask.png", "--overwrite"],
        "output 'mask.png' is also an input",
    ),
    "masks miscounted": (
        ["--style-masks", "mask.png,mask.png"],
        "--style-masks has 2 masks but there is 1 style image",
    ),
    "weights miscounted": (
        ["--style-layer-weights", "1"],
        "--style-layer-weights has 1 value but there are 2 style layers",
    ),
    "option typo": (["--style-wieght", "3"], "unrecognized arguments: --style-wieght 3; did you mean --style-weight?"),
    "output size by another tool's name": (
        ["--end-scale", "256"],
        "unrecognized arguments: --end-scale 256; did you mean --size (the long side of the output)?",
    ),
    "min size above size": (["--min-size", "64"], "--min-size 64 is larger than --size 32"),
    "unfinished run": (
        ["-o", "left.png"],
        "left.png.ckpt holds an unfinished run of this output; go on with: nst resume",
    ),
    "folder format for a file": (["--output-format", "jpg"], "--output-format applies to a folder of contents"),
    "init file missing": (["--init", "nothere.png"], "init image 'nothere.png' does not exist"),
    "init not an image": (
        ["--init", "random"],
        "--init must be one of content, palette, noise, gray, or an image file",
    ),
}

# name: (extra arguments, (width, height) of the result): odd settings that must simply work (in this process).
ODD_OPTIONS = {
    # The case: relu5_1 needs 16 px, and a 0.01 style scale asks for a 1 px style image.
    "tiny style scale": (
        [
            "--size",
            "64",
            "--min-size",
            "64",
            "--style-scale",
            "0.01",
            "--content-layers",
            "relu4_2",
            "--style-layers",
            "relu1_1,relu2_1,relu3_1,relu4_1,relu5_1",
        ],
        (64, 48),
    ),
    "layers with spaces": (["--style-layers", " relu1_1 , relu2_1 "], (32, 24)),
    "init from a file": (["--init", "style.png"], (32, 24)),
    "absolute style size": (["--style-size", "20"], (32, 24)),
}


def _option_folder(folder):
    Image.fromarray(_rgb(24, 32, 8)).save(folder / "content.png")
    Image.fromarray(_rgb(32, 32, 9)).save(folder / "style.png")
    Image.fromarray(_rgb(24, 32, 7)[..., 0]).save(folder / "mask.png")
    (folder / "taken.png").write_bytes(b"the user's earlier result")
    (folder / "left.png.ckpt").write_bytes(b"an interrupted run's state")
    return folder


def _main(args, folder, monkeypatch, capsys):
    """``nst ARGS`` in this process, from ``folder``: ``(exit status, stdout, stderr)``."""
    from cli.main import main

    monkeypatch.chdir(folder)
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    jobs, folders, before = {}, {}, {}
    for case, (data, _) in IMAGES.items():
        folder = tmp_path_factory.mktemp("image")
        Image.fromarray(_rgb(32, 32, 9)).save(folder / "style.png")
        if data is None:
            (folder / case).mkdir()
        else:
            (folder / case).write_bytes(data)
        jobs[case] = (["stylize", case, "style.png", "-o", "out.png", *TINY], folder)
    for case, (extra, _) in OPTIONS.items():
        folder = _option_folder(tmp_path_factory.mktemp("option"))
        output = [] if "-o" in extra else ["-o", "out.png"]
        jobs[case] = (["stylize", "content.png", "style.png", *TINY, *output, *extra], folder)
    for case, (_, folder) in jobs.items():
        folders[case], before[case] = folder, tree(folder)
    results = run_together(jobs)
    return {case: (results[case], before[case], tree(folders[case]), folders[case]) for case in jobs}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(IMAGES))
def test_image_corpus(corpus, case):
    r, before, after, folder = corpus[case]
    kind, expected = IMAGES[case][1]
    assert "Traceback" not in r.stderr + r.stdout
    if kind == "ok":
        assert r.returncode == 0, r.stderr
        with Image.open(folder / "out.png") as img:
            assert img.size == expected and img.mode == "RGB"
        assert {k: v for k, v in after.items() if k != "out.png"} == before
    else:
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert expected in one_error_line(r)
        assert after == before


@pytest.mark.slow
@pytest.mark.parametrize("case", list(OPTIONS))
def test_option_corpus(corpus, case):
    r, before, after, _ = corpus[case]
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout and r.stdout == ""
    assert OPTIONS[case][1] in one_error_line(r)
    assert after == before
    assert before["taken.png"] == hashlib.sha256(b"the user's earlier result").hexdigest()


@pytest.mark.parametrize("case", list(OPTIONS_IN_PROCESS))
def test_option_corpus_in_process(case, tmp_path, monkeypatch, capsys):
    extra, message = OPTIONS_IN_PROCESS[case]
    folder = _option_folder(tmp_path)
    before = tree(folder)
    output = [] if "-o" in extra else ["-o", "out.png"]
    r = _main(["stylize", "content.png", "style.png", *TINY, *output, *extra], folder, monkeypatch, capsys)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert message in one_error_line(r)
    assert tree(folder) == before


@pytest.mark.parametrize("case", list(ODD_OPTIONS))
def test_odd_option_corpus(case, tmp_path, monkeypatch, capsys):
    folder = _option_folder(tmp_path)
    before = tree(folder)
    r = _main(
        ["stylize", "content.png", "style.png", *TINY, "-o", "out.png", *ODD_OPTIONS[case][0]],
        folder,
        monkeypatch,
        capsys,
    )
    assert r.returncode == 0, r.stderr
    after = tree(folder)
    assert "Traceback" not in r.stderr + r.stdout
    with Image.open(folder / "out.png") as img:
        assert img.size == ODD_OPTIONS[case][1]
    assert {k: v for k, v in after.items() if k != "out.png"} == before
