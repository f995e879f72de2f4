"""A style loss is one class: a toy one, defined and registered in this module alone, reaches the command line's
help and choices, ``nst compare``'s default, the bench's rows and the HTTP page's options, runs untiled, and runs
tiled (exactly, in float64) or is refused in one sentence, without any other file knowing its name."""

from __future__ import annotations

import contextlib
from typing import Optional

import pytest
import torch
from test_tiling import loss_and_grad, problem

from engine import Config, UserError, stylize
from engine.losses import at_least_float32, relative_squared_error
from engine.optimize import Objective
from engine.style_losses import StyleLoss, TileTerm, names, register, style_loss, unregister
from engine.tiling import Geometry, TiledObjective, Tiling


class MeanStyleLoss(StyleLoss):
    """Matches each channel's mean only: the smallest loss with a tiled form."""

    name = "toymean"
    help = "per-channel feature means (a test's toy loss)"

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)  # (N or 1, C)

    @classmethod
    def build(cls, *, config, layer, per_job, masks=None):
        means = []
        for job in per_job:
            total = sum(w for _, w in job)
            means.append(sum(moments.mean * (w / total) for moments, w in job))  # Moments: needs = "moments"
        return cls(torch.cat(means).float())

    def stats(self, features: torch.Tensor) -> torch.Tensor:
        return at_least_float32(features).mean((2, 3))

    def loss_from_stats(self, mean: torch.Tensor) -> torch.Tensor:
        return relative_squared_error(mean, self.target.to(mean.dtype))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.loss_from_stats(self.stats(features))

    def tiled(self, map_size):
        return _MeanTerm(self, map_size)


class _MeanTerm(TileTerm):
    def __init__(self, loss, map_size):
        super().__init__(loss, map_size)
        self.sum: Optional[torch.Tensor] = None

    def accumulate(self, features, tile, factor):
        part = at_least_float32(features).sum((2, 3)).double()
        self.sum = part if self.sum is None else self.sum + part

    def whole(self):
        return (self.sum / self.pixels,)

    def empty(self):
        return self.sum is None

    def shapes(self, batch):
        return [(batch, self.loss.target.shape[-1])]

    def to_sums(self):
        return [self.sum]

    def from_sums(self, sums):
        (self.sum,) = sums

    def surrogate(self, features, tile, factor):
        return (self.grads[0] * at_least_float32(features).sum((2, 3))).sum() / self.pixels


class NoTilesStyleLoss(MeanStyleLoss):
    """The same loss without a tiled form: tiles are refused with the registry's sentence."""

    name = "toynotiles"
    help = "per-channel feature means, untileable (a test's toy loss)"
    tiled = StyleLoss.tiled


@pytest.fixture
def toys():
    for cls in (MeanStyleLoss, NoTilesStyleLoss):
        register(cls)
    yield
    for cls in (MeanStyleLoss, NoTilesStyleLoss):
        unregister(cls.name)


def test_the_toy_loss_is_a_choice_everywhere(toys):
    from bench.suite import matrix
    from cli.main import build_parser

    assert {"toymean", "toynotiles"} <= set(names())
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert "toymean" in commands["stylize"].format_help()
    assert "toymean" in commands["compare"].format_help()  # --losses' default: every registered loss
    assert Config(style_loss="toymean").style_loss == "toymean"
    args = parser.parse_args(["stylize", "c.png", "s.png", "-o", "o.png", "--style-loss", "toymean"])
    assert args.style_loss == "toymean"
    levers, _ = matrix(torch.device("cpu"))
    assert "loss_toymean" in {lever.name for lever in levers}
    # The body of nst serve's GET /options, which the page builds its form from (read at request time).
    from serve.uploads import options_schema

    style_loss_option = next(o for o in options_schema(Config()) if o["name"] == "style_loss")
    assert {"toymean", "toynotiles"} <= set(style_loss_option["choices"])


def test_an_unregistered_name_is_refused_in_one_sentence():
    with pytest.raises(UserError, match=r"must be one of auto, gram, ot, w2, not 'toymean'$"):
        Config(style_loss="toymean")
    with pytest.raises(UserError, match="must be one of"):
        style_loss("toymean")


def test_the_toy_loss_runs_untiled(toys):
    content = torch.rand(3, 32, 40, generator=torch.Generator().manual_seed(1))
    style = torch.rand(3, 36, 36, generator=torch.Generator().manual_seed(2))
    result = stylize(content, style, Config(device="cpu", size=40, min_size=40, steps=8, style_loss="toymean"))
    styles = [h["style"] for h in result.history]
    assert result.image.shape == (3, 32, 40) and styles[-1] < styles[0]


def test_the_toy_loss_tiles_exactly_in_float64(toys):
    config, extractor, criterion, *_, image = problem("toymean")
    assert all(isinstance(loss, MeanStyleLoss) for loss in criterion.style.values())
    total, parts, grad = loss_and_grad(Objective(extractor, criterion), image)
    grid = Tiling(16, Geometry.of(config.model, config.feature_layers)).grid(*image.shape[-2:])
    tiled, tiled_parts, tiled_grad = loss_and_grad(
        TiledObjective(extractor, criterion, grid, autocast=contextlib.nullcontext), image
    )
    torch.testing.assert_close(tiled, total, rtol=1e-10, atol=0)
    torch.testing.assert_close(tiled_parts["style"], parts["style"], rtol=1e-10, atol=0)
    assert float((tiled_grad - grad).abs().max() / grad.abs().max()) < 1e-10


def test_a_toy_loss_without_tiles_is_refused_in_one_sentence(toys):
    content = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    with pytest.raises(UserError) as refused:
        stylize(
            content, content, Config(device="cpu", size=32, min_size=32, steps=2, style_loss="toynotiles", tile="16")
        )
    message = str(refused.value)
    assert message.startswith("the toynotiles style loss has no tiled form") and message.count(".") <= 1
