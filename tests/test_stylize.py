"""End to end through the Python API at 64 px, on the bundled sample images."""

from pathlib import Path

import pytest
import torch

from engine import Config, StepInfo, UserError, stylize
from engine.images import fit_long_side, load_image
from engine.schedule import build_schedule, long_sides

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONTENT, STYLE = EXAMPLES / "tubingen.jpg", EXAMPLES / "starry_night.jpg"


@pytest.fixture(scope="module")
def images():
    # Decode once; the API accepts tensors as well as paths.
    return load_image(CONTENT), load_image(STYLE)


def run(images, **kw):
    kw.setdefault("size", 64)
    kw.setdefault("min_size", 64)
    return stylize(images[0], [images[1]], Config(device="cpu", **kw))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_loss_halves_within_50_steps(images, optimizer):
    result = run(images, optimizer=optimizer, steps=50)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 50
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] <= 0.5 * losses[0], (optimizer, losses[0], losses[-1])
    assert result.image.min() >= 0 and result.image.max() <= 1


@pytest.mark.slow
def test_same_seed_same_image_other_seed_other_image(images):
    a = run(images, init="noise", steps=5, seed=7)
    b = run(images, init="noise", steps=5, seed=7)
    c = run(images, init="noise", steps=5, seed=8)
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    assert (a.image - c.image).abs().max() > 0.05


@pytest.mark.slow
def test_multiscale_schedule_reaches_requested_size(images):
    seen = []
    result = stylize(
        images[0],
        images[1],
        Config(size=70, min_size=32, steps=4, device="cpu", schedule="sqrt2"),
        callback=lambda info: seen.append(info),
    )
    h, w = fit_long_side(*images[0].shape[-2:], 70)
    assert tuple(result.image.shape) == (3, h, w) and max(h, w) == 70
    sizes = [(i.height, i.width) for i in seen if i.step == 1]
    assert [max(s) for s in sizes] == long_sides(70, 32) == [35, 49, 70]
    # Steps shrink by sqrt(2) per scale; the callback sees every step with a running count.
    assert [i.steps for i in seen if i.step == 1] == [4, 3, 2]
    assert [i.total_step for i in seen] == list(range(1, 10))
    assert all(isinstance(i, StepInfo) and i.total_steps == 9 for i in seen)
    assert len(result.history) == 9


def test_schedule_skips_scales_too_small_for_the_network():
    # A 1:8 panorama: at long side 64 the short side is 8, below the 16 px relu5_1 needs.
    scales = build_schedule(100, 800, size=256, min_size=64, steps=10, min_side=16, schedule="sqrt2")
    assert all(min(s.height, s.width) >= 16 for s in scales)
    assert max(scales[-1].height, scales[-1].width) == 256
    with pytest.raises(UserError, match="at least 16 px"):
        build_schedule(10, 800, size=64, min_size=64, steps=10, min_side=16, schedule="lean")


@pytest.mark.slow
def test_blend_weights_select_styles(images):
    content, starry = images
    other = torch.flip(starry, dims=(1,)).roll(20, dims=2) * 0.5  # a darker, shifted style
    cfg = dict(size=48, min_size=48, steps=5, device="cpu")
    single = stylize(content, [starry], Config(**cfg))
    only_first = stylize(content, [starry, other], Config(style_blend_weights=(1.0, 0.0), **cfg))
    mixed = stylize(content, [starry, other], Config(style_blend_weights=(1.0, 1.0), **cfg))
    torch.testing.assert_close(only_first.image, single.image, rtol=0, atol=1e-6)
    assert (mixed.image - single.image).abs().max() > 1e-3


def test_blend_weights_must_match_styles(images):
    with pytest.raises(UserError, match="style_blend_weights has 2 values but there is 1 style image"):
        stylize(images[0], [images[1]], Config(style_blend_weights=(1.0, 2.0), size=32, min_size=32, steps=1))


@pytest.mark.slow
def test_style_scale_changes_the_result(images):
    a = run(images, steps=5, size=48, min_size=48)
    b = run(images, steps=5, size=48, min_size=48, style_scale=2.0)
    assert (a.image - b.image).abs().max() > 1e-3


def test_lbfgs_memo_saves_an_evaluation(images, monkeypatch):
    # The step function must not run the network twice at the same point.
    from engine import optimize

    calls = []
    original = optimize.StepFunction.evaluate

    def counting(self):
        calls.append(self.image.detach().clone())
        return original(self)

    monkeypatch.setattr(optimize.StepFunction, "evaluate", counting)
    run(images, optimizer="lbfgs", steps=4, size=32, min_size=32)
    for i in range(1, len(calls)):
        assert not torch.equal(calls[i], calls[i - 1])
