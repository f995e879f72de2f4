"""The per-pixel temporal term (engine/temporal.py) and the engine's hook for extra image terms.

The term must have the gradient it claims (gradcheck in float64), tile exactly like TV (tiled ==
untiled to 1e-10 in float64, as part of the whole loss), and mean the same at any size.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_tiling import loss_and_grad, problem, rand

from engine.losses import StyleTransferLoss
from engine.optimize import Objective
from engine.temporal import TemporalLoss
from engine.tiling import Geometry, TiledObjective, Tiling


def term(batch=2, size=(46, 58), seed=10):
    target = rand(batch, 3, *size, seed=seed)
    weight = (rand(batch, 1, *size, seed=seed + 1) > 0.3).double() * rand(batch, 1, *size, seed=seed + 2)
    return TemporalLoss(target, weight)


def test_gradcheck_in_float64():
    loss = term(size=(5, 7))
    image = rand(2, 3, 5, 7, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (image,))


def test_value_is_the_weighted_mean_square_and_zero_where_weight_is_zero():
    target = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    weight = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    weight[..., :2, :] = 1.0
    loss = TemporalLoss(target, weight)
    image = torch.ones(1, 3, 4, 4, dtype=torch.float64)
    assert float(loss(image)) == pytest.approx(0.5)  # half of the pixels count, each an error of 1
    image[..., 2:, :] = 7.0  # where the weight is 0 the image is free
    assert float(loss(image)) == pytest.approx(0.5)


def test_same_meaning_at_any_size():
    """A uniform error over a uniform weight gives the same value at 16x16 and 64x64."""
    small = TemporalLoss(torch.zeros(1, 3, 16, 16), torch.ones(1, 1, 16, 16))
    large = TemporalLoss(torch.zeros(1, 3, 64, 64), torch.ones(1, 1, 64, 64))
    assert float(small(torch.full((1, 3, 16, 16), 0.1))) == pytest.approx(float(large(torch.full((1, 3, 64, 64), 0.1))))


@pytest.mark.parametrize("tile", [16, 28])
def test_partial_shares_of_a_grid_add_up_to_the_whole(tile):
    loss = term()
    image = rand(2, 3, 46, 58, seed=4)
    grid = Tiling(tile, Geometry.of("vgg19", ("relu1_1", "relu2_1", "relu3_1"))).grid(46, 58)
    shares = sum(loss.partial(t.crop_of(image), t.own_in_crop(), (46, 58), (t.crop[0], t.crop[2])) for t in grid.tiles)
    torch.testing.assert_close(shares, loss(image), rtol=1e-12, atol=0)


@pytest.mark.parametrize("tile", [16, 28])
def test_tiled_loss_and_gradient_with_the_term_equal_untiled_in_float64(tile):
    config, extractor, base, *_, image = problem("gram")
    criterion = StyleTransferLoss(
        content=dict(base.content),
        style=dict(base.style),
        content_layer_weights=base.content_layer_weights,
        style_layer_weights=base.style_layer_weights,
        content_weight=1.0,
        style_weight=4.0,
        tv_weight=2.0,
        extra={"temporal": (50.0, term())},
    )
    total, parts, grad = loss_and_grad(Objective(extractor, criterion), image)
    assert float(parts["temporal"]) > 0
    torch.testing.assert_close(total, sum(criterion.weights[k] * v for k, v in parts.items()))
    grid = Tiling(tile, Geometry.of(config.model, config.feature_layers)).grid(*image.shape[-2:])
    tiled, tiled_parts, tiled_grad = loss_and_grad(
        TiledObjective(extractor, criterion, grid, autocast=contextlib.nullcontext), image
    )
    torch.testing.assert_close(tiled, total, rtol=1e-10, atol=0)
    for name in ("content", "style", "tv", "temporal"):
        torch.testing.assert_close(tiled_parts[name], parts[name], rtol=1e-10, atol=0)
    assert float((tiled_grad - grad).abs().max() / grad.abs().max()) < 1e-10


def test_an_extra_term_may_not_take_a_built_in_name():
    with pytest.raises(ValueError, match="tv"):
        StyleTransferLoss(
            {},
            {},
            content_layer_weights=[],
            style_layer_weights=[],
            content_weight=1.0,
            style_weight=1.0,
            tv_weight=1.0,
            extra={"tv": (1.0, term())},
        )
