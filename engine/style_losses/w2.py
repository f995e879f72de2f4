"""The Gaussian Wasserstein-2 style loss (``--style-loss w2``).

Fit a Gaussian (mean, covariance) to the image's feature vectors and to the style's and take the
closed-form 2-Wasserstein distance between them:
``|mu_x - mu_s|^2 + tr S_x + tr S_s - 2 tr (S_s^1/2 S_x S_s^1/2)^1/2``.
``S_s^1/2`` is computed once, in float64 by eigendecomposition. The trace of the square root on the
image side, which needs gradients, is a custom autograd function (``trace_sqrtm``): ``eigh`` on the CPU,
a Newton-Schulz iteration elsewhere, and the closed-form gradient ``X^-1/2 / 2``, all in IEEE float32
whatever the run's precision. Made relative (divided by the target's own size) like the other losses,
and summed over the batch; tiles sum its moments exactly.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from ..linalg import sym_power
from ..losses import EPS, FeaturesOrMoments, Moments, at_least_float32, full_float32
from .base import PerJob, StyleLoss, TileTerm, register

NEWTON_SCHULZ_ITERS = 20  # trace within 1.1e-3 of eigh on the samples at relu1_1-relu5_1 (2e-6 to 1.1e-3)
SQRTM_METHODS = ("eigh", "newton_schulz")
# eigh's eigenvalues below this fraction of the largest are treated as noise (float32's eigh resolves
# about 1e-7 of it); one fraction for float32 and float64, so both compute the same function.
EIGH_FLOOR = 1e-6


def _pixels(features: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, H*W)`` in at least float32."""
    n, c, h, w = features.shape
    return at_least_float32(features.reshape(n, c, h * w))


@register
class GaussianW2StyleLoss(StyleLoss):
    """Closed-form 2-Wasserstein distance between Gaussian fits of the image's and the style's features.

    ``method`` picks how ``tr (S_s^1/2 S_x S_s^1/2)^1/2`` is computed (see
    ``trace_sqrtm``); None chooses by the device.
    """

    name = "w2"
    help = "closed-form Wasserstein-2 distance between Gaussian fits of the features (mean and covariance)"

    def __init__(
        self,
        *,
        mean: torch.Tensor,
        cov_sqrt: torch.Tensor,
        cov_trace: torch.Tensor,
        scale: torch.Tensor,
        method: Optional[str] = None,
    ):
        super().__init__()
        self.register_buffer("mean", mean)  # (N, C)
        self.register_buffer("cov_sqrt", cov_sqrt)  # (N, C, C)
        self.register_buffer("cov_trace", cov_trace)  # (N,)
        self.register_buffer("scale", scale)  # (N,): tr S_s + |mu_s|^2, the target's size
        self.method = method

    @staticmethod
    def target_stats(features: Sequence[tuple[FeaturesOrMoments, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(C,)`` and covariance ``(C, C)`` of the weighted mixture of the styles' pixels (float64).

        Each style is given as its feature map or as its ``Moments``.
        """
        total_w = sum(w for _, w in features)
        mean = second = 0
        for f, w in features:
            m = f if isinstance(f, Moments) else Moments.of(f.double())
            mean = mean + (w / total_w) * m.mean[0]
            second = second + (w / total_w) * m.second_moment[0]
        return mean, second - torch.outer(mean, mean)

    @classmethod
    def build(cls, *, config, layer: str, per_job: PerJob, masks: Optional[torch.Tensor] = None) -> StyleLoss:
        return cls.from_targets([cls.target_stats(job) for job in per_job])

    def tiled(self, map_size: tuple[int, int]) -> TileTerm:
        return _W2Term(self, map_size)

    @classmethod
    def from_targets(cls, per_job: Sequence[tuple[torch.Tensor, torch.Tensor]], method: Optional[str] = None):
        means, roots, traces, scales = [], [], [], []
        for mean, cov in per_job:
            roots.append(sqrtm_eigh(cov))
            means.append(mean)
            traces.append(torch.trace(cov))
            scales.append(torch.trace(cov) + mean.pow(2).sum())
        stack = lambda ts: torch.stack(ts).float()  # noqa: E731
        return cls(
            mean=stack(means), cov_sqrt=stack(roots), cov_trace=stack(traces), scale=stack(scales), method=method
        )

    def stats(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(N, C)`` and covariance ``(N, C, C)`` of the image's feature vectors."""
        x = _pixels(features)  # (N, C, P)
        mean = x.mean(dim=2)
        centred = x - mean[..., None]
        with full_float32():  # the distance cancels to 0 at the style itself: see full_float32
            cov = centred @ centred.transpose(1, 2) / x.shape[2]
        return mean, cov

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.loss_from_stats(*self.stats(features))

    def loss_from_stats(self, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        cross = trace_sqrtm(cov, self.cov_sqrt, self.method)  # tr (S_s^1/2 S_x S_s^1/2)^1/2
        w2 = (mean - self.mean).pow(2).sum(1) + _trace(cov) + self.cov_trace - 2 * cross
        return (w2.clamp_min(0) / self.scale.clamp_min(EPS)).sum()


def _trace(m: torch.Tensor) -> torch.Tensor:
    return m.diagonal(dim1=-2, dim2=-1).sum(-1)


def sqrtm_eigh(cov: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a covariance, in float64 (no gradient needed: targets only)."""
    return sym_power(cov.double(), 0.5)


def default_sqrtm_method(device: torch.device) -> str:
    """``eigh`` on the CPU, ``newton_schulz`` elsewhere (why: see ``trace_sqrtm``)."""
    return "eigh" if device.type == "cpu" else "newton_schulz"


def trace_sqrtm(
    m: torch.Tensor,
    root: Optional[torch.Tensor] = None,
    method: Optional[str] = None,
    iters: int = NEWTON_SCHULZ_ITERS,
) -> torch.Tensor:
    """``tr (root m root)^1/2`` (``tr m^1/2`` without ``root``) for a batch of PSD matrices ``(N, C, C)``.

    Differentiable in ``m`` (``root`` is a constant: the style's). The
    gradient is the closed form ``d tr X^1/2 = tr(X^-1/2 dX) / 2``, so the
    backward pass costs one or two matmuls instead of replaying the forward
    computation. Two ways to get ``X^1/2`` and ``X^-1/2``:

    * ``eigh``: one eigendecomposition. Exact to float32 rounding; on a CPU it
      is several times cheaper than the iteration (LAPACK's divide and conquer
      against 60 matmuls for a 512-channel layer). On CUDA, ``eigh`` waits for
      the host (it cannot be captured in a CUDA graph) and is slow for
      batches, so it is the CPU's default only.
    * ``newton_schulz``: a coupled Newton-Schulz iteration, matmuls only, no
      host sync, capturable; the iteration gives ``X^-1/2`` for free beside
      ``X^1/2``. The default off the CPU.

    Both run in IEEE float32 (or the input's float64) whatever the run's
    precision; see ``full_float32``.
    """
    method = method or default_sqrtm_method(m.device)
    if method not in SQRTM_METHODS:
        raise ValueError(f"trace_sqrtm method {method!r} is not one of {SQRTM_METHODS}")
    return _TraceSqrtm.apply(m, root, method, iters)


class _TraceSqrtm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m, root, method, iters):
        with full_float32():
            cross = m if root is None else root @ m @ root
            if method == "eigh":
                try:
                    trace, factors = _sqrt_eigh(cross)
                except torch.linalg.LinAlgError:  # LAPACK did not converge (NaN input, say): the iteration's answer
                    method = "newton_schulz"
            if method == "newton_schulz":
                trace, factors = _sqrt_newton_schulz(cross, iters)
        ctx.method = method
        ctx.save_for_backward(root, *factors)
        return trace

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        root, *factors = ctx.saved_tensors
        with full_float32():
            # The gradient of tr X^1/2 with respect to X, then through X = root m root.
            if ctx.method == "eigh":
                vectors, slopes = factors
                d = (vectors * slopes[..., None, :]) @ vectors.transpose(-2, -1)
            else:
                d = factors[0].transpose(-2, -1) / 2  # X^-1/2 / 2 (transposed: right for any square X)
            d = grad[:, None, None] * d
            if root is not None:
                d = root.transpose(-2, -1) @ d @ root.transpose(-2, -1)
        return d, None, None, None


def _sqrt_eigh(x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``tr x^1/2`` by ``eigh``, and what the backward needs: the eigenvectors and ``d sqrt(l) / dl``.

    An eigenvalue below ``floor`` (``EIGH_FLOOR * l_max``) is noise, and
    ``sqrt`` there would give an unbounded slope (a
    rank-deficient covariance, at a deep layer of a small image, has hundreds
    of them). Below ``floor`` the square root is replaced by the quadratic
    ``s(l) = sqrt(f) (l / f) (3/2 - l / 2f)``, which meets it at ``f`` with the
    same value and slope and is 0 at 0: the trace stays continuous and
    differentiable, and its slope is at most ``1.5 / sqrt(f)``.
    """
    with _lapack_threads(x.device):
        values, vectors = torch.linalg.eigh(x)
    values = values.clamp_min(0)
    top = values[..., -1:].clamp_min(torch.finfo(x.dtype).tiny)
    floor = EIGH_FLOOR * top
    below = values < floor
    ratio = values / floor
    roots = torch.where(below, floor.sqrt() * ratio * (1.5 - 0.5 * ratio), values.clamp_min(floor).sqrt())
    slopes = torch.where(below, (1.5 - ratio) / floor.sqrt(), 0.5 / values.clamp_min(floor).sqrt())
    return roots.sum(-1), (vectors, slopes)


@contextlib.contextmanager
def _lapack_threads(device: torch.device) -> Iterator[None]:
    """One CPU thread for ``eigh``: LAPACK's reduction of a matrix of at most 512 rows gains little from more,
    and on a busy machine each of its hundreds of parallel sections waits for a descheduled thread (512
    channels, 2 threads on 2 shared cores: 1.2-7 s against 0.16 s on one thread)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sqrt_newton_schulz(x: torch.Tensor, iters: int) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
    """``tr x^1/2`` by coupled Newton-Schulz iteration, and ``x^-1/2`` for the backward.

    The matrix is scaled by its Frobenius norm so every eigenvalue lies in
    (0, 1], where the iteration converges: ``Y -> x^1/2`` and ``Z -> x^-1/2``
    (both scaled back). Eigenvalues near zero converge slowest; their square
    roots are small, so the error they leave in the trace is small too, and
    ``Z`` stays bounded there (its eigenvalues grow at most 1.5x a step), which
    bounds the gradient as ``_sqrt_eigh``'s floor does.
    """
    n, c, _ = x.shape
    norm = x.flatten(1).norm(dim=1).clamp_min(EPS)[:, None, None]
    eye = torch.eye(c, device=x.device, dtype=x.dtype).expand(n, c, c)
    y, z = x / norm, eye
    best = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
    for _ in range(iters):
        zy = z @ y
        # Once converged, the coupled iteration amplifies rounding and diverges (in float32 after ~25
        # steps on VGG covariances). Its residual |I - ZY| falls monotonically until then, so each matrix
        # stops updating as soon as its residual stops falling: no host sync, so CUDA graphs can capture it.
        residual = (eye - zy).flatten(1).norm(dim=1)
        improving = (residual < best)[:, None, None]
        best = torch.minimum(best, residual)
        t = 0.5 * (3 * eye - zy)
        y, z = torch.where(improving, y @ t, y), torch.where(improving, t @ z, z)
    scale = norm.sqrt()
    return _trace(y) * scale[:, 0, 0], (z / scale,)


class _W2Term(TileTerm):
    def __init__(self, loss: GaussianW2StyleLoss, map_size):
        super().__init__(loss, map_size)
        self.moments: Optional[Moments] = None
        self.mean: Optional[torch.Tensor] = None

    def accumulate(self, features, tile, factor) -> None:
        part = Moments.of(features)
        self.moments = part if self.moments is None else self.moments + part

    def whole(self):
        self.mean = self.moments.mean.to(self.dtype)
        return self.mean, self.moments.covariance

    def empty(self) -> bool:
        return self.moments is None

    def shapes(self, batch: int):
        channels = self.loss.mean.shape[-1]
        return [(batch, channels), (batch, channels, channels)]

    def to_sums(self):
        # Centred moments do not add; the raw sums of f and f f^T do (float64 keeps the cancellation harmless:
        # it costs about |mean|^2 / variance of the 16 digits, where float32 features carry 7).
        m = self.moments
        total = m.mean * m.count
        return [total, m.scatter + torch.einsum("nc,nd->ncd", total, m.mean)]

    def from_sums(self, sums) -> None:
        total, raw = sums
        mean = total / self.pixels  # every feature of the layer is some process's: the count is the map's
        self.moments = Moments(self.pixels, mean, raw - torch.einsum("nc,nd->ncd", total, mean))

    def surrogate(self, features, tile, factor) -> torch.Tensor:
        # mean = sum f / P and cov = sum (f - mean)(f - mean)^T / P; the mean's own effect on cov is zero
        # at the whole image's mean (the centred features sum to zero), so the mean is held fixed here.
        grad_mean, grad_cov = self.grads
        flat = at_least_float32(features).flatten(2)
        centred = flat - self.mean[..., None]
        scatter = torch.einsum("ncp,ndp->ncd", centred, centred)
        return ((grad_mean * flat.sum(2)).sum() + (grad_cov * scatter).sum()) / self.pixels
