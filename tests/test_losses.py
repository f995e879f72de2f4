"""Losses against float64 references written independently (NumPy loops), plus gradcheck.

Tolerances: float32 results are compared with rtol 1e-5 (a few ulps of the
accumulated sums); float64 with rtol 1e-10.
"""

import numpy as np
import pytest
import torch

from engine.losses import ContentLoss, StyleTransferLoss, TotalVariationLoss, gram_matrix
from engine.style_losses import GramStyleLoss


def np_gram(f):
    """Gram matrix of one (C, H, W) array by explicit pixel loop: sum_p f[c,p] f[d,p] / P."""
    c, h, w = f.shape
    out = np.zeros((c, c))
    for i in range(h):
        for j in range(w):
            v = f[:, i, j]
            out += np.outer(v, v)
    return out / (h * w)


def np_relative_error(x, t):
    return float(((x - t) ** 2).sum() / (t**2).sum())


def np_tv(img):
    c, h, w = img.shape
    dy = sum((img[k, i + 1, j] - img[k, i, j]) ** 2 for k in range(c) for i in range(h - 1) for j in range(w))
    dx = sum((img[k, i, j + 1] - img[k, i, j]) ** 2 for k in range(c) for i in range(h) for j in range(w - 1))
    return dy / (c * (h - 1) * w) + dx / (c * h * (w - 1))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_gram_matches_loop_reference(rng, dtype, rtol):
    feats = rng.standard_normal((3, 4, 5, 7))
    got = gram_matrix(torch.tensor(feats, dtype=dtype))
    want = np.stack([np_gram(f) for f in feats])
    torch.testing.assert_close(got, torch.tensor(want, dtype=dtype), rtol=rtol, atol=rtol)
    assert got.shape == (3, 4, 4)


def test_gram_is_size_invariant_for_tiled_images(rng):
    # A picture tiled 2x2 has the same per-pixel statistics, hence the same Gram.
    f = torch.tensor(rng.standard_normal((1, 3, 4, 4)))
    tiled = f.repeat(1, 1, 2, 2)
    torch.testing.assert_close(gram_matrix(tiled), gram_matrix(f), rtol=1e-12, atol=1e-12)


def test_content_loss_matches_reference(rng):
    x, t = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((1, 3, 4, 5))
    loss = ContentLoss(torch.tensor(t))(torch.tensor(x))
    want = np.sum([np_relative_error(xi, t[0]) for xi in x])  # a batch holds independent jobs: losses add
    assert loss.item() == pytest.approx(want, rel=1e-10)


def test_content_loss_zero_at_target(rng):
    t = torch.tensor(rng.standard_normal((1, 3, 4, 5)))
    assert ContentLoss(t)(t.clone()).item() == 0.0


def test_gram_style_loss_matches_reference(rng):
    x, s = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((3, 6, 2))
    target = torch.tensor(np_gram(s))[None]
    loss = GramStyleLoss(target)(torch.tensor(x))
    want = np.sum([np_relative_error(np_gram(xi), np_gram(s)) for xi in x])
    assert loss.item() == pytest.approx(want, rel=1e-10)


def test_gram_style_loss_per_image_targets(rng):
    # A target per batch element: each image is compared with its own Gram.
    x = torch.tensor(rng.standard_normal((2, 3, 4, 4)))
    loss = GramStyleLoss(gram_matrix(x))(x)
    assert loss.item() == pytest.approx(0.0, abs=1e-20)
    swapped = GramStyleLoss(gram_matrix(x.flip(0)))(x)
    assert swapped.item() > 1e-3


def test_style_loss_is_scale_invariant(rng):
    # Relative errors: scaling features and target together changes nothing.
    x, s = torch.tensor(rng.standard_normal((1, 3, 4, 5))), torch.tensor(rng.standard_normal((1, 3, 6, 2)))
    a = GramStyleLoss(gram_matrix(s))(x)
    b = GramStyleLoss(gram_matrix(s * 100))(x * 100)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


@pytest.mark.parametrize("shape", [(1, 3, 5, 6), (2, 3, 4, 4)])
def test_tv_matches_reference(rng, shape):
    img = rng.random(shape)
    got = TotalVariationLoss()(torch.tensor(img)).item()
    # Per-image means, added over the batch.
    want = np.sum([np_tv(i) for i in img])
    assert got == pytest.approx(want, rel=1e-10)


def test_tv_zero_for_constant_image():
    assert TotalVariationLoss()(torch.full((1, 3, 4, 4), 0.3)).item() == 0.0


def _double(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)


def test_gradcheck_gram_and_style_loss():
    x = _double((1, 2, 3, 3), 0)
    target = gram_matrix(_double((1, 2, 2, 3), 1).detach())
    assert torch.autograd.gradcheck(gram_matrix, (x,))
    assert torch.autograd.gradcheck(GramStyleLoss(target), (x,))


def test_gradcheck_content_and_tv():
    x = _double((1, 2, 3, 4), 2)
    target = _double((1, 2, 3, 4), 3).detach()
    assert torch.autograd.gradcheck(ContentLoss(target), (x,))
    assert torch.autograd.gradcheck(TotalVariationLoss(), (x,))


def test_combined_loss_weights_and_parts(rng):
    feats = {"a": torch.tensor(rng.standard_normal((1, 2, 3, 3))), "b": torch.tensor(rng.standard_normal((1, 2, 3, 3)))}
    image = torch.tensor(rng.random((1, 3, 6, 6)))
    content = {"a": ContentLoss(feats["a"] * 0.5)}
    style = {"a": GramStyleLoss(gram_matrix(feats["b"])), "b": GramStyleLoss(gram_matrix(feats["a"]))}
    crit = StyleTransferLoss(
        content,
        style,
        content_layer_weights=[1.0],
        style_layer_weights=[3.0, 1.0],
        content_weight=2.0,
        style_weight=5.0,
        tv_weight=7.0,
    )
    total, parts = crit(feats, image)
    want_style = 0.75 * style["a"](feats["a"]) + 0.25 * style["b"](feats["b"])
    torch.testing.assert_close(parts["style"], want_style, rtol=1e-12, atol=0)
    torch.testing.assert_close(parts["content"], content["a"](feats["a"]), rtol=1e-12, atol=0)
    torch.testing.assert_close(total, 2 * parts["content"] + 5 * parts["style"] + 7 * parts["tv"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gram_of_half_features_is_float32_and_finite(dtype):
    # Caffe-VGG-like magnitudes: relu1_1 reaches ~1e3. In fp16 the sum over 64x64 pixels of squares
    # (~4e9) overflows 65504; the Gram must come out finite and equal to a float64 reference.
    g = torch.Generator().manual_seed(0)
    feats = (torch.rand(2, 8, 64, 64, generator=g) * 1500).to(dtype)
    got = gram_matrix(feats)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    want = gram_matrix(feats.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    naive = torch.einsum("ncp,ndp->ncd", feats.reshape(2, 8, -1), feats.reshape(2, 8, -1))
    if dtype == torch.float16:
        assert not torch.isfinite(naive).all()  # what the float32 cast prevents


def test_losses_of_half_features_are_float32(rng):
    t = torch.tensor(rng.standard_normal((1, 4, 5, 5)), dtype=torch.float32)
    x = (t + 0.1).to(torch.bfloat16)
    for loss in (ContentLoss(t.to(torch.bfloat16)), GramStyleLoss(gram_matrix(t))):
        out = loss(x)
        assert out.dtype == torch.float32 and torch.isfinite(out)
