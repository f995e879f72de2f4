"""Adam's state and the moving average carried from one scale to the next (``optimize.resample_state``)."""

import pytest
import torch
import torch.nn.functional as F

from engine import Config, stylize
from engine import checkpoint as ckpt
from engine.optimize import Carry, Objective, Reporting, ScaleProblem, optimize_scale, resample_state


def _quadratic(features, image):
    loss = (features["x"] - 0.3).pow(2).mean()
    return loss, {"content": loss}


def _adam_state(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {
        0: {
            "step": torch.tensor(7.0),
            "exp_avg": torch.randn(n, 3, h, w, generator=g),
            # A second moment with a wide dynamic range and exact zeros: resampling must keep it >= 0.
            "exp_avg_sq": torch.rand(n, 3, h, w, generator=g).pow(6) * (torch.rand(n, 3, h, w, generator=g) > 0.5),
        }
    }
    return {"state": state, "param_groups": [{"lr": 0.02, "params": [0]}]}


def test_resample_state_resizes_moments_keeps_the_step_and_the_layout():
    carry = Carry(_adam_state(2, 12, 16), torch.rand(2, 3, 12, 16), average_steps=7)
    like = torch.zeros(2, 3, 17, 23).contiguous(memory_format=torch.channels_last)
    out = resample_state(carry, like)
    entry, old = out.optimizer["state"][0], carry.optimizer["state"][0]
    assert float(entry["step"]) == 7 and out.average_steps == 7  # no fresh start of the bias corrections
    ratio = 12 * 16 / (17 * 23)
    for name, mode, gain in (("exp_avg", "bicubic", ratio), ("exp_avg_sq", "bilinear", ratio**2)):
        assert entry[name].shape == like.shape and entry[name].is_contiguous(memory_format=torch.channels_last)
        want = F.interpolate(old[name], size=(17, 23), mode=mode, align_corners=False, antialias=True) * gain
        torch.testing.assert_close(entry[name], want.clamp_min(0) if name == "exp_avg_sq" else want)
    assert entry["exp_avg_sq"].min() >= 0
    want = F.interpolate(carry.average, size=(17, 23), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(out.average, want)  # not clamped, not rescaled: it is a sum of images
    # Each job of a batch is resampled on its own: job 0 of the batch is job 0 resampled alone.
    first = {"state": {0: {k: v[:1] if v.dim() else v for k, v in old.items()}}, "param_groups": []}
    alone = resample_state(Carry(first), like[:1])
    torch.testing.assert_close(alone.optimizer["state"][0]["exp_avg"], entry["exp_avg"][:1], rtol=0, atol=0)
    assert carry.optimizer["state"][0]["exp_avg"].shape == (2, 3, 12, 16)  # the carry given is not modified


def test_carried_moments_have_the_scale_of_the_new_gradients():
    """A mean-over-pixels loss's gradient per pixel halves when the pixels double; so do the moments."""
    target = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    finer = F.interpolate(target, size=(23, 23), mode="bicubic", align_corners=False, antialias=True)

    def grad(image, target):
        image = image.clone().requires_grad_(True)
        (image - target).pow(2).mean().backward()
        return image.grad

    image = torch.zeros(1, 3, 16, 16)
    g = grad(image, target)
    carry = Carry({"state": {0: {"step": torch.tensor(1.0), "exp_avg": g, "exp_avg_sq": g * g}}, "param_groups": []})
    moved = resample_state(carry, finer)
    new = grad(torch.zeros_like(finer), finer)
    ratio = new.abs().mean() / moved.optimizer["state"][0]["exp_avg"].abs().mean()
    assert ratio == pytest.approx(1.0, abs=0.05)


def _run(image, steps, optimizer="adam", lr=0.05, record=None, ema_decay=0.0, carry=None):
    objective = Objective(lambda x: {"x": x}, _quadratic)
    return optimize_scale(
        ScaleProblem(
            image=image,
            objective=objective,
            steps=steps,
            optimizer=optimizer,
            lr=lr,
            ema_decay=ema_decay,
            reporting=Reporting(on_step=record),
            carry=carry,
        )
    )


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_carrying_at_the_same_size_continues_the_run_exactly(ema_decay):
    start = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    losses = []

    def record(i, loss, parts, image):
        losses.append(loss)

    whole, _ = _run(start, 6, record=record, ema_decay=ema_decay)
    whole_losses, losses[:] = list(losses), []
    # Three steps, then three more from the live image with the carried state: the same six steps.
    half, carry = _run(start, 3, record=record)
    assert float(carry.optimizer["state"][0]["step"]) == 3
    if ema_decay:
        # The live image is what Adam moved; the average is carried on its own.
        _, carry_avg = _run(start, 3, ema_decay=ema_decay)
        carry = Carry(carry.optimizer, carry_avg.average, carry_avg.average_steps)
    second, after = _run(half, 3, record=record, ema_decay=ema_decay, carry=carry)
    assert losses == pytest.approx(whole_losses, rel=1e-6)
    torch.testing.assert_close(second, whole, rtol=0, atol=1e-6)
    assert float(after.optimizer["state"][0]["step"]) == 6 and after.average_steps == (6 if ema_decay else 3)
    assert carry.optimizer is None and carry.average is None  # consumed: the old tensors are not held


def test_lbfgs_starts_each_scale_afresh_but_the_average_is_carried():
    start = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    _, carry = _run(start, 2, "lbfgs", 1.0, ema_decay=0.9)
    assert carry.optimizer is None and carry.average is not None and carry.average_steps == 2


SMALL = dict(
    device="cpu", size=48, min_size=34, steps=6, content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1")
)


def test_a_checkpoint_in_the_second_scale_holds_the_carried_state(tmp_path, monkeypatch):
    pair = torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(1)), torch.rand(3, 36, 36)
    saved = []
    monkeypatch.setattr(ckpt, "save", lambda path, state: saved.append(state))
    stylize(*pair, Config(**SMALL), checkpoint=ckpt.CheckpointPlan(str(tmp_path / "run.ckpt"), every=8))
    (state,) = saved
    assert (state["scale"], state["step"], state["ema_steps"]) == (1, 2, 8)
    assert float(state["optimizer"]["state"][0]["step"]) == 8  # Adam counted on through the first scale's six
