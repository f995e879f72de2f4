"""The coarse-to-fine schedule: the steps of each scale (``--schedule``); ending a flat scale early (``--plateau``)."""

import pytest
import torch
from helpers import stop_after

from engine import Config, UserError, stylize
from engine import checkpoint as ckpt
from engine.optimize import Interrupted, Objective, Plateau, Reporting, ScaleProblem, optimize_scale
from engine.schedule import build_schedule


def steps(schedule, size, min_size=128, steps=200, height=768, width=1024):
    return [s.steps for s in build_schedule(height, width, size, min_size, steps, schedule=schedule)]


def test_sqrt2_takes_one_over_sqrt2_as_many_steps_per_scale():
    assert steps("sqrt2", 1024) == [200, 141, 100, 71, 50, 35, 25]
    assert steps("sqrt2", 256, steps=80) == [80, 57, 40]


def sides(schedule, size, min_size=128):
    return [max(s.height, s.width) for s in build_schedule(768, 1024, size, min_size, 200, schedule=schedule)]


def test_lean_doubles_the_side_and_gives_the_last_scale_what_sqrt2_gives_it():
    assert sides("lean", 1024) == [128, 256, 512, 1024] and sides("sqrt2", 1024)[::2] == [128, 256, 512, 1024]
    # The first scale --steps, the ones between --steps/16, the last what sqrt2's last scale takes at this size.
    assert steps("lean", 1024) == [200, 12, 12, 25] and steps("sqrt2", 1024)[-1] == 25
    assert steps("lean", 2048) == [200, 12, 12, 12, 12] and steps("sqrt2", 2048)[-1] == 12
    assert steps("lean", 384, steps=80) == [80, 40] and sides("lean", 384) == [192, 384]
    assert steps("lean", 128) == [200]  # one scale: all of --steps
    assert min(steps("lean", 2048, steps=3)) == 1  # every scale still takes a step


def test_lean_costs_less_than_half_the_pixel_steps_of_sqrt2_at_print_sizes():
    for size in (1024, 2048):
        work = {
            name: sum(s.steps * s.height * s.width for s in build_schedule(768, 1024, size, 128, 200, schedule=name))
            for name in ("sqrt2", "lean")
        }
        assert work["lean"] < 0.5 * work["sqrt2"], (size, work)


def test_an_unknown_schedule_or_plateau_is_one_sentence():
    with pytest.raises(UserError, match="schedule must be one of lean, sqrt2, not 'fast'"):
        Config(schedule="fast")
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(UserError, match="plateau must be a fraction"):
            Config(plateau=bad)


def _run(loss_at, steps, plateau, resume=None, save=None, due=lambda i: False):
    """``optimize_scale`` on an 8x8 image whose loss at step i is ``loss_at(i, image)``; returns (losses, carry)."""
    seen = []
    count = [0 if resume is None else resume["step"]]

    def criterion(features, image):
        count[0] += 1
        loss = loss_at(count[0], features["x"])
        return loss, {"content": loss}

    from engine.optimize import Checkpointing

    image = torch.zeros(1, 3, 8, 8)
    _, carry = optimize_scale(
        ScaleProblem(
            image=image,
            objective=Objective(lambda x: {"x": x}, criterion),
            steps=steps,
            lr=0.001,
            ema_decay=0.0,
            reporting=Reporting(on_step=lambda i, loss, parts, img: seen.append((i, loss))),
            checkpointing=Checkpointing(save=save, due=due, resume=resume),
            plateau=plateau,
        )
    )
    return seen, carry


def flat(i, x):
    # Flat, with a jitter like Adam's (well under the tolerance): a plateau, not a fall.
    return (x * 0).sum() + 1.0 + 0.002 * (-1) ** i


def falling(i, x):
    # Adam moves every pixel by about lr = 0.001 per step towards 1: the loss falls by about 4% over 20 steps.
    return (x - 1).pow(2).mean()


def test_plateau_ends_a_flat_scale_at_its_first_check_after_the_window():
    seen, carry = _run(flat, 200, Plateau(tolerance=0.01))
    # Checked every 5 steps from step 20; the first with 20 steps behind it is step 25.
    assert carry.steps == 25 and [i for i, _ in seen] == list(range(1, 26))


def test_plateau_never_ends_a_falling_scale():
    seen, carry = _run(falling, 200, Plateau(tolerance=0.01))
    assert carry.steps == 200 and len(seen) == 200
    assert seen[-1][1] < 0.7 * seen[0][1]  # it did fall all the way


def test_without_a_plateau_every_step_runs():
    _, carry = _run(flat, 60, None)
    assert carry.steps == 60


def test_plateau_resumes_where_the_uninterrupted_scale_would_stop():
    states = []
    seen, carry = _run(flat, 200, Plateau(tolerance=0.01), save=states.append, due=lambda i: i == 22)
    assert carry.steps == 25 and states[0]["losses"] == [loss for _, loss in seen[:22]]
    # From the checkpoint at step 22, the check at 25 still sees the 20 steps before it, 3 of them after the resume.
    rest, carry = _run(flat, 200, Plateau(tolerance=0.01), resume=states[0])
    assert carry.steps == 25 and [i for i, _ in rest] == [23, 24, 25]


SMALL = dict(device="cpu", size=32, min_size=32, content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1"))


def test_a_run_with_a_plateau_stops_early_and_resumes_to_the_same_image(tmp_path):
    content = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    style = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    # A tolerance of a half: flat as soon as 20 steps no longer halve the loss, long before step 300.
    config = Config(**SMALL, steps=300, plateau=0.5)
    full = stylize(content, style, config)
    assert 20 < len(full.history) < 300
    control = stop_after(21)
    plan = ckpt.CheckpointPlan(str(tmp_path / "run.ckpt"))
    with pytest.raises(Interrupted):
        stylize(content, style, config, checkpoint=plan, control=control)
    resumed = stylize(content, style, config, resume=ckpt.load(tmp_path / "run.ckpt"))
    assert len(resumed.history) == len(full.history)
    torch.testing.assert_close(resumed.image, full.image, rtol=0, atol=1e-6)


def test_a_checkpoint_from_before_schedules_resumes_as_it_ran(tmp_path):
    content = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    style = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    # Before --schedule, --plateau and --detail existed, every run was sqrt2, whole scales, plain upsampling.
    config = Config(**{**SMALL, "min_size": 24}, steps=6, schedule="sqrt2", detail=0.0)
    full = stylize(content, style, config)
    control = stop_after(4)
    plan = ckpt.CheckpointPlan(str(tmp_path / "run.ckpt"))
    with pytest.raises(Interrupted):
        stylize(content, style, config, checkpoint=plan, control=control)
    state = ckpt.load(tmp_path / "run.ckpt")
    for name in ("schedule", "plateau", "detail"):  # as a checkpoint written before these settings existed
        del state["config"][name]
    # `nst resume` rebuilds the settings from the checkpoint: those it predates come back as the run had them.
    assert ckpt.config_from_state(state["config"]) == config
    resumed = stylize(content, style, config, resume=state)
    torch.testing.assert_close(resumed.image, full.image, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="other settings"):
        stylize(content, style, Config(**{**SMALL, "min_size": 24}, steps=6, schedule="lean"), resume=state)
