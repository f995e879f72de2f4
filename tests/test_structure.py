"""The structure term (engine/structure.py, ``structure_weight``): its maths, its option, tiles, reproducibility."""

import argparse
import contextlib
from types import SimpleNamespace

import pytest
import torch
from helpers import stop_after

from engine import Config, UserError, structure, stylize
from engine import checkpoint as ckpt
from engine.core import Core, build_extractor
from engine.images import load_image, resize
from engine.memory import OutOfBudget, plan_scale
from engine.optimize import Interrupted
from engine.structure import StructureLoss
from engine.tiling import TiledObjective

SMALL = dict(
    device="cpu", size=48, min_size=34, steps=6, content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1")
)


def picture(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def random_features(seed, n=1, dtype=torch.float32, size=8):
    g = torch.Generator().manual_seed(seed)
    return {
        "relu3_1": torch.rand(n, 6, size, size, generator=g, dtype=dtype),
        "relu4_1": torch.rand(n, 5, size // 2, size // 2, generator=g, dtype=dtype),
    }


@pytest.fixture(scope="module")
def extractor():
    return build_extractor(Config(device="cpu", structure_weight=1.0))


@pytest.fixture(scope="module")
def photo():
    return resize(load_image("examples/tubingen.jpg"), (72, 96))


def test_zero_for_the_content_itself(extractor, photo):
    with torch.no_grad():
        features = extractor(photo[None])
        assert structure.StructureLoss.of(features)(features).item() == 0.0


def test_blind_to_the_length_of_each_positions_feature_vector():
    """Cosine distances: scaling a position's feature vector (a finer layer's in whole pooling windows) changes
    nothing; moving the vectors' directions does."""
    target = random_features(0)
    term = structure.StructureLoss.of(target)
    x = random_features(1)
    g = torch.Generator().manual_seed(2)
    coarse = torch.rand(1, 1, 4, 4, generator=g) * 5 + 0.1
    fine = torch.rand(1, 1, 4, 4, generator=g).repeat_interleave(2, -1).repeat_interleave(2, -2) * 5 + 0.1
    scaled = {"relu3_1": x["relu3_1"] * fine, "relu4_1": x["relu4_1"] * coarse}
    torch.testing.assert_close(term(scaled), term(x), rtol=1e-5, atol=1e-7)
    shifted = {"relu3_1": x["relu3_1"], "relu4_1": x["relu4_1"] + 0.5 * torch.rand(1, 5, 1, 1, generator=g)}
    assert abs(term(shifted).item() - term(x).item()) > 1e-3


def test_gradient_matches_finite_differences_in_float64():
    target = random_features(0, n=2, dtype=torch.float64, size=6)
    term = structure.StructureLoss.of(target)
    x = random_features(1, n=2, dtype=torch.float64, size=6)
    inputs = tuple(t.requires_grad_() for t in (x["relu3_1"], x["relu4_1"]))
    assert torch.autograd.gradcheck(lambda a, b: term({"relu3_1": a, "relu4_1": b}), inputs)


def test_a_pasted_foreign_square_costs_more_than_a_global_tint(extractor, photo):
    """A square of the painting pasted into the sky breaks the layout; tinting the whole photo changes the pixels
    more (mean squared difference 0.013 against 0.008) but keeps which places look alike."""
    painting = resize(load_image("examples/starry_night.jpg"), (72, 96))
    pasted = photo.clone()
    pasted[:, 4:36, 8:40] = painting[:, 4:36, 8:40]
    tinted = (photo * torch.tensor([1.25, 0.9, 0.7])[:, None, None]).clamp(0, 1)
    assert (tinted - photo).pow(2).mean() > (pasted - photo).pow(2).mean()
    with torch.no_grad():
        term = structure.StructureLoss.of(extractor(photo[None]))
        assert term(extractor(pasted[None])).item() > 2 * term(extractor(tinted[None])).item() > 0


def test_positions_are_capped_and_the_value_does_not_grow_with_them():
    assert structure.positions(32, 32) == 1024
    assert structure.positions(64, 64) == 1024  # stride 2
    assert structure.positions(128, 96) <= structure.MAX_POSITIONS
    assert structure.positions(45, 45) == 2025
    # Two unrelated feature sets: the row distances are near their typical value at any number of positions.
    small = structure.StructureLoss.of(random_features(0, size=8))(random_features(1, size=8)).item()
    large = structure.StructureLoss.of(random_features(0, size=32))(random_features(1, size=32)).item()
    assert 0.5 < large / small < 2


@pytest.mark.parametrize("value", [-1.0, float("nan"), "strong", True])
def test_the_option_is_checked_in_one_sentence(value):
    with pytest.raises(UserError) as info:
        Config(structure_weight=value)
    assert str(info.value) == f"structure_weight must be a finite number zero or more, not {value!r}"


def test_the_option_reaches_the_cli_and_http():
    from cli.options import add_config_options, config_from_args
    from serve.uploads import CLIENT_OPTIONS

    parser = argparse.ArgumentParser()
    add_config_options(parser)
    assert config_from_args(parser.parse_args(["--structure-weight", "2.5"])).structure_weight == 2.5
    assert config_from_args(parser.parse_args([])).structure_weight == 0.0
    assert "structure_weight" in CLIENT_OPTIONS


def test_tiles_are_refused_in_one_sentence_but_checkpoint_and_off_run():
    with pytest.raises(UserError) as info:
        Config(structure_weight=1.0, tile="64")
    assert str(info.value) == (
        "the structure term (structure_weight) compares positions across the whole image, so it cannot be split "
        "into tiles; use tile off or checkpoint, or structure_weight 0"
    )
    # gram: the loss that tiles (ot, which auto would pick here, does not).
    config = Config(device="cpu", style_loss="gram", structure_weight=1.0, size=256)
    assert plan_scale(config, None, 256, 256, budget=1e12).mode == "untiled"
    assert (
        plan_scale(Config(device="cpu", style_loss="gram", structure_weight=1.0, tile="checkpoint"), None, 64, 64).mode
        == "checkpoint"
    )
    # A budget below checkpointed blocks but above 64 px tiles: gram alone runs tiled, with the term it cannot.
    gram = Config(device="cpu", style_loss="gram", size=256)
    budget = (
        plan_scale(Config(device="cpu", style_loss="gram", tile="64"), None, 256, 256).estimate
        + plan_scale(Config(device="cpu", style_loss="gram", tile="checkpoint"), None, 256, 256).estimate
    ) / 2
    assert plan_scale(gram, None, 256, 256, budget=budget).mode == "tiled"
    with pytest.raises(OutOfBudget, match="with the structure term, which cannot be tiled"):
        plan_scale(config, None, 256, 256, budget=budget)
    # The tiled objective asks every loss module, the term included, and gets the same sentence.
    criterion = SimpleNamespace(style={}, structure=StructureLoss(torch.zeros(1, 4, 4)))
    with pytest.raises(UserError) as tiled:
        TiledObjective(None, criterion, None, autocast=contextlib.nullcontext)
    assert str(tiled.value) == str(info.value)


def test_the_memory_model_counts_the_matrices():
    on, off = Config(device="cpu", structure_weight=1.0, tile="off"), Config(device="cpu", tile="off")
    added = plan_scale(on, None, 256, 256, batch=2).estimate - plan_scale(off, None, 256, 256, batch=2).estimate
    assert added == structure.state_bytes(on, 256, 256, 2) == 2 * structure.MATRICES * 1024**2 * 4


def test_a_run_is_reproducible_and_checkpoint_mode_agrees(photo):
    style = picture(36, 36, 2)
    config = Config(**SMALL, structure_weight=8.0)
    first, second = stylize(photo, style, config), stylize(photo, style, config)
    assert torch.equal(first.image, second.image)
    assert "structure" in first.history[-1] and first.history[-1]["structure"] > 0
    checkpointed = stylize(photo, style, Config(**SMALL, structure_weight=8.0, tile="checkpoint"))
    torch.testing.assert_close(checkpointed.image, first.image, rtol=0, atol=1e-4)
    without = stylize(photo, style, Config(**SMALL))
    assert "structure" not in without.history[-1]
    assert not torch.equal(without.image, first.image)


@pytest.mark.parametrize("stop_at", [3, 8], ids=["mid-scale", "second-scale"])
def test_resumed_run_equals_uninterrupted(photo, tmp_path, stop_at):
    style = picture(36, 36, 2)
    config = Config(**SMALL, structure_weight=8.0)
    full = stylize(photo, style, config)
    plan = ckpt.CheckpointPlan(str(tmp_path / "run.ckpt"))
    with pytest.raises(Interrupted):
        stylize(photo, style, config, checkpoint=plan, control=stop_after(stop_at))
    resumed = stylize(photo, style, config, resume=ckpt.load(tmp_path / "run.ckpt"))
    torch.testing.assert_close(resumed.image, full.image, rtol=0, atol=1e-6)


def test_an_engine_without_the_terms_layers_refuses_a_job_that_needs_them():
    core = Core.open(Config(device="cpu", style_layers=("relu1_1", "relu2_1"), content_layers=("relu2_2",)))
    job = Config(device="cpu", style_layers=("relu1_1", "relu2_1"), content_layers=("relu2_2",), structure_weight=1.0)
    with pytest.raises(UserError, match="this job reads layer relu3_1, which this engine's network does not compute"):
        core.runtime_for(job)
    core.close()


def test_a_checkpoint_from_before_the_option_resumes_and_one_with_it_is_kept_to_it(photo, tmp_path):
    style = picture(36, 36, 2)
    plan = ckpt.CheckpointPlan(str(tmp_path / "run.ckpt"))
    with pytest.raises(Interrupted):
        stylize(photo, style, Config(**SMALL), checkpoint=plan, control=stop_after(3))
    state = ckpt.load(tmp_path / "run.ckpt")
    del state["config"]["structure_weight"]  # as a checkpoint written before the option existed
    ckpt.check_compatible(state, Config(**SMALL), state["inputs"], "old.ckpt")
    with pytest.raises(UserError, match="structure_weight 0.0 in the checkpoint, 2.0 now"):
        ckpt.check_compatible(state, Config(**SMALL, structure_weight=2.0), state["inputs"], "old.ckpt")
