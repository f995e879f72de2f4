"""Lagged tile statistics (``tile_stats="lagged"``, engine/tiling.py): one pass per tile per step.

The surrogate's statistics are the previous call's, so with an image that does not move (a learning rate
of 0) the lagged gradient is the exact one, to float64 rounding; over a run it lags by one Adam step,
and the relative error that costs is bounded here on the test problems. The loss a lagged call returns
is the image's own (from the same pass's sums), whatever the lag. Exactness of the two-pass mode itself
is tests/test_tiling.py's.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import ROOT
from test_tiling import SHALLOW, loss_and_grad, problem

from engine import Config, UserError, stylize
from engine.optimize import Objective
from engine.tiling import Geometry, TiledObjective, Tiling

CASES = [("gram", False), ("gram", True), ("w2", False)]


def tiled(config, extractor, criterion, image, stats, tile=16):
    grid = Tiling(tile, Geometry.of(config.model, config.feature_layers)).grid(*image.shape[-2:])
    assert len(grid.tiles) > 4 or tile >= max(image.shape[-2:])
    return TiledObjective(extractor, criterion, grid, autocast=contextlib.nullcontext, stats=stats)


@pytest.mark.parametrize("loss, masks", CASES)
def test_at_lr_0_the_lagged_gradient_is_the_exact_one_in_float64(loss, masks):
    config, extractor, criterion, *_, image = problem(loss, masks=masks)
    total, parts, grad = loss_and_grad(Objective(extractor, criterion), image)
    lagged = tiled(config, extractor, criterion, image, "lagged")
    for call in range(3):  # the first call runs exact and seeds the statistics; the next two are lagged
        got, got_parts, got_grad = loss_and_grad(lagged, image)
        assert lagged.sums is not None and bool(lagged.state_dict())
        torch.testing.assert_close(got, total, rtol=1e-10, atol=0)
        for name in ("content", "style", "tv"):
            torch.testing.assert_close(got_parts[name], parts[name], rtol=1e-10, atol=0)
        assert float((got_grad - grad).abs().max() / grad.abs().max()) < 1e-10, call


def photo_problem(loss, masks=False, size=(48, 64)):
    """The bundled photo and painting, float64, started from the content as a run is. (test_tiling's noise
    images are no use here: their Grams all but equal the noise style's, so the style gradient is nearly
    all lag, and relative errors of order 1 say nothing about a run.)"""
    from engine.api import build_extractor
    from engine.criterion import build_criterion
    from engine.images import load_image, resize

    config = Config(device="cpu", style_loss=loss, **SHALLOW)
    extractor = build_extractor(config).to(torch.float64)
    content = resize(load_image(ROOT / "examples/tubingen.jpg"), size)[None].double()
    style = resize(load_image(ROOT / "examples/starry_night.jpg"), (54, 68)).double()
    styles, mask = [([style], (1.0,))], None
    if masks:  # the painting on the left, its negative on the right, with a soft edge
        ramp = torch.linspace(-3, 3, size[1], dtype=torch.float64).sigmoid().expand(1, 1, *size)
        mask = torch.cat([1 - ramp, ramp])
        styles = [([style, 1 - style], (1.0, 1.0))]
    criterion = build_criterion(config, extractor, content, styles, min_side=4, masks=mask).to(torch.float64)
    return config, extractor, criterion, content.clone().requires_grad_(True)


def relative_errors(loss, masks, steps, tile=16, lr=0.02):
    """Adam steps on the lagged gradient. Per step: ``|g_lagged - g_exact| / |g_exact|`` at the same image, and
    the lagged call's loss against the exact one (which it must equal whatever the lag)."""
    config, extractor, criterion, image = photo_problem(loss, masks=masks)
    lagged = tiled(config, extractor, criterion, image, "lagged", tile)
    exact = tiled(config, extractor, criterion, image, "exact", tile)
    optimizer = torch.optim.Adam([image], lr=lr)
    errors, loss_errors = [], []
    for _ in range(steps):
        total, _, reference = loss_and_grad(exact, image)
        got, _, grad = loss_and_grad(lagged, image)
        errors.append(float((grad - reference).norm() / reference.norm()))
        loss_errors.append(float(abs(got / total - 1)))
        optimizer.step()  # on the lagged gradient, left in image.grad
        with torch.no_grad():
            image.clamp_(0, 1)
    return errors, loss_errors


# Measured (48x64 photo in 12 tiles, lr 0.02, steps 2-8): the largest error 0.68 (gram), 0.61 (masked gram), 0.45
# (w2), at step 4; by step 8 0.11, 0.11, 0.07. Adam's first steps move every pixel by about lr, so the statistics
# of the tiles not yet visited change as much as the exact gradient does from one step to the next.
BOUND = 1.0


@pytest.mark.parametrize("loss, masks", CASES)
def test_over_a_short_run_the_lagged_gradient_stays_near_the_exact_one(loss, masks):
    errors, loss_errors = relative_errors(loss, masks, steps=8)
    assert errors[0] < 1e-12  # the seeding call is exact
    assert 0.01 < max(errors[1:]) < BOUND, errors  # the lag is there, and bounded
    assert max(loss_errors) < 1e-10, loss_errors  # the loss reported is the image's own


@pytest.mark.parametrize("loss, masks", CASES)
def test_with_one_tile_nothing_lags(loss, masks):
    """A tile's statistics are its own new ones: with one tile, every step's gradient is the exact one."""
    errors, _ = relative_errors(loss, masks, steps=4, tile=64)
    assert max(errors) < 1e-10, errors


def test_lagged_with_lbfgs_is_refused_in_one_sentence():
    with pytest.raises(UserError, match="^tile_stats lagged works with optimizer adam only, not lbfgs$"):
        Config(tile_stats="lagged", optimizer="lbfgs")
    with pytest.raises(UserError, match="tile_stats must be one of exact, lagged, not 'sometimes'"):
        Config(tile_stats="sometimes")


def _stylize(plan=None, resume=None, control=None, stats="lagged", tile="16"):
    from engine.images import load_image

    content, style = load_image(ROOT / "examples/tubingen.jpg"), load_image(ROOT / "examples/starry_night.jpg")
    config = Config(device="cpu", size=64, min_size=45, ema_decay=0, steps=5, tile=tile, tile_stats=stats, **SHALLOW)
    return stylize(content, style, config, checkpoint=plan, resume=resume, control=control)


@pytest.mark.slow
def test_resume_of_a_lagged_run_equals_the_uninterrupted_run(tmp_path):
    from engine.checkpoint import CheckpointPlan, load
    from engine.control import Control, Interrupted

    whole = _stylize()
    assert not torch.equal(whole.image, _stylize(stats="exact").image)  # the lag changes the run
    assert torch.equal(_stylize(tile="off").image, _stylize(stats="exact", tile="off").image)  # untiled: no lag
    steps = []

    def watch():
        steps.append(1)
        if len(steps) == 8:  # stop after the third step of the second scale (45 px: 5 steps, 64 px: 4)
            control.interrupt()

    control = Control(watch=watch)
    plan = CheckpointPlan(str(tmp_path / "run.ckpt"))
    with pytest.raises(Interrupted):
        _stylize(plan, control=control)
    state, older = load(plan.path), load(plan.path)  # the resumed run, once done, deletes the file
    assert (
        state["scale"] == 1 and state["step"] == 3 and set(state["tile_stats"]["sums"]) == set(SHALLOW["style_layers"])
    )
    resumed = _stylize(resume=state)
    assert torch.equal(resumed.image, whole.image)
    # Without the sums (a checkpoint of an older version) the first step after the resume runs exact.
    del older["tile_stats"]
    assert not torch.equal(_stylize(resume=older).image, whole.image)
