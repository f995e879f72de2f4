"""Sliced OT, Gaussian W2, colour control and style masks against float64 references.

Tolerances: float64 inputs are compared at 1e-10 relative; the Newton-Schulz square root is run in
float32 where the engine runs it, and held to 1e-3 relative on the trace (its stated accuracy).
"""

import contextlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import Config, UserError, stylize
from engine.color import join_luminance, luminance_pair, match_colours, rgb_to_yiq
from engine.losses import gram_matrix
from engine.style_losses import (
    GaussianW2StyleLoss,
    MaskedGramStyleLoss,
    SlicedOTStyleLoss,
    sliced_ot,
    sorted_values,
    sqrtm_eigh,
    trace_sqrtm,
    w2,
)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_style_sides_fast_sort_gives_torch_sorts_values(dtype):
    values = torch.randn(8, 1000, generator=torch.Generator().manual_seed(9), dtype=dtype)
    values[:, :300] = 0.0  # ReLU's zeros: many ties
    values[:, 300:400] = values[:, 400:500]
    got = sorted_values(values)
    assert got.dtype == dtype and torch.equal(got, torch.sort(values, dim=1).values)
    # With a gradient to keep, it is torch.sort itself.
    grad = values.clone().requires_grad_(True)
    assert sorted_values(grad).grad_fn is not None


def test_sliced_ot_gradcheck():
    target = SlicedOTStyleLoss.target_stats([(rand(1, 3, 2, 3, seed=7), 1.0)])
    loss = SlicedOTStyleLoss.from_targets([target], projections=4)
    x = rand(1, 3, 2, 2, seed=8).requires_grad_(True)
    directions = loss.directions(3, x.device, x.dtype)
    assert torch.autograd.gradcheck(lambda f: sliced_ot(f.reshape(3, -1), target, directions), (x,))


# --------------------------------------------------------------------------------------------- W2

METHODS = ["eigh", "newton_schulz"]  # the CPU's default and the GPU's; both run here


def w2_reference(mu_x, cov_x, mu_s, cov_s):
    """The closed form with eigh in float64: |dmu|^2 + tr Sx + tr Ss - 2 tr sqrt(Ss^1/2 Sx Ss^1/2)."""

    def sqrtm(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root = sqrtm(cov_s)
    cross = np.trace(sqrtm(root @ cov_x @ root))
    return ((mu_x - mu_s) ** 2).sum() + np.trace(cov_x) + np.trace(cov_s) - 2 * cross


def spd(n, c, seed, decay=0.1):
    """``n`` full-rank covariances ``(n, c, c)`` with eigenvalues spread over about ``decay^2 / 14`` (float64)."""
    a = rand(n, c, 3 * c, seed=seed) * torch.logspace(0, np.log10(decay), c, dtype=torch.float64)[:, None]
    return a @ a.transpose(1, 2) / (3 * c)


def trace_sqrtm_reference(m, root):
    """``tr (root m root)^1/2`` and its gradient ``root (root m root)^-1/2 root / 2`` by float64 eigh."""
    values, vectors = torch.linalg.eigh(root @ m @ root)
    inverse_root = (vectors * values.rsqrt()[..., None, :]) @ vectors.transpose(1, 2)
    return values.sqrt().sum(-1), root @ inverse_root @ root / 2


@pytest.mark.parametrize("method", METHODS)
def test_trace_sqrtm_value_and_gradient_match_float64_eigh(method):
    m, root = spd(3, 24, seed=30), spd(3, 24, seed=31, decay=0.7)
    want, want_grad = trace_sqrtm_reference(m, root)
    x = m.float().requires_grad_(True)
    got = trace_sqrtm(x, root.float(), method)
    got.sum().backward()
    # float32 throughout, on matrices (root m root) of condition number about 1e4.
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert float((x.grad.double() - want_grad).norm() / want_grad.norm()) < 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_trace_sqrtm_gradcheck(method):
    m, root = spd(2, 5, seed=32, decay=0.3), spd(2, 5, seed=33, decay=0.5)
    # Symmetrised, because eigh reads one triangle: the derivative is taken along symmetric directions.
    f = lambda a: trace_sqrtm((a + a.transpose(1, 2)) / 2, root, method, iters=40)  # noqa: E731
    assert torch.autograd.gradcheck(f, (m.requires_grad_(True),))
    assert torch.autograd.gradcheck(lambda a: trace_sqrtm((a + a.transpose(1, 2)) / 2, None, method), (m,))


def test_the_two_methods_agree_in_float32_on_a_batch():
    m, root = spd(4, 48, seed=34), spd(4, 48, seed=35, decay=0.7)
    grads = []
    for method in METHODS:
        x = m.float().requires_grad_(True)
        value = trace_sqrtm(x, root.float(), method)
        value.sum().backward()
        grads.append((value, x.grad))
    (a, ga), (b, gb) = grads
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert float((ga - gb).norm() / gb.norm()) < 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_w2_loss_matches_closed_form(method):
    feats, style = rand(1, 5, 6, 7, seed=9) * 3 + 1, rand(1, 5, 8, 4, seed=10) * 2 - 1
    loss = GaussianW2StyleLoss.from_targets([GaussianW2StyleLoss.target_stats([(style, 1.0)])], method)
    got = loss(feats.float()).item()
    x, s = feats.reshape(5, -1).numpy(), style.reshape(5, -1).numpy()
    cov = lambda a: np.cov(a, bias=True)  # noqa: E731 (population covariance, as the loss uses)
    want = w2_reference(x.mean(1), cov(x), s.mean(1), cov(s)) / (np.trace(cov(s)) + (s.mean(1) ** 2).sum())
    assert got == pytest.approx(want, rel=1e-4)  # float32


@pytest.mark.parametrize("method", METHODS)
def test_w2_is_zero_for_the_style_itself(method):
    style = rand(1, 6, 8, 8, seed=11)
    loss = GaussianW2StyleLoss.from_targets([GaussianW2StyleLoss.target_stats([(style, 1.0)])], method)
    assert abs(loss(style.float()).item()) < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_w2_gradcheck_in_double(method):
    style = rand(1, 3, 4, 4, seed=14)
    target = GaussianW2StyleLoss.target_stats([(style, 1.0)])
    loss = GaussianW2StyleLoss.from_targets([target], method).double()
    x = (rand(1, 3, 3, 3, seed=15) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (x,))


@pytest.mark.parametrize("method", METHODS)
def test_square_roots_stay_finite_on_near_singular_covariances(method):
    # Rank 3 in 16 dimensions (fewer pixels than channels, as at relu5_1 of a small image), plus a 1e-9 ridge.
    a = rand(16, 3, seed=16)
    cov = a @ a.T + 1e-9 * torch.eye(16, dtype=torch.float64)
    root = sqrtm_eigh(cov)
    assert torch.isfinite(root).all()
    torch.testing.assert_close(root @ root, cov, rtol=0, atol=1e-8)
    want = torch.linalg.eigvalsh(cov).clamp_min(0).sqrt().sum()
    # Unguarded, the coupled iteration diverges in float32 some steps after converging; 100 steps must not.
    for iters in (30, 100):
        x = cov[None].float().requires_grad_(True)
        got = trace_sqrtm(x, None, method, iters=iters)
        got.sum().backward()
        assert torch.isfinite(got).all() and got.item() == pytest.approx(want.item(), rel=1e-2), iters
        assert torch.isfinite(x.grad).all()
    x = rand(1, 16, 2, 2, seed=17).float().requires_grad_(True)  # 4 pixels: a singular image covariance
    loss = GaussianW2StyleLoss.from_targets([(torch.zeros(16, dtype=torch.float64), cov)], method)
    loss(x).backward()
    assert torch.isfinite(x.grad).all()


def test_eigh_falls_back_to_the_iteration_when_lapack_fails():
    m = torch.full((1, 4, 4), float("nan"))
    assert torch.isnan(trace_sqrtm(m, None, "eigh")).all()  # NaN (the loop reports it), not a LAPACK error


def to_tf32(t):
    """Round float32 to TF32's 10-bit mantissa (to nearest, ties away from zero), as tensor cores read it."""
    return ((t.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


class EmulatedTF32(TorchDispatchMode):
    """Every float32 matmul rounds its operands to TF32 while ``torch.backends.cuda.matmul.allow_tf32`` is on.

    The flag is read at each call, as cuBLAS reads it when a kernel is launched, so code that switches TF32
    off around its matmuls gets float32 here as it would on a GPU.
    """

    aten = torch.ops.aten
    OPERANDS = {
        aten.mm.default: (0, 1),
        aten.bmm.default: (0, 1),
        aten.addmm.default: (1, 2),
        aten.baddbmm.default: (1, 2),
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPERANDS and torch.backends.cuda.matmul.allow_tf32:
            args = list(args)
            for i in self.OPERANDS[func]:
                if args[i].dtype == torch.float32:
                    args[i] = to_tf32(args[i])
        return func(*args, **(kwargs or {}))


def w2_error_floor(loss, feats):
    """|W2| / scale of the style against itself (exactly 0), without the loss's clamp at 0 that hides errors."""
    mean, cov = loss.stats(feats)
    cross = trace_sqrtm(cov, loss.cov_sqrt, loss.method)
    w2 = (mean - loss.mean).pow(2).sum(1) + cov.diagonal(dim1=1, dim2=2).sum(1) + loss.cov_trace - 2 * cross
    return float((w2.abs() / loss.scale).sum())


@pytest.fixture
def tf32_on():
    before = torch.backends.cuda.matmul.allow_tf32  # a property: monkeypatch cannot restore it
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("method", METHODS)
def test_w2_stays_float32_exact_under_emulated_tf32(method, tf32_on, monkeypatch):
    # Correlated, rectified features with a spread spectrum, like a VGG layer's.
    g = torch.Generator().manual_seed(40)
    mix = torch.randn(64, 64, generator=g) * torch.logspace(0, -2, 64)
    feats = (mix @ torch.randn(64, 32 * 32, generator=g)).relu().reshape(1, 64, 32, 32) * 10
    loss = GaussianW2StyleLoss.from_targets([GaussianW2StyleLoss.target_stats([(feats.double(), 1.0)])], method)
    torch.backends.cuda.matmul.allow_tf32 = False
    plain = w2_error_floor(loss, feats)  # float32's own floor: measured 5e-7 (eigh), 3e-7 (Newton-Schulz)
    torch.backends.cuda.matmul.allow_tf32 = True
    with EmulatedTF32():
        emulated = w2_error_floor(loss, feats)
        monkeypatch.setattr(w2, "full_float32", contextlib.nullcontext)  # the local switch removed
        unswitched = w2_error_floor(loss, feats)
    assert plain < 2e-6 and emulated <= 1.5 * plain
    assert unswitched > 20 * plain  # the emulation bites: measured 2e-5 (eigh), 5e-4 (Newton-Schulz)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_w2_under_tf32_and_a_cuda_graph(tf32_on):
    """On a GPU with TF32 on: the default method (Newton-Schulz) keeps float32's floor, and replays in a graph."""
    g = torch.Generator().manual_seed(41)
    mix = torch.randn(256, 256, generator=g) * torch.logspace(0, -2, 256)
    feats = (mix @ torch.randn(256, 24 * 24, generator=g)).relu().reshape(1, 256, 24, 24).cuda()
    loss = GaussianW2StyleLoss.from_targets([GaussianW2StyleLoss.target_stats([(feats.double(), 1.0)])]).cuda()
    assert w2_error_floor(loss, feats) < 2e-5  # float32 on the CPU: 2e-6; emulated TF32: 8e-4
    x = (feats * 1.1).requires_grad_(True)
    eager = loss(x)
    (eager_grad,) = torch.autograd.grad(eager, x)
    static = x.detach().clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as graph capture wants
        torch.autograd.grad(loss(static), static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        value = loss(static)
        (grad,) = torch.autograd.grad(value, static)
    graph.replay()
    torch.testing.assert_close(value, eager, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6 * float(eager_grad.abs().max()))


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
    from engine.style_losses import GramStyleLoss

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
