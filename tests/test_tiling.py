"""Exact tiling, activation checkpointing and the memory model (engine/tiling.py, engine/memory.py).

The tiled loss and gradient must be the untiled ones: float64 to 1e-10 on
uneven images and grids with thin last tiles, for every tileable loss, with
a batch of two jobs and styles of other sizes. Most tests use the layers up
to relu3_1 (stride 4, halo 12), so that 40-90 px images have many tiles with
real halos; one test uses the default layers (stride 16, halo 80).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch
from helpers import ENV, ROOT

from engine import Config, UserError, stylize
from engine.api import build_extractor
from engine.criterion import build_criterion
from engine.memory import (
    GiB,
    activation_bytes_per_pixel,
    plan_scale,
    state_bytes_per_pixel,
)
from engine.optimize import Objective
from engine.tiling import Geometry, TiledObjective, TileGrid, Tiling
from engine.vgg import BlockCheckpointed, recomputed_blocks

SHALLOW = dict(style_layers=("relu1_1", "relu2_1", "relu3_1"), content_layers=("relu2_1",))


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def problem(loss="gram", dtype=torch.float64, size=(46, 58), batch=2, masks=False, layers=SHALLOW, padding="zeros"):
    """Extractor, untiled criterion and an image for ``batch`` jobs; the second job blends two styles."""
    config = Config(device="cpu", style_loss=loss, padding=padding, **layers)
    extractor = build_extractor(config).to(dtype)
    content = rand(batch, 3, *size, seed=1, dtype=dtype)
    styles = [
        ([rand(3, 37, 51, seed=2, dtype=dtype)], (1.0,)),
        ([rand(3, 29, 23, seed=3, dtype=dtype), rand(3, 64, 40, seed=4, dtype=dtype)], (1.0, 2.0)),
    ][:batch]
    mask = None
    if masks:  # one soft mask per style image of the first job
        mask = rand(1, 1, *size, seed=5, dtype=dtype)
        styles = [([rand(3, 37, 51, seed=2, dtype=dtype), rand(3, 29, 23, seed=3, dtype=dtype)], (1.0, 3.0))] * batch
        mask = torch.cat([mask, 1 - mask])
    criterion = build_criterion(config, extractor, content, styles, min_side=4, masks=mask).to(dtype)
    image = rand(batch, 3, *size, seed=6, dtype=dtype).requires_grad_(True)
    return config, extractor, criterion, content, styles, mask, image


def loss_and_grad(objective, image):
    image.grad = torch.zeros_like(image)
    total, parts = objective(image)
    return total, parts, image.grad.clone()


# ------------------------------------------------------------------------------------------ geometry


def test_geometry_of_the_default_and_shallow_networks():
    assert (
        Geometry.of("vgg19", Config().feature_layers).stride,
        Geometry.of("vgg19", Config().feature_layers).halo,
    ) == (16, 80)
    shallow = Geometry.of("vgg19", ("relu1_1", "relu2_1", "relu3_1"))
    assert (shallow.stride, shallow.halo) == (4, 12)
    assert shallow.factors["relu1_1"] == 1 and shallow.factors["relu2_1"] == 2 and shallow.factors["relu3_1"] == 4


def test_grid_partitions_the_image_and_every_feature_map():
    geometry = Geometry.of("vgg19", SHALLOW["style_layers"])
    grid = TileGrid.plan(46, 58, 16, geometry)
    cover = torch.zeros(46, 58, dtype=torch.int32)
    for tile in grid.tiles:
        y0, y1, x0, x1 = tile.own
        cover[y0:y1, x0:x1] += 1
        assert all(v % 4 == 0 for v in tile.crop[::2])  # crop origins on the stride
    assert bool((cover == 1).all())
    assert {t.own[1] - t.own[0] for t in grid.tiles} == {16, 14}  # 46 = 16 + 16 + 14
    for name in ("relu1_1", "relu2_1", "relu3_1"):
        factor = geometry.factors[name]
        seen = torch.zeros(46 // factor, 58 // factor, dtype=torch.int32)
        for tile in grid.tiles:
            seen[tile.in_image(factor)] += 1
        assert bool((seen == 1).all()), name


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("loss, masks", [("gram", False), ("gram", True), ("w2", False)])
@pytest.mark.parametrize("tile", [16, 28])  # 28 rounds to 28: last rows/columns of 18 and 2 px
def test_tiled_loss_and_gradient_equal_untiled_in_float64(loss, masks, tile):
    config, extractor, criterion, *_, image = problem(loss, masks=masks)
    total, parts, grad = loss_and_grad(Objective(extractor, criterion), image)
    grid = Tiling(tile, Geometry.of(config.model, config.feature_layers)).grid(*image.shape[-2:])
    assert len(grid.tiles) > 4
    tiled, tiled_parts, tiled_grad = loss_and_grad(
        TiledObjective(extractor, criterion, grid, autocast=contextlib.nullcontext), image
    )
    torch.testing.assert_close(tiled, total, rtol=1e-10, atol=0)
    for name in ("content", "style", "tv"):
        torch.testing.assert_close(tiled_parts[name], parts[name], rtol=1e-10, atol=0)
    assert float((tiled_grad - grad).abs().max() / grad.abs().max()) < 1e-10


@pytest.mark.parametrize("padding", ["replicate", "reflect"])
def test_tiled_equals_untiled_with_edge_padding(padding):
    """The first convolution pads the image's own edge; a tile's crop edge inside the image lies in the halo."""
    config, extractor, criterion, *_, image = problem("gram", padding=padding)
    total, _, grad = loss_and_grad(Objective(extractor, criterion), image)
    zeros = problem("gram")
    assert not torch.allclose(total, loss_and_grad(Objective(zeros[1], zeros[2]), zeros[-1])[0])  # it matters
    grid = Tiling(16, Geometry.of(config.model, config.feature_layers)).grid(*image.shape[-2:])
    tiled, _, tiled_grad = loss_and_grad(
        TiledObjective(extractor, criterion, grid, autocast=contextlib.nullcontext), image
    )
    torch.testing.assert_close(tiled, total, rtol=1e-10, atol=0)
    assert float((tiled_grad - grad).abs().max() / grad.abs().max()) < 1e-10


def test_tiled_gradient_in_float32_and_with_the_default_layers():
    """float32 with the default layers (halo 80): within 1e-5 of the largest gradient (measured 2e-7)."""
    config, extractor, criterion, *_, image = problem("gram", dtype=torch.float32, size=(200, 170), batch=1, layers={})
    total, _, grad = loss_and_grad(Objective(extractor, criterion), image)
    grid = Tiling(64, Geometry.of(config.model, config.feature_layers)).grid(200, 170)
    tiled, _, tiled_grad = loss_and_grad(
        TiledObjective(extractor, criterion, grid, autocast=contextlib.nullcontext), image
    )
    torch.testing.assert_close(tiled, total, rtol=1e-5, atol=0)
    assert float((tiled_grad - grad).abs().max() / grad.abs().max()) < 1e-5


@pytest.mark.parametrize("loss, masks", [("gram", False), ("gram", True), ("w2", False)])
def test_tiled_targets_equal_untiled(loss, masks):
    config, extractor, criterion, content, styles, mask, _ = problem(loss, masks=masks)
    tiling = Tiling(12, Geometry.of(config.model, config.feature_layers))
    tiled = build_criterion(config, extractor, content, styles, min_side=4, masks=mask, tiling=tiling).to(torch.float64)
    ours, theirs = criterion.state_dict(), tiled.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        # Style targets are stored in float32, whatever the features: compare at that precision. A matrix
        # square root amplifies rounding in its smallest eigenvalues (d sqrt(l) = dl / 2 sqrt(l)).
        atol = (1e-5 if key.endswith("cov_sqrt") else 1e-9) * float(ours[key].abs().max())
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-6, atol=atol)


def test_checkpointed_extractor_gives_the_same_features_and_gradients():
    config, extractor, criterion, *_, image = problem("gram", batch=1)
    total, _, grad = loss_and_grad(Objective(extractor, criterion), image)
    again, _, grad_again = loss_and_grad(Objective(BlockCheckpointed(extractor), criterion), image)
    torch.testing.assert_close(again, total, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_again, grad, rtol=1e-12, atol=1e-20)


@pytest.mark.parametrize("blocks", [0, 1, 2, 3])
def test_checkpointing_any_number_of_leading_blocks_gives_the_same_features_and_gradients(blocks):
    config, extractor, criterion, *_, image = problem("gram", batch=1)
    total, _, grad = loss_and_grad(Objective(extractor, criterion), image)
    again, _, grad_again = loss_and_grad(Objective(BlockCheckpointed(extractor, blocks=blocks), criterion), image)
    assert torch.equal(again, total) and torch.equal(grad_again, grad)


def test_checkpoint_recomputes_the_blocks_that_hold_most_activations():
    """VGG19 to relu5_1: blocks 1-2 (70% of the activations, 26% of the multiply-adds); the shallow layers: block 1."""
    assert recomputed_blocks("vgg19", Config().feature_layers) == 2
    assert recomputed_blocks("vgg19", SHALLOW["style_layers"] + SHALLOW["content_layers"]) == 1
    assert recomputed_blocks("vgg19", ("relu1_1",)) == 1


def test_sliced_ot_refuses_tiles_in_one_sentence():
    config, extractor, criterion, *_ = problem("ot", batch=1)
    grid = Tiling(16, Geometry.of(config.model, config.feature_layers)).grid(46, 58)
    with pytest.raises(UserError, match="ot style loss .* cannot be split into tiles exactly"):
        TiledObjective(extractor, criterion, grid, autocast=contextlib.nullcontext)
    with pytest.raises(UserError, match="cannot be split into tiles"):
        plan_scale(Config(style_loss="ot", tile="64"), None, 512, 512)


# ------------------------------------------------------------------------------------------ whole runs


def _run(**settings):
    from engine.images import load_image

    content, style = load_image(ROOT / "examples/tubingen.jpg"), load_image(ROOT / "examples/starry_night.jpg")
    # fp32: tiles are exact to float32 rounding; in bf16 (the CPU's auto with AMX) each crop rounds its own way.
    # gram: the loss that tiles, in every mode compared (auto would take ot where it can).
    config = Config(
        device="cpu", size=64, min_size=64, ema_decay=0, precision="fp32", style_loss="gram", **SHALLOW, **settings
    )
    return stylize(content, style, config)


@pytest.mark.slow
def test_a_tiled_run_ends_at_the_untiled_image():
    untiled, tiled, checkpointed = (_run(steps=6, tile=t) for t in ("off", "16", "checkpoint"))
    losses = lambda r: torch.tensor([h["loss"] for h in r.history])  # noqa: E731
    torch.testing.assert_close(losses(tiled), losses(untiled), rtol=1e-5, atol=0)
    # Adam's first steps move every pixel by about lr * sign(gradient), so pixels whose gradient is near
    # zero take rounding differences up to lr; the bulk of the image agrees to rounding.
    diff = (tiled.image - untiled.image).abs()
    assert float(diff.max()) < 2e-3 and float(diff.mean()) < 1e-5
    assert torch.equal(checkpointed.image, untiled.image)


@pytest.mark.slow
def test_resume_of_a_tiled_run_equals_the_uninterrupted_run(tmp_path):
    from engine.checkpoint import CheckpointPlan, load
    from engine.control import Control, Interrupted

    whole = stylize_with(None)
    steps = []

    def watch():
        steps.append(1)
        if len(steps) == 4:  # stop after the fourth step
            control.interrupt()

    control = Control(watch=watch)
    plan = CheckpointPlan(str(tmp_path / "run.ckpt"))
    with pytest.raises(Interrupted):
        stylize_with(plan, control=control)
    state = load(plan.path)
    resumed = stylize_with(None, resume=state)
    assert torch.equal(resumed.image, whole.image)


def stylize_with(plan, resume=None, control=None):
    from engine.images import load_image

    content, style = load_image(ROOT / "examples/tubingen.jpg"), load_image(ROOT / "examples/starry_night.jpg")
    config = Config(device="cpu", size=64, min_size=64, ema_decay=0, steps=6, tile="16", **SHALLOW)
    return stylize(content, style, config, checkpoint=plan, resume=resume, control=control)


# ------------------------------------------------------------------------------------------ memory model


def test_auto_picks_untiled_then_checkpoint_then_tiles_as_the_budget_shrinks():
    config = Config()
    pixels = 1024 * 768
    state = state_bytes_per_pixel(config) * pixels
    untiled = state + activation_bytes_per_pixel(config.model, config.feature_layers) * pixels
    checkpointed = state + activation_bytes_per_pixel(config.model, config.feature_layers, mode="checkpoint") * pixels
    assert checkpointed < 0.8 * untiled
    assert plan_scale(config, None, 768, 1024, budget=untiled * 1.01).mode == "untiled"
    assert plan_scale(config, None, 768, 1024, budget=untiled * 0.99).mode == "checkpoint"
    small = plan_scale(config, None, 768, 1024, budget=(untiled + state) / 4)
    assert small.mode == "tiled" and small.estimate <= (untiled + state) / 4 and small.tiling.tile % 16 == 0
    smaller = plan_scale(config, None, 768, 1024, budget=state + (small.estimate - state) / 4)
    assert smaller.mode == "tiled" and smaller.tiling.tile < small.tiling.tile
    with pytest.raises(UserError, match=r"needs about .* GiB even in the smallest tiles .* bytes per pixel"):
        plan_scale(config, None, 768, 1024, budget=state * 0.9)
    # From the config: a budget in GiB, and the explicit modes.
    assert plan_scale(Config(memory_budget=untiled * 0.99 / GiB), None, 768, 1024).mode == "checkpoint"
    assert plan_scale(Config(tile="off"), None, 768, 1024, budget=1).mode == "untiled"
    assert plan_scale(Config(tile="300"), None, 768, 1024).tiling.grid(768, 1024).tile == 304  # whole strides


def test_tile_setting_is_checked():
    assert Config(tile=512).tile == "512"
    for bad in ("big", "0", "-5", 2.5):
        with pytest.raises(UserError, match="tile must be auto, off, checkpoint or a tile size in pixels"):
            Config(tile=bad)


MEASURE = """
import json, re, sys, torch
from engine import Config
from engine.api import loop_extractor, scale_objective
from engine.criterion import build_criterion
from engine.memory import plan_scale
from engine.optimize import make_step
from engine.runtime import resolve_runtime
size, tile = int(sys.argv[1]), sys.argv[2]
config = Config(device="cpu", tile=tile, style_loss="gram")  # the activation model, with the loss that tiles
runtime = resolve_runtime(config)
extractor = loop_extractor(config, runtime)
content = runtime.layout(torch.rand(1, 3, size, size))
styles = [([torch.rand(3, 64, 64)], (1.0,))]
criterion = build_criterion(config, extractor, content, styles, min_side=16, runtime=runtime)
memory = plan_scale(config, runtime, size, size)
objective = scale_objective(memory=memory, extractor=extractor, criterion=criterion, runtime=runtime, size=(size, size))
step = make_step(content.clone().requires_grad_(True), objective, "adam", 0.02, runtime)
rss = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
before = rss("VmRSS")
step()
print(json.dumps({"peak": rss("VmHWM") - before, "estimate": memory.estimate, "mode": memory.mode}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("tile", ["off", "128"])
def test_memory_model_against_a_measured_peak(tile):
    """The estimate of the first step's peak above what was resident before it, within 2x."""
    # Every allocation above 64 KiB is its own mapping, returned when freed: RSS then follows what is live.
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, "384", tile], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    config = Config(style_loss="gram")
    state = state_bytes_per_pixel(config) * 384 * 384
    activations = got["estimate"] - state
    assert 0.5 < got["peak"] / activations < 2, got
