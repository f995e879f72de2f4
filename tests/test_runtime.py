"""The speed levers against the plain path: precision, channels-last, batched jobs, CUDA graphs, the NaN guard.

On the CPU every lever that exists there is run for real (channels-last, batches, the guard, the
autocast step at tiny size); the CUDA-only ones are checked in ``@pytest.mark.cuda`` tests, which
run the same ``StepFunction`` and losses.
Tolerances: float32 paths that differ only in summation order agree to 1e-4 in pixels after a few
Adam steps (lr 0.02, so one step moves a pixel at most 0.02); other kernels (channels-last) to a
tenth of a step at worst and 2e-6 on average; reduced-precision
paths are compared by loss trajectory (relative 5e-2 for bf16 on the CPU over 3 steps, and the
CUDA bounds stated at each test).
"""

import pytest
import torch

from engine import Callback, Config, UserError, stylize
from engine.api import loop_extractor, stylize_batch
from engine.criterion import build_criterion
from engine.optimize import (
    GRAPH_WARMUP,
    GraphedStep,
    LossScale,
    NonFiniteLoss,
    Objective,
    Reporting,
    ScaleProblem,
    StepFunction,
    make_step,
    optimize_scale,
)
from engine.runtime import Runtime, resolve_runtime

SMALL = dict(content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1", "relu3_1"))
CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def picture(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- decisions


def test_auto_on_cpu_is_fp32_channels_last_without_graphs(monkeypatch):
    import engine.runtime

    monkeypatch.setattr(engine.runtime, "cpu_has_amx", lambda: False)
    rt = resolve_runtime(Config(device="cpu"))
    assert (rt.precision, rt.channels_last, rt.cuda_graphs, rt.autocast_dtype) == ("fp32", True, False, None)
    assert not resolve_runtime(Config(device="cpu", memory_format="contiguous")).channels_last
    assert not resolve_runtime(Config(device="cpu", optimizer="lbfgs")).channels_last
    with pytest.raises(UserError, match="'channels_last' works with the adam optimizer only"):
        resolve_runtime(Config(device="cpu", optimizer="lbfgs", memory_format="channels_last"))


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(precision="tf32"), "precision 'tf32' needs a CUDA GPU"),
        (dict(cuda_graphs="on"), "cuda_graphs 'on' needs a CUDA GPU"),
    ],
)
def test_cuda_only_settings_are_refused_on_cpu(settings, message):
    with pytest.raises(UserError, match=message):
        resolve_runtime(Config(device="cpu", **settings))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_refused_on_cpu_without_native_support(monkeypatch, precision):
    import engine.runtime

    monkeypatch.setattr(engine.runtime, "cpu_supports", lambda p: False)
    with pytest.raises(UserError, match=rf"precision '{precision}' is emulated on this CPU .* use fp32"):
        resolve_runtime(Config(device="cpu", precision=precision))
    # And through the CLI's path: the same one sentence, before any image is read.
    with pytest.raises(UserError, match="emulated"):
        stylize("no-such-file.png", "no-such-style.png", Config(device="cpu", precision=precision))


def test_auto_is_bf16_with_adam_on_a_cpu_with_amx_and_fp32_otherwise(monkeypatch):
    import engine.runtime

    monkeypatch.setattr(engine.runtime, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(engine.runtime, "cpu_supports", lambda p: True)
    rt = resolve_runtime(Config(device="cpu"))
    assert (rt.precision, rt.autocast_dtype, rt.channels_last) == ("bf16", torch.bfloat16, True)
    assert resolve_runtime(Config(device="cpu", optimizer="lbfgs")).precision == "fp32"  # measured with adam only
    assert resolve_runtime(Config(device="cpu", precision="fp32")).precision == "fp32"  # asked for, kept
    monkeypatch.setattr(engine.runtime, "cpu_supports", lambda p: False)  # AMX said yes, oneDNN no: stay fp32
    assert resolve_runtime(Config(device="cpu")).precision == "fp32"
    monkeypatch.setattr(engine.runtime, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(engine.runtime, "cpu_supports", lambda p: True)
    assert resolve_runtime(Config(device="cpu")).precision == "fp32"


def test_the_amx_answer_is_torchs():
    from engine.runtime import cpu_has_amx

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    assert cpu_has_amx() == bool(probe is not None and probe())


def test_this_cpu_answer_matches_mkldnn():
    from engine.runtime import cpu_supports

    assert cpu_supports("bf16") == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert cpu_supports("fp32")


# --------------------------------------------------------------------------------------------- levers on CPU


@pytest.fixture(scope="module")
def pair():
    return picture(40, 48, 1), picture(36, 36, 2)


@pytest.mark.slow
def test_channels_last_matches_contiguous(pair):
    runs = {}
    for fmt in ("contiguous", "channels_last"):
        runs[fmt] = stylize(*pair, Config(**SMALL, device="cpu", size=48, min_size=34, steps=5, memory_format=fmt))
    # Other conv kernels, other rounding; Adam divides each pixel's step by its own gradient scale, so
    # where a gradient is near zero a rounding difference can show. Bound: a tenth of one step (lr 0.02),
    # and a mean difference a thousand times smaller.
    diff = (runs["channels_last"].image - runs["contiguous"].image).abs()
    assert diff.max() < 2e-3 and diff.mean() < 2e-6, (diff.max(), diff.mean())
    assert runs["contiguous"].image.is_contiguous()


@pytest.mark.slow
@pytest.mark.parametrize("init", ["content", "noise"])
@pytest.mark.parametrize("loss", ["gram", "ot"])
def test_batched_jobs_equal_jobs_one_by_one(init, loss):
    contents = [picture(40, 48, 3), picture(40, 48, 4), picture(48, 40, 5), picture(40, 48, 6)]
    styles = [picture(32, 32, 7), [picture(30, 40, 8), picture(32, 32, 7)], picture(32, 32, 7), picture(36, 30, 9)]
    # fp32: in bf16 a batch's convolutions round otherwise than one image's (the CPU's auto is bf16 with AMX).
    config = Config(
        **SMALL, device="cpu", size=48, min_size=34, steps=4, init=init, batch_size=2, precision="fp32", style_loss=loss
    )
    jobs = list(zip(contents, styles))
    seen = []
    batched = stylize_batch(jobs, config, callback=lambda info: seen.append(info.jobs))
    # Three landscape jobs (0, 1, 3) in batches of two, the portrait one (2) alone.
    assert sorted(set(seen)) == [(0, 1), (2,), (3,)]
    for (content, style), got in zip(jobs, batched):
        alone = stylize(content, style, config)
        assert got.image.shape == alone.image.shape
        # A batch's convolutions round otherwise than one image's (1e-6 here); ot's sorts turn that into a
        # reordering of nearly equal projections, whose effect (3.5e-4 measured) a smooth loss does not have.
        torch.testing.assert_close(got.image, alone.image, rtol=0, atol=1e-4 if loss == "gram" else 1e-3)


def test_batched_lbfgs_runs_one_job_at_a_time():
    seen = []
    jobs = [(picture(32, 32, 1), picture(32, 32, 2)), (picture(32, 32, 3), picture(32, 32, 2))]
    config = Config(**SMALL, device="cpu", size=32, min_size=32, steps=1, optimizer="lbfgs", batch_size=4)
    stylize_batch(jobs, config, callback=lambda info: seen.append(info.jobs))
    assert seen == [(0,), (1,)]


@pytest.mark.slow
def test_autocast_step_on_cpu_tracks_fp32():
    """The bf16 step (the CUDA fast path's maths) run on the CPU at 32 px: image and losses stay float32."""
    config = Config(**SMALL, device="cpu", style_loss="gram")
    content = picture(32, 32, 1)[None]
    style = picture(32, 32, 2)
    losses = {}
    for precision in ("fp32", "bf16"):
        # Built directly: resolve_runtime refuses bf16 on this CPU for speed, not for correctness.
        rt = Runtime(device=torch.device("cpu"), precision=precision, channels_last=False, cuda_graphs=False)
        extractor = loop_extractor(config, rt)
        criterion = build_criterion(config, extractor, content, [([style], (1.0,))], min_side=8, runtime=rt)
        image = content.clone().requires_grad_(True)
        step = make_step(image, Objective(extractor, criterion, rt.autocast), "adam", 0.02, rt)
        assert isinstance(step, StepFunction)
        losses[precision] = [step()[0] for _ in range(3)]
        assert image.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in step.optimizer.state[image].values() if v.dim())
    fp32, bf16 = torch.stack(losses["fp32"]), torch.stack(losses["bf16"])
    assert torch.isfinite(bf16).all() and not torch.equal(fp32, bf16)  # it did run in another precision
    torch.testing.assert_close(bf16, fp32, rtol=5e-2, atol=0)


# --------------------------------------------------------------------------------------------- fp16 loss scaling


class _HalfRound(torch.autograd.Function):
    """What CUDA's fp16 autocast stores in float16: a value on the way forward, its gradient on the way back."""

    @staticmethod
    def forward(ctx, x):
        return x.half().float()

    @staticmethod
    def backward(ctx, grad):
        return grad.half().float()


def _emulate_fp16(extractor, switch):
    """Round the input of the first convolution and every layer's output (and their gradients) to float16
    while ``switch["on"]``: fp16 autocast's storage, whose flush of tiny gradients is what loss scaling is for.
    (CPU autocast in fp16 is emulated and about 150 times slower; this costs only the rounding.)"""
    for module in (extractor.normalize, *extractor.body):
        module.register_forward_hook(lambda mod, args, out: _HalfRound.apply(out) if switch["on"] else out)


@pytest.mark.slow
def test_emulated_fp16_tracks_fp32_only_with_loss_scaling():
    # 192x256, as the CUDA test: the relative losses' feature gradients (~1e-8 here) are mostly below
    # float16's smallest subnormal, so unscaled they flush to zero and the image follows TV alone.
    config = Config(device="cpu", content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1"), style_loss="gram")
    content, style = picture(192, 256, 1)[None], picture(256, 256, 2)
    rt = Runtime(device=torch.device("cpu"), precision="fp32", channels_last=False, cuda_graphs=False)
    extractor, switch = loop_extractor(config, rt), {"on": False}
    _emulate_fp16(extractor, switch)
    tracks = {}
    for mode in ("fp32", "fp16", "fp16 scaled"):
        switch["on"] = mode != "fp32"
        # targets in fp16 too
        criterion = build_criterion(config, extractor, content, [([style], (1.0,))], min_side=8, runtime=rt)
        image = content.clone().requires_grad_(True)
        scale = LossScale(image.device) if mode == "fp16 scaled" else None
        step = StepFunction(image, Objective(extractor, criterion), optimizer="adam", lr=config.lr, loss_scale=scale)
        tracks[mode] = torch.stack([step()[0] for _ in range(6)])
    fp32 = tracks["fp32"]
    assert fp32[-1] < 0.75 * fp32[0]  # it descends
    assert tracks["fp16"][-1] > 1.2 * fp32[-1]  # unscaled, the emulated fp16 run falls behind (before the fix)
    torch.testing.assert_close(tracks["fp16 scaled"], fp32, rtol=1e-2, atol=0)  # scaled, it tracks fp32


def test_fp16_alone_gets_a_loss_scale():
    image = torch.rand(1, 3, 4, 4, requires_grad=True)
    for precision in ("fp32", "bf16", "fp16"):
        rt = Runtime(device=torch.device("cpu"), precision=precision, channels_last=False, cuda_graphs=False)
        step = make_step(image, Objective(lambda x: {"x": x}, _Poisoned(99)), "adam", 0.1, rt)
        assert (step.loss_scale is not None) == (precision == "fp16")
        assert step.optimizer.param_groups[0]["fused"] == (True if precision == "fp16" else None)


def _scaled_step(scale_value, settled, optimizer="adam"):
    """A step on a loss whose gradient, 2**30 per pixel, overflows float32 once scaled by 2**98 or more."""
    image = torch.full((1, 3, 4, 4), 0.5, requires_grad=True)
    scale = LossScale(image.device)
    scale.scale.fill_(scale_value)
    scale.settled = settled
    objective = Objective(lambda x: {"x": x}, lambda features, image: ((features["x"] * 2.0**30).sum(), {}))
    step = StepFunction(image, objective, optimizer=optimizer, lr=0.01, loss_scale=scale)
    return step, image, scale


def test_an_overflowed_step_is_skipped_on_the_device_and_the_scale_halved():
    # settled: what a CUDA graph replays, with no host read: fused Adam skips the update and its count.
    step, image, scale = _scaled_step(2.0**100, settled=True)
    step()
    assert torch.equal(image.detach(), torch.full_like(image, 0.5))
    assert float(step.optimizer.state[image]["step"]) == 0 and float(scale.scale) == 2.0**99
    step(), step()  # overflow at 2**99 and 2**98 too
    assert float(scale.scale) == 2.0**97 and float(step.optimizer.state[image]["step"]) == 0
    assert torch.equal(image.detach(), torch.full_like(image, 0.5))
    step()
    assert float(step.optimizer.state[image]["step"]) == 1
    torch.testing.assert_close(image.detach(), torch.full_like(image, 0.49))  # the true gradient's step: lr down
    # Growth: after GROWTH_INTERVAL clean steps (one just now) the scale doubles.
    for _ in range(LossScale.GROWTH_INTERVAL - 1):
        step()
    assert float(scale.scale) == 2.0**98


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_the_first_overflow_is_redone_not_skipped(optimizer):
    step, image, scale = _scaled_step(2.0**103, settled=False, optimizer=optimizer)
    step()
    assert float(scale.scale) == 2.0**97 and scale.settled  # halved until the gradient fitted, then moved
    assert not torch.equal(image.detach(), torch.full_like(image, 0.5))
    if optimizer == "adam":
        assert float(step.optimizer.state[image]["step"]) == 1
        torch.testing.assert_close(image.detach(), torch.full_like(image, 0.49))


# --------------------------------------------------------------------------------------------- reporting


def _quadratic(features, image):
    loss = (features["x"] - 0.3).pow(2).mean()
    return loss, {"content": loss}


def _report(sync_every, sync_seconds=0.0, report_due=lambda i: False, steps=10):
    """Every ``on_step`` call of a 10-step run with an average: ``{step: image or None}`` (images read there)."""
    seen = {}
    optimize_scale(
        ScaleProblem(
            image=torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
            objective=Objective(lambda x: {"x": x}, _quadratic),
            steps=steps,
            optimizer="adam",
            lr=0.05,
            ema_decay=0.9,
            reporting=Reporting(
                on_step=lambda i, loss, parts, image: seen.__setitem__(i, image and image().clone()),
                every=sync_every,
                seconds=sync_seconds,
                due=report_due,
            ),
        )
    )
    return seen


def test_grouped_reports_hear_every_step_and_build_the_image_only_at_reads():
    live = _report(sync_every=1)
    assert list(live) == list(range(1, 11)) and all(image is not None for image in live.values())
    grouped = _report(sync_every=4, report_due=lambda i: i == 6)
    assert list(grouped) == list(range(1, 11))  # every step, in order
    # Read at 4 (four waiting), 6 (due: a snapshot), 10 (four waiting, and the end): images there only.
    assert [i for i, image in grouped.items() if image is not None] == [4, 6, 10]
    for i in (4, 6, 10):
        torch.testing.assert_close(grouped[i], live[i], rtol=0, atol=0)  # the average at that very step
    # By time: a step slower than sync_seconds is reported at once, whatever sync_every says.
    assert all(image is not None for image in _report(sync_every=16, sync_seconds=1e-9).values())


def test_the_image_of_a_report_is_gone_once_the_run_moves_on():
    kept = []
    optimize_scale(
        ScaleProblem(
            image=torch.rand(1, 3, 8, 8),
            objective=Objective(lambda x: {"x": x}, _quadratic),
            steps=3,
            optimizer="adam",
            lr=0.05,
            ema_decay=0.9,
            reporting=Reporting(on_step=lambda i, loss, parts, image: kept.append(image)),
        )
    )
    assert all(image() is None for image in kept)  # not read in time: never built, and not built late
    live = []
    optimize_scale(
        ScaleProblem(
            image=torch.rand(1, 3, 8, 8),
            objective=Objective(lambda x: {"x": x}, _quadratic),
            steps=3,
            optimizer="adam",
            lr=0.05,
            reporting=Reporting(on_step=lambda i, loss, parts, image: live.append(image())),
        )
    )
    assert not any(image.requires_grad for image in live)  # without an average: the live image, detached


def test_stylize_with_a_grouped_callback_matches_a_live_one():
    config = Config(device="cpu", size=32, min_size=32, steps=6, content_layers=("relu1_1",), style_layers=("relu1_1",))
    pair = picture(32, 32, 1), picture(32, 32, 2)
    live, grouped = {}, {}
    stylize(*pair, config, callback=lambda info: live.__setitem__(info.total_step, (info.loss, info.image.clone())))
    callback = Callback(
        lambda info: grouped.__setitem__(info.total_step, (info.loss, info.image)),
        every=4,
        seconds=1e9,
        image_due=lambda step: step == 3,
    )
    stylize(*pair, config, callback=callback)
    assert [loss for loss, _ in grouped.values()] == [loss for loss, _ in live.values()]
    assert [step for step, (_, image) in grouped.items() if image is not None] == [3, 6]
    torch.testing.assert_close(grouped[3][1], live[3][1], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- NaN guard


class _Poisoned:
    """A criterion whose loss turns NaN from step ``at`` on."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, features, image):
        self.calls += 1
        loss = (features["x"] - 0.5).pow(2).mean()
        if self.calls >= self.at:
            loss = loss * float("nan")
        return loss, {"content": loss}


@pytest.mark.parametrize("sync_every", [1, 16])
def test_nan_guard_stops_with_the_step_number(sync_every):
    image = torch.rand(1, 3, 8, 8)
    seen = []
    with pytest.raises(NonFiniteLoss, match="the loss became NaN at step 3 of this scale, so the run stopped"):
        optimize_scale(
            ScaleProblem(
                image=image,
                objective=Objective(lambda x: {"x": x}, _Poisoned(3)),
                steps=10,
                optimizer="adam",
                lr=0.1,
                reporting=Reporting(on_step=lambda i, *a: seen.append(i), every=sync_every),
            )
        )
    assert seen == [1, 2]  # the good steps were reported, nothing after the bad one


def test_nan_guard_reaches_the_cli_as_one_sentence(monkeypatch, tmp_path):
    from PIL import Image

    import cli.main as cli
    from engine import losses

    monkeypatch.setattr(losses.TotalVariationLoss, "forward", lambda self, image: image.sum() * float("inf"))
    for name in ("c.png", "s.png"):
        Image.new("RGB", (32, 32), (120, 80, 40)).save(tmp_path / name)
    out = tmp_path / "out.png"
    code = cli.main(
        [
            "stylize",
            str(tmp_path / "c.png"),
            str(tmp_path / "s.png"),
            "-o",
            str(out),
            "--device",
            "cpu",
            "--size",
            "32",
            "--min-size",
            "32",
            "--steps",
            "2",
            "-q",
            "--content-layers",
            "relu1_1",
            "--style-layers",
            "relu1_1",
        ]
    )
    assert code == 2 and not out.exists()


# --------------------------------------------------------------------------------------------- CUDA


def test_graphs_are_not_used_off_cuda():
    rt = Runtime(device=torch.device("cpu"), precision="fp32", channels_last=False, cuda_graphs=False)
    step = make_step(
        torch.rand(1, 3, 4, 4, requires_grad=True), Objective(lambda x: {"x": x}, _Poisoned(99)), "adam", 0.1, rt
    )
    assert isinstance(step, StepFunction)


@pytest.fixture(scope="module")
def cuda_problem():
    content, style = picture(192, 256, 1), picture(256, 256, 2)
    return content, style


def _trajectory(problem, steps, **settings):
    # gram: the levers (precision, graphs) were built and measured on it, and ot's steps are never captured.
    config = Config(
        **{"device": "cuda", "size": 256, "min_size": 256, "steps": steps, "style_loss": "gram", **settings}
    )
    result = stylize(*problem, config)
    return result, torch.tensor([h["loss"] for h in result.history])


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_reduced_precision_tracks_fp32_and_stays_finite(cuda_problem, precision):
    ref, ref_loss = _trajectory(cuda_problem, 500, precision="fp32", cuda_graphs="off")
    got, loss = _trajectory(cuda_problem, 500, precision=precision)
    assert torch.isfinite(loss).all() and len(loss) == 500
    # Same descent within 5 % at every 50th step, and the same picture within 0.05 on average.
    torch.testing.assert_close(loss[::50], ref_loss[::50], rtol=5e-2, atol=0)
    assert (got.image - ref.image).abs().mean() < 0.05


@pytest.fixture
def deterministic_cudnn(keep_cuda_flags):
    """Deterministic cuDNN kernels: two runs that should match bit for bit are not told apart by the
    algorithms ``cudnn.benchmark`` picks (within a process it keeps its choice per shape)."""
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = before


@pytest.mark.cuda
@cuda_only
def test_cuda_graph_replay_equals_eager(cuda_problem, deterministic_cudnn):
    eager, eager_loss = _trajectory(cuda_problem, 20, precision="fp32", cuda_graphs="off")
    graphed, graphed_loss = _trajectory(cuda_problem, 20, precision="fp32", cuda_graphs="on")
    torch.testing.assert_close(graphed_loss, eager_loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(graphed.image, eager.image, rtol=0, atol=1e-4)


@pytest.mark.cuda
@cuda_only
def test_cuda_graphs_recapture_on_scale_change(cuda_problem, monkeypatch, deterministic_cudnn):
    captures = []
    original = GraphedStep.__call__

    def counting(self):
        if self.graph is None and self.calls >= GRAPH_WARMUP:
            captures.append(tuple(self.step.image.shape))
        return original(self)

    monkeypatch.setattr(GraphedStep, "__call__", counting)
    settings = dict(device="cuda", size=256, min_size=128, steps=12, precision="fp32", style_loss="gram")
    graphed = stylize(*cuda_problem, Config(cuda_graphs="on", **settings))
    eager = stylize(*cuda_problem, Config(cuda_graphs="off", **settings))
    assert len(set(captures)) == 3  # one capture per scale: 128, 181 and 256 px
    torch.testing.assert_close(graphed.image, eager.image, rtol=0, atol=1e-4)


@pytest.fixture
def keep_cuda_flags():
    """Restore the process-wide flags resolve_runtime sets (monkeypatch cannot: cuBLAS's are properties)."""
    flags = (
        (torch.backends.cudnn, "benchmark"),
        (torch.backends.cudnn, "allow_tf32"),
        (torch.backends.cuda.matmul, "allow_tf32"),
    )
    saved = [getattr(module, name) for module, name in flags]
    yield
    for (module, name), value in zip(flags, saved):
        setattr(module, name, value)


def test_cuda_decisions_without_a_gpu(keep_cuda_flags):
    # resolve_runtime only reads the device type and sets flags, so CUDA's decisions can be checked here.
    cuda = torch.device("cuda")
    rt = resolve_runtime(Config(device="cpu"), cuda)
    assert (rt.precision, rt.channels_last, rt.cuda_graphs) == ("tf32", True, True)
    assert not resolve_runtime(Config(device="cpu", optimizer="lbfgs"), cuda).cuda_graphs
    # ot draws fresh directions every step: graphs stay on for the run, and its steps run uncaptured
    # (Objective.capturable, tests/test_auto_loss.py); named with graphs on, it is refused.
    assert resolve_runtime(Config(device="cpu", style_loss="ot"), cuda).cuda_graphs
    with pytest.raises(UserError, match="cannot capture the ot style loss"):
        resolve_runtime(Config(device="cpu", style_loss="ot", cuda_graphs="on"), cuda)
    with pytest.raises(UserError, match="works with the adam optimizer only"):
        resolve_runtime(Config(device="cpu", optimizer="lbfgs", cuda_graphs="on"), cuda)
    assert resolve_runtime(Config(device="cpu", precision="fp32"), cuda).autocast_dtype is None
    assert resolve_runtime(Config(device="cpu", precision="fp16"), cuda).autocast_dtype == torch.float16


# --------------------------------------------------------------------------------------------- CUDA: what can break


def _masks(folder):
    """Two complementary masks (left half, right half) as files, for two style images."""
    from PIL import Image

    paths = []
    for k, (a, b) in enumerate([(255, 0), (0, 255)]):
        mask = torch.zeros(192, 256, dtype=torch.uint8)
        mask[:, :128], mask[:, 128:] = a, b
        paths.append(str(folder / f"mask{k}.png"))
        Image.fromarray(mask.numpy()).save(paths[-1])
    return tuple(paths)


def _cuda_variant(kind, folder):
    """``(styles, settings)`` for one of the losses a CUDA graph must capture."""
    if kind == "masks":
        return [picture(256, 256, 2), picture(256, 256, 3)], dict(style_masks=_masks(folder))
    return picture(256, 256, 2), dict(style_loss=kind)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("kind", ["w2", "masks"])
def test_cuda_graphs_capture_w2_and_masks(tmp_path, kind, deterministic_cudnn):
    styles, settings = _cuda_variant(kind, tmp_path)
    config = dict(device="cuda", size=256, min_size=256, steps=20, precision="fp32", **settings)
    eager = stylize(picture(192, 256, 1), styles, Config(cuda_graphs="off", **config))
    graphed = stylize(picture(192, 256, 1), styles, Config(cuda_graphs="on", **config))
    eager_loss, graphed_loss = (torch.tensor([h["loss"] for h in r.history]) for r in (eager, graphed))
    assert torch.isfinite(graphed_loss).all() and graphed_loss[-1] < graphed_loss[0]
    torch.testing.assert_close(graphed_loss, eager_loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(graphed.image, eager.image, rtol=0, atol=1e-3)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("kind", ["gram", "w2", "ot", "masks"])
def test_cuda_tf32_losses_track_fp32(tmp_path, kind, keep_cuda_flags):
    # TF32 rounds matmul and convolution inputs to a 10-bit mantissa: the descent must stay the same.
    styles, settings = _cuda_variant(kind, tmp_path)
    losses = {}
    for precision in ("fp32", "tf32"):
        config = Config(device="cuda", size=256, min_size=256, steps=40, precision=precision, **settings)
        losses[precision] = torch.tensor([h["loss"] for h in stylize(picture(192, 256, 1), styles, config).history])
    assert torch.isfinite(losses["tf32"]).all()
    torch.testing.assert_close(losses["tf32"][::10], losses["fp32"][::10], rtol=2e-2, atol=0)


@pytest.mark.cuda
@cuda_only
def test_cuda_torchscript_backend_matches_eager(cuda_problem, keep_cuda_flags):
    runs = {}
    for backend in ("eager", "torchscript"):
        config = Config(
            device="cuda", size=256, min_size=256, steps=20, precision="fp32", backend=backend, style_loss="gram"
        )
        runs[backend] = stylize(*cuda_problem, config)  # CUDA graphs on (auto) for both
    loss = {k: torch.tensor([h["loss"] for h in r.history]) for k, r in runs.items()}
    torch.testing.assert_close(loss["torchscript"], loss["eager"], rtol=1e-3, atol=0)
    torch.testing.assert_close(runs["torchscript"].image, runs["eager"].image, rtol=0, atol=2e-3)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_resume_equals_uninterrupted(cuda_problem, tmp_path, precision, deterministic_cudnn):
    from engine import checkpoint as ckpt
    from engine.control import Control, Interrupted

    config = Config(
        device="cuda", size=256, min_size=128, steps=12, precision=precision, style_loss="gram"
    )  # graphs on
    full = stylize(*cuda_problem, config)
    calls = [0]

    def stop_at_18():
        calls[0] += 1
        if calls[0] == 18:  # step 6 of the second scale (12 + 8 + 6 steps), after its graph was captured
            control.interrupt()

    control = Control(watch=stop_at_18)
    with pytest.raises(Interrupted):
        stylize(*cuda_problem, config, checkpoint=ckpt.CheckpointPlan(str(tmp_path / "run.ckpt")), control=control)
    state = ckpt.load(tmp_path / "run.ckpt")
    assert (state["loss_scale"] is not None) == (precision == "fp16")
    resumed = stylize(*cuda_problem, config, resume=state)
    loss = {k: torch.tensor([h["loss"] for h in r.history]) for k, r in (("full", full), ("resumed", resumed))}
    torch.testing.assert_close(loss["resumed"], loss["full"], rtol=1e-4, atol=0)
    torch.testing.assert_close(resumed.image, full.image, rtol=0, atol=1e-3)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("graphs", [True, False], ids=["graphed", "eager"])
def test_cuda_fp16_steps_never_wait_for_the_host(graphs, keep_cuda_flags):
    """Loss scaling is all on the device: after the first step, no step synchronises with the host."""
    config = Config(device="cuda", style_loss="gram")
    rt = Runtime(device=torch.device("cuda"), precision="fp16", channels_last=True, cuda_graphs=graphs)
    content = rt.layout(picture(96, 128, 1)[None])
    extractor = loop_extractor(config, rt)
    criterion = build_criterion(config, extractor, content, [([picture(128, 128, 2)], (1.0,))], min_side=16, runtime=rt)
    image = content.clone().requires_grad_(True)
    step = make_step(image, Objective(extractor, criterion, rt.autocast), "adam", config.lr, rt)
    assert isinstance(step, GraphedStep) == graphs and step.loss_scale is not None
    for _ in range(GRAPH_WARMUP + 1):  # the first step settles the scale; a graph is captured after warm-up
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(step.loss_scale.scale) and float(step.loss_scale.scale) >= 1
    assert float(step.optimizer.state[image]["step"]) >= GRAPH_WARMUP + 1
