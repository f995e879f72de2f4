"""Checkpoints, resume, signals: a stopped run goes on to exactly the image an uninterrupted run makes.

float32 on the CPU with one thread is deterministic, so "the same image" is checked at 1e-6 in the API and
as identical 8-bit pixels through the CLI.
"""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import ENV, one_error_line, run_together, stop_after
from PIL import Image

from engine import Config, UserError, stylize
from engine import checkpoint as ckpt
from engine.optimize import Interrupted

SMALL = dict(
    device="cpu", size=48, min_size=34, steps=6, content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1")
)


def picture(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair():
    return picture(40, 48, 1), picture(36, 36, 2)


@pytest.mark.parametrize("loss", ["gram", "ot"])
@pytest.mark.parametrize("stop_at", [3, 6, 8], ids=["mid-scale", "scale-end", "second-scale"])
def test_resumed_run_equals_uninterrupted(pair, tmp_path, loss, stop_at):
    config = Config(**SMALL, style_loss=loss)
    full = stylize(*pair, config)
    plan = ckpt.CheckpointPlan(str(tmp_path / "run.ckpt"))
    with pytest.raises(Interrupted) as stopped:
        stylize(*pair, config, checkpoint=plan, control=stop_after(stop_at))
    assert stopped.value.step == (stop_at - 1) % 6 + 1
    state = ckpt.load(tmp_path / "run.ckpt")
    assert (state["scale"], len(state["history"])) == ((stop_at - 1) // 6, stop_at)
    resumed = stylize(*pair, config, resume=state)
    torch.testing.assert_close(resumed.image, full.image, rtol=0, atol=1e-6)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-6)


def test_periodic_checkpoints_hold_the_complete_state(pair, tmp_path):
    seen = []
    plan = ckpt.CheckpointPlan(str(tmp_path / "run.ckpt"), every=4)
    real_save = ckpt.save

    def spy(path, state):
        seen.append((state["scale"], state["step"]))
        real_save(path, state)
        real_save(tmp_path / "copy.ckpt", state)  # the plan's own file is deleted once the job is done

    ckpt.save = spy
    try:
        stylize(*pair, Config(**SMALL), checkpoint=plan)
    finally:
        ckpt.save = real_save
    assert seen == [(0, 4), (1, 2)]  # total steps 4 and 8
    assert not (tmp_path / "run.ckpt").exists()  # as the README says: deleted once the job is done
    state = ckpt.load(tmp_path / "copy.ckpt")
    assert set(state) >= {"image", "optimizer", "ema", "scale", "step", "config", "inputs", "history", "generators"}
    assert state["config"] == ckpt.config_state(Config(**SMALL))
    assert state["optimizer"]["state"][0]["exp_avg"].shape == state["image"].shape


def test_checkpoint_from_other_settings_or_inputs_is_refused(pair, tmp_path):
    plan = ckpt.CheckpointPlan(str(tmp_path / "run.ckpt"))
    with pytest.raises(Interrupted):
        stylize(*pair, Config(**SMALL), checkpoint=plan, control=stop_after(2))
    state = ckpt.load(tmp_path / "run.ckpt")
    with pytest.raises(UserError, match=r"made with other settings \(style_weight None in the checkpoint, 9.0 now\)"):
        stylize(*pair, Config(**SMALL, style_weight=9.0), resume=state)
    with pytest.raises(UserError, match="made from another content image"):
        stylize(pair[0].flip(-1), pair[1], Config(**SMALL), resume=state)


@pytest.mark.parametrize("damage", ["truncated", "not torch", "arbitrary pickle", "other dict"])
def test_damaged_checkpoint_is_refused(tmp_path, damage):
    path = tmp_path / "bad.ckpt"
    if damage == "truncated":
        ckpt.save(
            path,
            {
                "scale": 0,
                "step": 1,
                "image": torch.zeros(1, 3, 8, 8),
                "optimizer": {},
                "config": {},
                "inputs": {},
                "history": [],
            },
        )
        path.write_bytes(path.read_bytes()[:-200])
    elif damage == "not torch":
        path.write_text("hello")
    elif damage == "arbitrary pickle":
        torch.save({"format": ckpt.FORMAT, "payload": Config()}, path)  # a class instance: weights_only refuses it
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="(damaged or not a checkpoint|not an nst-engine checkpoint)"):
        ckpt.load(path)


# --------------------------------------------------------------------------------------------- CLI


def write_pics(folder):
    yy, xx = np.mgrid[0:40, 0:48]
    Image.fromarray(np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1).astype(np.uint8)).save(folder / "c.png")
    Image.fromarray(np.stack([(xx % 6) * 40, 255 - yy * 6, xx * 5], -1).astype(np.uint8)).save(folder / "s.png")


CLI_ARGS = [
    "stylize",
    "c.png",
    "s.png",
    "--size",
    "48",
    "--min-size",
    "34",
    "--steps",
    "60",
    "-q",
    "--device",
    "cpu",
    "--content-layers",
    "relu2_2",
    "--style-layers",
    "relu1_1,relu2_1",
]


def start(args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    write_pics(folder)
    r = run_together({"full": ([*CLI_ARGS, "-o", "out.png"], folder)})["full"]
    assert r.returncode == 0, r.stderr
    return pixels(folder / "out.png")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_writes_image_and_checkpoint_then_resume_finishes(tmp_path, reference, sig, code):
    write_pics(tmp_path)
    proc = start([*CLI_ARGS, "-o", "out.png", "--checkpoint-every", "5"], tmp_path)
    wait_for(tmp_path / "out.png.ckpt", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert f"stopped by {signal.Signals(sig).name} after step" in err and "nst resume out.png.ckpt" in err
    assert not (tmp_path / "out.png").exists()
    with Image.open(tmp_path / "out_interrupted.png") as img:
        assert img.size[0] in (34, 48)  # the current scale's size
    state = ckpt.load(tmp_path / "out.png.ckpt")
    assert state["cli"]["output"] == str(tmp_path / "out.png")
    if sig == signal.SIGTERM:
        # The same command again would start afresh and replace the saved progress: refused, pointing at resume.
        (tmp_path / "out.png").write_bytes(b"appeared meanwhile")
        again = run_together(
            {
                "again": ([*CLI_ARGS, "-o", "out.png", "--checkpoint-every", "5"], tmp_path),
                "resume": (["resume", "out.png.ckpt", "-q"], tmp_path),
            }
        )
        assert (
            "out.png.ckpt holds an unfinished run of this output; go on with: nst resume out.png.ckpt"
            in one_error_line(again["again"])
        )
        assert "out.png' already exists; pass --overwrite" in one_error_line(again["resume"])
        assert (tmp_path / "out.png").read_bytes() == b"appeared meanwhile"
        r = run_together({"resume": (["resume", "out.png.ckpt", "-q", "--overwrite"], tmp_path)})["resume"]
    else:
        r = run_together({"resume": (["resume", "out.png.ckpt", "-q"], tmp_path)})["resume"]
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(pixels(tmp_path / "out.png"), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "out.png", "s.png"]  # checkpoint and partial gone


@pytest.mark.slow
def test_sigkill_leaves_no_partial_output_and_last_checkpoint_resumes(tmp_path, reference):
    write_pics(tmp_path)
    proc = start([*CLI_ARGS, "-o", "out.png", "--checkpoint-every", "7"], tmp_path)
    wait_for(tmp_path / "out.png.ckpt", proc)
    time.sleep(0.3)  # somewhere after the first checkpoint, maybe during a later one
    proc.kill()
    proc.communicate(timeout=60)
    assert not (tmp_path / "out.png").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
    assert all(name.startswith(".out.png.ckpt.") for name in leftovers)  # at most a hidden temp of the checkpoint
    state = ckpt.load(tmp_path / "out.png.ckpt")  # the last complete one: never half written
    assert state["step"] > 0
    r = run_together({"resume": (["stylize", *CLI_ARGS[1:], "-o", "other.png", "--resume", "out.png.ckpt"], tmp_path)})
    assert r["resume"].returncode == 0, r["resume"].stderr
    np.testing.assert_array_equal(pixels(tmp_path / "other.png"), reference)
    assert not (tmp_path / "out.png.ckpt").exists()  # the job is done, under another name: its checkpoint goes


@pytest.mark.slow
def test_cli_refuses_damaged_or_mismatched_checkpoints(tmp_path):
    write_pics(tmp_path)
    (tmp_path / "junk.ckpt").write_bytes(b"\x00" * 100)
    plan = ckpt.CheckpointPlan(str(tmp_path / "other.ckpt"))
    with pytest.raises(Interrupted):
        stylize(
            str(tmp_path / "c.png"),
            str(tmp_path / "s.png"),
            Config(**{**SMALL, "steps": 60, "style_weight": 7.0}),
            checkpoint=plan,
            control=stop_after(1),
        )
    results = run_together(
        {
            "junk": (["resume", "junk.ckpt"], tmp_path),
            "missing": (["resume", "nope.ckpt"], tmp_path),
            "mismatch": ([*CLI_ARGS, "-o", "out.png", "--resume", "other.ckpt"], tmp_path),
            "python-made": (["resume", "other.ckpt"], tmp_path),
        }
    )
    assert "is damaged or not a checkpoint" in one_error_line(results["junk"])
    assert "does not exist" in one_error_line(results["missing"])
    assert "made with other settings" in one_error_line(results["mismatch"])
    assert "written from Python" in one_error_line(results["python-made"])
    assert all(r.returncode == 2 for r in results.values())
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    "error",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    ],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_is_one_sentence_naming_the_size(tmp_path, monkeypatch, capsys, error):
    import cli.main as cli
    from engine.optimize import StepFunction

    write_pics(tmp_path)
    monkeypatch.chdir(tmp_path)
    real_call, calls = StepFunction.__call__, [0]

    def failing(self):
        calls[0] += 1
        if calls[0] == 9:  # in the second scale, after a checkpoint at step 8
            raise error()
        return real_call(self)

    monkeypatch.setattr(StepFunction, "__call__", failing)
    code = cli.main([*CLI_ARGS[:8], "6", *CLI_ARGS[9:], "-o", "out.png", "--checkpoint-every", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (
        "nst: error: ran out of memory at 48x40 (scale 2/2); try a smaller --size, --precision bf16, "
        "or fewer --style-layers; the last checkpoint is kept at out.png.ckpt"
    )
    assert not (tmp_path / "out.png").exists() and ckpt.load(tmp_path / "out.png.ckpt")["step"] == 2


# --------------------------------------------------------------------------------------------- across devices

# The Adam flags StepFunction uses on each device: CUDA captures (capturable) and fuses; this torch runs both
# on the CPU too, so a checkpoint crossing devices can be simulated here with real optimisers.
ADAM_FLAGS = {"cpu": dict(capturable=False, fused=None), "cuda": dict(capturable=True, fused=True)}


def _adam_steps(optimizer, param, target, n):
    for _ in range(n):
        optimizer.zero_grad()
        (param - target).pow(2).sum().backward()
        optimizer.step()


@pytest.mark.parametrize("saved,now", [("cpu", "cuda"), ("cuda", "cpu")], ids=["cpu-to-cuda", "cuda-to-cpu"])
def test_optimizer_state_resumes_under_this_runs_device_flags(saved, now):
    from engine.optimize import _to_cpu, load_optimizer_state

    target = picture(8, 8, 3)[None]
    first = torch.zeros(1, 3, 8, 8, requires_grad=True)
    before = torch.optim.Adam([first], lr=0.05, **ADAM_FLAGS[saved])
    _adam_steps(before, first, target, 3)
    state = _to_cpu(before.state_dict())  # as optimize_scale writes it
    second = first.detach().clone().requires_grad_(True)
    after = torch.optim.Adam([second], lr=0.05, **ADAM_FLAGS[now])
    load_optimizer_state(after, state)
    group = after.param_groups[0]
    assert {k: group[k] for k in ("capturable", "fused")} == ADAM_FLAGS[now]  # the checkpoint's flags are not kept
    step = after.state[second]["step"]
    assert step.device == second.device and float(step) == 3
    _adam_steps(before, first, target, 3)
    _adam_steps(after, second, target, 3)
    torch.testing.assert_close(second, first, rtol=0, atol=1e-6)  # fused and unfused Adam: the same update


def test_ot_checkpoint_from_another_device_reseeds_deterministically(pair, tmp_path):
    config = Config(**SMALL, style_loss="ot")
    full = stylize(*pair, config)
    plan = ckpt.CheckpointPlan(str(tmp_path / "run.ckpt"))
    with pytest.raises(Interrupted):
        stylize(*pair, config, checkpoint=plan, control=stop_after(3))
    state = ckpt.load(tmp_path / "run.ckpt")
    assert state["generator_device"] == "cpu"
    # What a CUDA run writes: its generators' states are 16 bytes, which a CPU generator cannot take.
    state["generator_device"] = "cuda"
    state["generators"] = [torch.zeros(16, dtype=torch.uint8) for _ in state["generators"]]
    with pytest.raises(RuntimeError):
        torch.Generator().set_state(state["generators"][0])
    resumed = [stylize(*pair, config, resume=state) for _ in range(2)]
    torch.testing.assert_close(resumed[0].image, resumed[1].image, rtol=0, atol=0)  # reseeded the same way twice
    assert not torch.equal(resumed[0].image, full.image)  # other directions than the uninterrupted run's ...
    assert resumed[0].history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], rel=0.1)  # ... to a like end


CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("loss", ["gram", "ot"])
@pytest.mark.parametrize("first,then", [("cpu", "cuda"), ("cuda", "cpu")], ids=["cpu-to-cuda", "cuda-to-cpu"])
def test_checkpoint_resumes_on_the_other_device(pair, tmp_path, loss, first, then):
    # fp32 on both (auto would be tf32 on CUDA); CUDA graphs on wherever the loss allows them.
    settings = dict(SMALL, style_loss=loss, precision="fp32")
    graphs = "off" if loss == "ot" else "on"
    on = {"cpu": Config(**settings), "cuda": Config(**{**settings, "device": "cuda", "cuda_graphs": graphs})}
    full = stylize(*pair, on[then])
    plan = ckpt.CheckpointPlan(str(tmp_path / "run.ckpt"))
    with pytest.raises(Interrupted):
        stylize(*pair, on[first], checkpoint=plan, control=stop_after(3))
    state = ckpt.load(tmp_path / "run.ckpt")
    assert state["generator_device"] == first
    resumed = stylize(*pair, on[then], resume=state)  # graph capture of Adam replays with the restored flags
    assert len(resumed.history) == len(full.history)
    assert torch.isfinite(torch.tensor([h["loss"] for h in resumed.history])).all()
    # Other device, other kernels (and, for OT, reseeded directions): the same descent, not the same bits.
    assert resumed.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], rel=0.1)
    assert (resumed.image - full.image).abs().mean() < 0.02
