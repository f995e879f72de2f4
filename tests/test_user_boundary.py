"""What a new user meets from Python: sizes checked in one place, list settings as strings, image arrays in
other ranges, and messages that name Python arguments (the CLI's wording is tested through the command)."""

import numpy as np
import pytest
import torch

from cli.stylize import ProgressBar
from engine import Config, UserError, stylize
from engine.api import Result
from engine.errors import cli_wording, pixels, plural
from engine.images import load_image
from engine.optimize import StepInfo
from engine.sizes import check_size, style_size

TINY = dict(size=32, min_size=32, steps=1, device="cpu", content_layers=("relu1_2",), style_layers=("relu1_1",))


def picture(h, w, seed=0):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- sizes


def test_check_size_refuses_below_one_pixel_and_above_the_limit_in_the_callers_words():
    config = Config()  # down to relu5_1: four pools, 16 px
    check_size(config, 16, 40, "the output")
    with pytest.raises(
        UserError,
        match=r"^the output would be 40x15 px, but the chosen layers \(down to relu5_1\) "
        r"need at least 16 px on each side; use a larger size or shallower layers$",
    ):
        check_size(config, 15, 40, "the output")
    with pytest.raises(
        UserError,
        match=r"would be 9000x8000 = 72.0 Mpx, above the 67.1 Mpx limit \(max_pixels\); "
        r"the image and its optimiser state alone would take 7.8 GiB \(116 bytes",
    ):
        check_size(config, 8000, 9000, "the output")
    with cli_wording(), pytest.raises(UserError, match=r"use a larger --size .* \(--max-pixels\)|use a larger --size"):
        check_size(config, 15, 40, "the output")
    # The same check for an extractor or a (model, layers) pair, as the exporters and the bench have.
    with pytest.raises(UserError, match="need at least 4 px"):
        check_size(("vgg19", ["relu3_1"]), 3, 3, "x")


def test_style_size_keeps_the_short_side_the_network_needs():
    assert style_size(100, 200, 64, 16) == (32, 64)
    assert style_size(100, 200, 1, 16) == (16, 32)  # a 0.01 style scale
    assert style_size(10, 1000, 100, 16) == (16, 1600)  # a thin style image: larger, then the pixel check


def test_tiny_style_scale_runs_and_a_huge_one_is_refused_before_any_work():
    deep = dict(TINY, content_layers=("relu4_2",), style_layers=("relu1_1", "relu5_1"))
    result = stylize(picture(24, 32), picture(30, 40, 1), Config(**deep, style_scale=0.01))
    assert result.image.shape == (3, 24, 32)
    with pytest.raises(
        UserError,
        match=r"^the style image would be 3200x2400 = 7.7 Mpx, above the 1.0 Mpx limit "
        r"\(max_pixels\)",
    ):
        stylize(picture(24, 32), picture(30, 40, 1), Config(**TINY, style_scale=100, max_pixels=10**6))
    with pytest.raises(UserError, match=r"^the output would be 32x24 = 768 px, above the 10 px limit \(max_pixels\)"):
        stylize(picture(24, 32), picture(30, 40, 1), Config(**TINY, max_pixels=10))


def test_absolute_style_size():
    assert Config(size=512, style_size=256).style_ratio == 0.5 and Config(style_scale=2.0).style_ratio == 2.0
    with pytest.raises(UserError, match=r"^the style image would be 2000x1500 = 3.0 Mpx, above the 1.0 Mpx limit"):
        stylize(picture(24, 32), picture(30, 40, 1), Config(**TINY, style_size=2000, max_pixels=10**6))
    with pytest.raises(UserError, match="style_size must be a whole number from 1 to 16384, not 0"):
        Config(style_size=0)


def test_pixel_counts_and_plurals_read_right():
    assert [pixels(10), pixels(999_999), pixels(16_777_216)] == ["10 px", "999999 px", "16.8 Mpx"]
    assert [plural(1, "value"), plural(2, "value"), plural(0, "mask")] == ["1 value", "2 values", "0 masks"]


# --------------------------------------------------------------------------------------------- Config


def test_list_settings_accept_comma_separated_strings():
    c = Config(style_layers="relu1_1, relu2_1", content_layers="relu4_2", style_layer_weights="1,3")
    assert c == Config(style_layers=("relu1_1", "relu2_1"), content_layers=("relu4_2",), style_layer_weights=(1.0, 3.0))
    assert Config(style_masks="a.png,b.png").style_masks == ("a.png", "b.png")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"style_layers": 5}, "style_layers must be a list of names or a comma-separated string, not 5"),
        ({"style_layers": ["relu1_1", 2]}, "style_layers must be names (strings)"),
        ({"style_layer_weights": "1,lots"}, "style_layer_weights must be numbers"),
        (
            {"style_layers": "relu1_1", "style_layer_weights": "1,2"},
            "style_layer_weights has 2 values but there is 1 style layer",
        ),
        ({"init": "random"}, "init must be one of content, palette, noise, gray, or an image file, not 'random'"),
    ],
)
def test_bad_list_settings_are_one_sentence(kwargs, message):
    with pytest.raises(UserError) as info:
        Config(**kwargs)
    assert str(info.value) == message or str(info.value).startswith(message)


# --------------------------------------------------------------------------------------------- inputs


def test_image_arrays_in_other_ranges():
    deep = np.full((4, 5, 3), 65535, np.uint16)
    deep[0, 0] = 0
    image = load_image(deep)
    assert image[:, 0, 0].tolist() == [0, 0, 0] and image[:, 1, 1].tolist() == [1, 1, 1]
    with pytest.raises(UserError, match=r"content image array has float values up to 200; floats must be in \[0, 1\]"):
        load_image(np.full((4, 5, 3), 200.0), "content image")
    with pytest.raises(UserError, match=r"style image tensor has float values up to 255"):
        load_image(torch.full((3, 4, 5), 255.0), "style image")
    with pytest.raises(UserError, match="has dtype int64; use uint8"):
        load_image(np.zeros((4, 5), np.int64))
    load_image(np.full((4, 5, 3), 1.2, np.float32))  # a resampling overshoot is clamped, not refused


def test_result_save_speaks_python(tmp_path):
    (tmp_path / "out.png").write_bytes(b"mine")
    with pytest.raises(UserError, match="already exists; pass overwrite=True to replace it"):
        Result(image=picture(8, 8)).save(tmp_path / "out.png")
    assert (tmp_path / "out.png").read_bytes() == b"mine"


def test_init_from_an_image_file(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((10, 12, 3), 255, np.uint8)).save(tmp_path / "white.png")
    config = Config(**dict(TINY, lr=1e-6, ema_decay=0.0), init=str(tmp_path / "white.png"))
    result = stylize(picture(24, 32), picture(30, 40, 1), config)
    assert result.image.shape == (3, 24, 32) and result.image.min() > 0.99  # started white, barely moved


# --------------------------------------------------------------------------------------------- progress


def test_progress_bar_of_a_resumed_run_starts_at_the_resumed_step():
    bar = ProgressBar(quiet=False)
    bar.plain = False  # a terminal's bar, whatever pytest's stderr is
    image = torch.zeros(1, 3, 2, 2)
    info = StepInfo(
        scale=1,
        scales=3,
        height=48,
        width=40,
        step=5,
        steps=30,
        total_step=57,
        total_steps=132,
        loss=1.5,
        parts={},
        source=lambda: image,
    )
    bar.step(info, "scale 2/3")
    try:
        assert (bar.bar.n, bar.bar.total) == (57, 132)
    finally:
        bar.close()
