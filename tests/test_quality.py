"""The quality judge (bench/quality.py): its distances on constructed cases, its normalisation, a short real
run judged between the photo and the style, and `nst bench quality` end to end."""

import json
from pathlib import Path

import pytest
import torch

from bench import quality
from engine import Config, stylize
from engine.errors import UserError
from engine.images import load_image, resize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair():
    photo = resize(load_image(ROOT / "examples/tubingen.jpg"), (48, 64))
    style = load_image(ROOT / "examples/starry_night.jpg")
    return photo, style


@pytest.fixture(scope="module")
def judge(pair):
    return quality.Judge(*pair)


def test_sliced_wasserstein_is_zero_on_the_same_set_and_grows_with_a_shift():
    points = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    directions = quality._directions(8, 32, seed=0)
    assert quality.sliced_wasserstein(points, points, directions) == 0.0
    near = quality.sliced_wasserstein(points, points + 0.1, directions)
    far = quality.sliced_wasserstein(points, points + 1.0, directions)
    assert 0 < near < far
    # Sets of different sizes go through their quantile functions: a set and its copy twice over are equal (to
    # float64 rounding: projecting a matrix twice as wide may round differently, as on an AMD EPYC's BLAS).
    assert quality.sliced_wasserstein(points, torch.cat([points, points], 1), directions) <= 1e-12


def test_the_photo_scores_one_on_style_and_colour_and_zero_on_content(judge, pair):
    scores = judge(pair[0])
    assert scores.style == pytest.approx(1.0, abs=1e-12)
    assert scores.colour == pytest.approx(1.0, abs=1e-12)
    assert scores.content == 0.0
    assert set(scores.style_layers) == set(quality.STYLE_LAYERS) and len(quality.STYLE_LAYERS) == 10


def test_the_style_image_stretched_to_the_photo_scores_one_on_content(judge, pair):
    photo, style = pair
    assert judge(resize(style, tuple(photo.shape[-2:]))).content == pytest.approx(1.0, abs=1e-9)


def test_the_judge_avoids_the_layers_the_default_losses_optimise():
    default = Config()  # its content layers: those of every loss auto may pick
    assert not set(quality.STYLE_LAYERS + quality.CONTENT_LAYERS) & set(default.feature_layers)


def test_scores_are_deterministic_for_a_seed_and_move_little_with_it(judge, pair):
    image = pair[0].flip(-1)  # a mirrored photo: a different image with the photo's statistics nearly
    again = quality.Judge(*pair)(image)
    assert again.row() == judge(image).row()
    other = quality.Judge(*pair, seed=1)(image)
    assert other.row() != judge(image).row()
    assert abs(other.style - judge(image).style) < 0.05


def test_a_smaller_snapshot_is_judged_at_the_photo_size(judge, pair):
    small = resize(pair[0], (24, 32))
    scores = judge(small)
    assert 0 < scores.content < 0.5  # a blurred photo: near it, not on it


def test_a_short_real_run_scores_between_the_photo_and_the_style(judge, pair):
    photo, style = pair
    result = stylize(photo, [style], Config(size=64, min_size=64, steps=40, lr=0.05))
    scores = judge(result.image)
    assert 0 < scores.style < 1.0
    assert 0 < scores.content < 1.0
    assert scores.colour < 1.0


def test_parse_config_takes_stylize_settings_and_refuses_others():
    assert quality.parse_config("default") == ("default", {})
    name, overrides = quality.parse_config("decay:style_layer_weights=256,64,16,4,1;style_scale=0.5;steps=10")
    assert name == "decay" and overrides == {"style_layer_weights": "256,64,16,4,1", "style_scale": 0.5, "steps": 10}
    with pytest.raises(UserError, match="'warp=1' is not key=value"):
        quality.parse_config("x:warp=1")
    with pytest.raises(UserError, match="style_loss must be one of auto, gram"):
        quality.parse_config("x:style_loss=nope")
    assert quality.parse_config("ot:style_loss=ot;style_weight=14;style_size=300")[1] == {
        "style_loss": "ot",
        "style_weight": 14.0,  # None by default: a number all the same
        "style_size": 300,
    }
    with pytest.raises(UserError, match=r"^--config 'x:style_weight=abc': style_weight must be a number, not 'abc'$"):
        quality.parse_config("x:style_weight=abc")
    with pytest.raises(UserError, match=r"steps must be a whole number, not '2.5'$"):
        quality.parse_config("x:steps=2.5")


@pytest.mark.slow
def test_nst_bench_quality_writes_results_curves_and_images(tmp_path):
    from cli.main import main

    out = tmp_path / "q"
    args = ["bench", "quality", "--size", "48", "--snapshot-every", "4", "--out", str(out)]
    args += ["--config", "short:steps=6;min_size=48", "--config", "ot:steps=6;min_size=48;style_loss=ot"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in results["rows"]] == ["short", "ot"]
    for row in results["rows"]:
        steps = [p["step"] for p in row["curve"]]
        assert steps == [0, 4, 6]  # the photo, a snapshot, the last step
        assert row["curve"][0]["style"] == pytest.approx(1.0)
        assert row["pixel_steps"] == 6 * 36 * 48
        assert Path(row["image_path"]).is_file()
    assert (out / "curves.png").stat().st_size > 1000 and (out / "curves-pixel-steps.png").stat().st_size > 1000
    assert main(args) == 2  # the results are not overwritten without --overwrite
    assert main(args + ["--overwrite", "--baseline", "nope"]) == 2  # not a --config name: refused before any run


def _run(config, curve, wall):
    points = [
        {"step": i, "pixel_steps": 10 * i, "seconds": s, "style": st, "content": c, "colour": col}
        for i, (s, st, c, col) in enumerate(curve)
    ]
    return {
        "pair": "p+s",
        "config": config,
        "seed": 0,
        "curve": points,
        "final": points[-1],
        "wall_seconds": wall,
        "pixel_steps": points[-1]["pixel_steps"],
    }


def test_time_to_quality_is_the_first_snapshot_as_good_as_the_baseline_on_every_measure():
    old = _run("old", [(0, 1, 0, 1), (50, 0.6, 0.7, 0.8), (100, 0.40, 0.60, 0.60)], wall=101)
    new = _run(
        "new",
        [
            (0, 1, 0, 1),
            (20, 0.39, 0.70, 0.59),  # style and colour reached, content not
            (30, 0.405, 0.605, 0.61),  # within the judge's noise on all three
            (40, 0.38, 0.58, 0.55),
        ],
        wall=41,
    )
    never = _run("never", [(0, 1, 0, 1), (10, 0.45, 0.5, 0.5)], wall=11)
    rows = {r["config"]: r for r in quality.time_to_quality({"rows": [old, new, never]}, "old")}
    assert rows["new"]["seconds"] == 30 and rows["new"]["pixel_steps"] == 20
    assert rows["new"]["speedup"] == pytest.approx(101 / 30)
    assert rows["old"]["seconds"] == 100  # the baseline reaches its own final quality at its last snapshot
    assert rows["never"]["seconds"] is None and rows["never"]["speedup"] is None
