"""Sliced OT, Gaussian W2, colour control and style masks against float64 references.

Tolerances: float64 inputs are compared at 1e-10 relative; the Newton-Schulz square root is run in
float32 where the engine runs it, and held to 1e-3 relative on the trace (its stated accuracy).
"""

import numpy as np
import pytest
import torch

from engine import Config, UserError, stylize
from engine.color import join_luminance, luminance_pair, match_colours, rgb_to_yiq
from engine.losses import MaskedGramStyleLoss, gram_matrix
from engine.style_losses import GaussianW2StyleLoss, SlicedOTStyleLoss, sliced_ot, sqrtm_eigh, trace_sqrtm


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------- sliced OT


def np_sliced_ot(x, t, directions):
    """Reference: sorted projections, target quantiles resampled by np.interp, relative squared error."""
    px = np.sort(directions @ x, axis=1)
    pt = np.sort(directions @ t, axis=1)
    if pt.shape[1] != px.shape[1]:
        q_t = np.linspace(0, 1, pt.shape[1])
        q_x = np.linspace(0, 1, px.shape[1])
        pt = np.stack([np.interp(q_x, q_t, row) for row in pt])
    return ((px - pt) ** 2).sum() / (pt**2).sum()


@pytest.mark.parametrize("q", [30, 30 * 2 + 7], ids=["same-size", "other-size"])
def test_sliced_ot_matches_float64_reference(q):
    x, t = rand(6, 30, seed=1), rand(6, q, seed=2) * 2 + 1
    directions = rand(5, 6, seed=3)
    directions = directions / directions.norm(dim=1, keepdim=True)
    got = sliced_ot(x, t, directions).item()
    assert got == pytest.approx(np_sliced_ot(x.numpy(), t.numpy(), directions.numpy()), rel=1e-10)


def test_sliced_ot_zero_for_identical_sets_and_permutation_invariant():
    feats = rand(1, 8, 5, 6, seed=4)
    loss = SlicedOTStyleLoss.from_targets([SlicedOTStyleLoss.target_stats([(feats, 1.0)])], projections=16)
    assert loss(feats).item() == pytest.approx(0.0, abs=1e-20)
    shuffled = feats.flatten(2)[..., torch.randperm(30, generator=torch.Generator().manual_seed(0))].reshape(1, 8, 5, 6)
    assert loss(shuffled).item() == pytest.approx(0.0, abs=1e-20)
    assert loss(feats * 1.1).item() > 1e-4


def test_sliced_ot_draws_fresh_directions_from_its_seed():
    feats, target = rand(1, 4, 6, 6, seed=5), rand(1, 4, 5, 5, seed=6)
    make = lambda seed: SlicedOTStyleLoss.from_targets(  # noqa: E731
        [SlicedOTStyleLoss.target_stats([(target, 1.0)])], projections=3, seed=seed
    )
    a, b = make(0), make(0)
    first, second = a(feats), a(feats)
    assert first.item() != second.item()  # new directions at each call
    assert [b(feats).item(), b(feats).item()] == [first.item(), second.item()]  # same seed, same sequence


def test_sliced_ot_gradcheck():
    target = SlicedOTStyleLoss.target_stats([(rand(1, 3, 2, 3, seed=7), 1.0)])
    loss = SlicedOTStyleLoss.from_targets([target], projections=4)
    x = rand(1, 3, 2, 2, seed=8).requires_grad_(True)
    directions = loss.directions(3, x.device, x.dtype)
    assert torch.autograd.gradcheck(lambda f: sliced_ot(f.reshape(3, -1), target, directions), (x,))


# --------------------------------------------------------------------------------------------- W2


def w2_reference(mu_x, cov_x, mu_s, cov_s):
    """The closed form with eigh in float64: |dmu|^2 + tr Sx + tr Ss - 2 tr sqrt(Ss^1/2 Sx Ss^1/2)."""

    def sqrtm(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root = sqrtm(cov_s)
    cross = np.trace(sqrtm(root @ cov_x @ root))
    return ((mu_x - mu_s) ** 2).sum() + np.trace(cov_x) + np.trace(cov_s) - 2 * cross


def test_w2_loss_matches_closed_form():
    feats, style = rand(1, 5, 6, 7, seed=9) * 3 + 1, rand(1, 5, 8, 4, seed=10) * 2 - 1
    loss = GaussianW2StyleLoss.from_targets([GaussianW2StyleLoss.target_stats([(style, 1.0)])])
    got = loss(feats.float()).item()
    x, s = feats.reshape(5, -1).numpy(), style.reshape(5, -1).numpy()
    cov = lambda a: np.cov(a, bias=True)  # noqa: E731 (population covariance, as the loss uses)
    want = w2_reference(x.mean(1), cov(x), s.mean(1), cov(s)) / (np.trace(cov(s)) + (s.mean(1) ** 2).sum())
    assert got == pytest.approx(want, rel=1e-3)  # float32 Newton-Schulz


def test_w2_is_zero_for_the_style_itself():
    style = rand(1, 6, 8, 8, seed=11)
    loss = GaussianW2StyleLoss.from_targets([GaussianW2StyleLoss.target_stats([(style, 1.0)])])
    assert abs(loss(style.float()).item()) < 1e-3


def test_newton_schulz_trace_accuracy_and_gradcheck():
    a = rand(3, 12, 20, seed=12)
    spd = a @ a.transpose(1, 2) / 20
    want = torch.stack([torch.linalg.eigvalsh(m).clamp_min(0).sqrt().sum() for m in spd])
    torch.testing.assert_close(trace_sqrtm(spd.float()).double(), want, rtol=1e-3, atol=0)
    x = rand(1, 3, 4, seed=13)
    small = (x @ x.transpose(1, 2) / 4 + 0.5 * torch.eye(3, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: trace_sqrtm(m, iters=30), (small,))


def test_w2_gradcheck_in_double():
    style = rand(1, 3, 4, 4, seed=14)
    loss = GaussianW2StyleLoss.from_targets([GaussianW2StyleLoss.target_stats([(style, 1.0)])]).double()
    x = (rand(1, 3, 3, 3, seed=15) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (x,))


def test_square_roots_stay_finite_on_near_singular_covariances():
    # Rank 3 in 16 dimensions (fewer pixels than channels, as at relu5_1 of a small image), plus a 1e-9 ridge.
    a = rand(16, 3, seed=16)
    cov = a @ a.T + 1e-9 * torch.eye(16, dtype=torch.float64)
    root = sqrtm_eigh(cov)
    assert torch.isfinite(root).all()
    torch.testing.assert_close(root @ root, cov, rtol=0, atol=1e-8)
    want = torch.linalg.eigvalsh(cov).clamp_min(0).sqrt().sum()
    # Unguarded, the coupled iteration diverges in float32 some steps after converging; 100 steps must not.
    for iters in (30, 100):
        got = trace_sqrtm(cov[None].float(), iters=iters)
        assert torch.isfinite(got).all() and got.item() == pytest.approx(want.item(), rel=1e-2), iters
    x = rand(1, 16, 2, 2, seed=17).float().requires_grad_(True)  # 4 pixels: a singular image covariance
    loss = GaussianW2StyleLoss.from_targets([(torch.zeros(16, dtype=torch.float64), cov)])
    loss(x).backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------- colour


def picture(h, w, seed, tint=(1.0, 1.0, 1.0)):
    img = torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))
    return (img * torch.tensor(tint)[:, None, None]).clamp(0, 1)


def test_luminance_round_trip_keeps_content_chroma():
    content, result = picture(20, 24, 1, (0.9, 0.5, 0.3)), picture(20, 24, 2)
    joined = join_luminance(result, content)
    yiq_joined, yiq_content = rgb_to_yiq(joined), rgb_to_yiq(content)
    inside = (joined > 0.001).all(0) & (joined < 0.999).all(0)  # where clamping did not bite
    torch.testing.assert_close(yiq_joined[1:, inside], yiq_content[1:, inside], rtol=0, atol=1e-5)
    torch.testing.assert_close(yiq_joined[0, inside], rgb_to_yiq(result)[0, inside], rtol=0, atol=1e-5)


def test_luminance_pair_is_grey_and_matched():
    content, style = picture(20, 20, 3, (0.6, 0.6, 0.6)), picture(30, 30, 4)
    grey_content, grey_style = luminance_pair(content, style)
    assert torch.equal(grey_content[0], grey_content[1]) and torch.equal(grey_style[0], grey_style[2])
    assert grey_style[0].mean().item() == pytest.approx(grey_content[0].mean().item(), abs=1e-3)


@pytest.mark.slow
def test_luminance_mode_output_has_the_content_chroma():
    content, style = picture(32, 40, 5, (0.9, 0.4, 0.2)), picture(32, 32, 6, (0.2, 0.5, 1.0))
    config = Config(
        device="cpu",
        size=40,
        min_size=40,
        steps=5,
        preserve_colors="luminance",
        content_layers=("relu2_2",),
        style_layers=("relu1_1", "relu2_1"),
    )
    out = stylize(content, style, config).image
    yiq_out, yiq_content = rgb_to_yiq(out), rgb_to_yiq(content)
    inside = (out > 0.002).all(0) & (out < 0.998).all(0)
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(yiq_out[1:, inside], yiq_content[1:, inside], rtol=0, atol=2e-3)


def test_histogram_mode_moves_style_mean_and_covariance_onto_content():
    # Mid-range colours so that the final clamp to [0, 1] does not bite.
    content = 0.3 + 0.4 * picture(40, 40, 7, (0.9, 0.5, 0.2))
    style = 0.35 + 0.3 * picture(30, 50, 8, (0.2, 0.6, 0.9))
    moved = match_colours(style, content)
    flat_m, flat_c = moved.reshape(3, -1).double(), content.reshape(3, -1).double()
    torch.testing.assert_close(flat_m.mean(1), flat_c.mean(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cov(flat_m), torch.cov(flat_c), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(torch.cov(style.reshape(3, -1).double()), torch.cov(flat_c), atol=1e-3)


# --------------------------------------------------------------------------------------------- masks


def test_masked_gram_equals_plain_gram_with_a_full_mask():
    feats = rand(2, 4, 6, 6, seed=20)
    target = gram_matrix(rand(1, 4, 5, 5, seed=21))
    masked = MaskedGramStyleLoss(target[:, None], torch.ones(1, 1, 12, 12, dtype=torch.float64), [1.0])
    from engine.losses import GramStyleLoss

    assert masked(feats).item() == pytest.approx(GramStyleLoss(target)(feats).item(), rel=1e-10)


@pytest.mark.slow
def test_style_tied_to_one_half_changes_that_half_most(tmp_path):
    from PIL import Image

    from engine.api import build_extractor

    content = torch.full((3, 48, 64), 0.5) + 0.05 * picture(48, 64, 9)
    stripes = torch.zeros(3, 48, 48)
    stripes[:, :, ::4] = 1.0  # a strong, simple texture
    left = np.zeros((48, 64), np.uint8)
    left[:, :32] = 255
    Image.fromarray(left).save(tmp_path / "left.png")
    config = Config(
        device="cpu",
        size=64,
        min_size=64,
        steps=15,
        style_weight=50,
        ema_decay=0,
        content_layers=("relu2_2",),
        style_layers=("relu1_1", "relu2_1"),
        style_masks=(str(tmp_path / "left.png"),),
    )
    out = stylize(content, [stripes], config).image
    relu1_1 = build_extractor(Config(device="cpu", content_layers=(), style_layers=("relu1_1",)))

    def gram_change(cols):
        before = gram_matrix(relu1_1(content[None, :, :, cols])["relu1_1"])
        after = gram_matrix(relu1_1(out[None, :, :, cols])["relu1_1"])
        return ((after - before).norm() / before.norm()).item()

    tied, free = gram_change(slice(0, 32)), gram_change(slice(32, 64))
    assert tied > 5 * free, (tied, free)


def test_masks_need_one_per_style_and_the_gram_loss(tmp_path):
    with pytest.raises(UserError, match="style_masks work with the gram style loss only"):
        Config(style_loss="ot", style_masks=("a.png",))
    with pytest.raises(UserError, match="style_masks has 1 mask but there are 2 style images"):
        stylize(
            picture(32, 32, 1),
            [picture(32, 32, 2), picture(32, 32, 3)],
            Config(device="cpu", size=32, min_size=32, steps=1, style_masks=("a.png",)),
        )


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ot", "w2"])
def test_other_losses_run_end_to_end_and_descend(loss):
    config = Config(
        device="cpu",
        size=48,
        min_size=48,
        steps=30,
        style_loss=loss,
        ema_decay=0,
        content_layers=("relu2_2",),
        style_layers=("relu1_1", "relu2_1", "relu3_1"),
    )
    result = stylize(picture(40, 48, 10), picture(40, 40, 11, (1.0, 0.3, 0.1)), config)
    styles = [h["style"] for h in result.history]
    assert all(np.isfinite(styles)) and np.mean(styles[-5:]) < 0.7 * np.mean(styles[:5]), styles
