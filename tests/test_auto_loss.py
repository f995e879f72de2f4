"""``--style-loss auto``, the default: ot at its own weights where it can run, gram where it cannot.

Each case checks the choice and that the run it makes is, bit for bit, the run of the loss it chose named
explicitly, so ``auto`` adds a decision and nothing else.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import stop_after

from engine import Config, UserError, stylize
from engine import checkpoint as ckpt
from engine.criterion import build_criterion
from engine.memory import resolve_style_loss
from engine.optimize import Interrupted, Objective
from engine.style_losses import AUTO_STYLE_LOSSES, SlicedOTStyleLoss, style_loss

SMALL = dict(
    device="cpu",
    precision="fp32",
    size=48,
    min_size=34,
    steps=4,
    content_layers=("relu2_2",),
    style_layers=("relu1_1", "relu2_1", "relu3_1"),
)


def picture(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair():
    return picture(40, 48, 1), picture(36, 36, 2)


def test_default_is_auto_and_each_loss_brings_its_own_weights():
    config = Config()
    assert (config.style_loss, config.style_weight, config.style_layer_weights) == ("auto", None, None)
    assert AUTO_STYLE_LOSSES[0] == "ot"
    ot = config.with_style_loss("ot")
    assert (ot.style_weight, ot.style_layer_weights) == (14.0, (1.0, 1.0, 1.0, 1.0, 0.25))
    # The old default's look stays one option away: gram at its own weight, layers equal.
    gram = config.with_style_loss("gram")
    assert (gram.style_weight, gram.style_layer_weights) == (4.0, (1.0,) * 5)
    # What the user sets wins over the loss's own.
    mine = dataclasses.replace(config, style_weight=2.5, style_layer_weights=(1, 2, 3, 4, 5)).with_style_loss("ot")
    assert (mine.style_weight, mine.style_layer_weights) == (2.5, (1.0, 2.0, 3.0, 4.0, 5.0))


@pytest.mark.parametrize(
    "settings, chosen",
    [
        (dict(), "ot"),
        (dict(tile="checkpoint"), "ot"),
        (dict(tile="256"), "gram"),  # ot sorts the whole image: tiles cannot split it
        (dict(cuda_graphs="on"), "gram"),  # ot draws new directions each step: a graph cannot replay them
        (dict(style_masks=("a.png",)), "gram"),  # only gram takes masks
    ],
    ids=["untiled", "checkpoint", "tiles", "graphs-on", "masks"],
)
def test_auto_picks_ot_where_it_can_run_else_gram(settings, chosen):
    config = Config(**settings)
    assert resolve_style_loss(config, None, 512, 512, budget=64 * 2**30).style_loss == chosen


def test_auto_takes_gram_when_only_tiles_fit_the_budget():
    config = Config()
    assert resolve_style_loss(config, None, 512, 512, budget=64 * 2**30).style_loss == "ot"
    # 0.2 GiB: a 2048 px image fits only in tiles, which ot cannot use; gram can.
    assert resolve_style_loss(config, None, 2048, 2048, budget=0.2 * 2**30).style_loss == "gram"


def test_named_loss_is_kept_even_where_auto_would_not_choose_it():
    config = Config(style_loss="w2")
    assert resolve_style_loss(config, None, 2048, 2048, budget=0.2 * 2**30).style_loss == "w2"
    with pytest.raises(UserError, match="cannot be split into tiles exactly"):
        stylize(picture(40, 48, 1), picture(36, 36, 2), Config(**{**SMALL, "style_loss": "ot", "tile": "16"}))


@pytest.mark.parametrize("tile, chosen", [("off", "ot"), ("16", "gram")])
def test_an_auto_run_is_the_run_of_the_loss_it_chose(pair, tile, chosen):
    # The content layers left unset too: each loss brings its own (ot two, gram one).
    settings = {k: v for k, v in SMALL.items() if k != "content_layers"}
    auto = stylize(*pair, Config(**settings, tile=tile))
    assert auto.config.style_loss == chosen
    own = style_loss(chosen)
    named = stylize(
        *pair,
        Config(
            **settings,
            tile=tile,
            style_loss=chosen,
            style_weight=own.weight,
            style_layer_weights=own.default_layer_weights(SMALL["style_layers"]),
            content_layers=own.content_layers,
        ),
    )
    assert torch.equal(auto.image, named.image)
    assert (auto.config.style_weight, auto.config.content_layers) == (own.weight, own.content_layers)


def test_content_layers_are_the_chosen_losss_own_unless_given():
    assert Config().content_layers is None
    assert Config().with_style_loss("ot").content_layers == ("relu3_1", "relu4_2")
    assert Config().with_style_loss("gram").content_layers == ("relu4_2",)  # the old default, as it was
    assert Config(content_layers=("relu2_2",)).with_style_loss("ot").content_layers == ("relu2_2",)
    # One extractor serves whichever loss auto picks: it reads the content layers of both.
    assert Config(style_layers=("relu1_1",)).feature_layers == ("relu3_1", "relu4_2", "relu1_1")
    assert Config(style_layers=("relu1_1",), style_loss="gram").feature_layers == ("relu4_2", "relu1_1")
    # Weights per content layer need the layers when auto leaves their number open.
    with pytest.raises(UserError, match="content_layer_weights needs content_layers with style_loss auto"):
        Config(content_layer_weights=(1.0, 2.0))
    assert Config(style_loss="ot", content_layer_weights=(1.0, 2.0)).content_layer_weights == (1.0, 2.0)


def test_a_resumed_auto_run_keeps_its_loss_and_equals_the_uninterrupted_one(pair, tmp_path):
    config = Config(**SMALL)
    full = stylize(*pair, config)
    with pytest.raises(Interrupted):
        stylize(*pair, config, checkpoint=ckpt.CheckpointPlan(str(tmp_path / "run.ckpt")), control=stop_after(5))
    state = ckpt.load(tmp_path / "run.ckpt")
    assert (state["config"]["style_loss"], state["style_loss"]) == ("auto", "ot")  # as asked, and as resolved
    resumed = stylize(*pair, config, resume=state)
    torch.testing.assert_close(resumed.image, full.image, rtol=0, atol=1e-6)


def test_the_criterion_needs_a_resolved_loss_and_ot_is_not_captured(pair):
    from engine.core import build_extractor

    config = Config(**SMALL)
    extractor = build_extractor(config, torch.device("cpu"))
    content, style = pair
    with pytest.raises(ValueError, match="needs a registered style loss, not 'auto'"):
        build_criterion(config, extractor, content[None], [([style], [1.0])], min_side=16)
    for name, capturable in (("ot", False), ("gram", True)):
        criterion = build_criterion(
            config.with_style_loss(name), extractor, content[None], [([style], [1.0])], min_side=16
        )
        assert isinstance(criterion.style["relu1_1"], SlicedOTStyleLoss) == (name == "ot")
        assert Objective(extractor, criterion).capturable is capturable
