"""``nst stylize --log`` / ``--animate`` and ``nst plot`` (engine/runlog.py, cli/plot.py): files and errors."""

import json

import numpy as np
import pytest
from helpers import run_together, tree
from PIL import Image

from cli.main import main
from engine.optimize import StepInfo
from engine.runlog import StepLog, read_log

FIELDS = {"scale", "scales", "width", "height", "step", "steps", "total_step", "total_steps", "loss", "parts"}
FIELDS |= {"seconds"}


def make_pics(folder):
    yy, xx = np.mgrid[0:36, 0:48]
    content = np.stack([(xx % 8 < 4) * 200 + 20, yy * 6, 255 - xx * 4], -1).astype(np.uint8)
    style = np.stack([(xx + yy) * 3, 255 - yy * 6, (xx * 7) % 256], -1).astype(np.uint8)
    Image.fromarray(content).save(folder / "content.png")
    Image.fromarray(style).save(folder / "style.png")
    return folder


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    folder = make_pics(tmp_path_factory.mktemp("logged"))
    args = ["stylize", "content.png", "style.png", "-o", "out.png", "--size", "48", "--min-size", "32"]
    args += ["--steps", "4", "--style-layers", "relu1_1,relu2_1", "--content-layers", "relu2_1", "--quiet"]
    args += ["--snapshot-every", "2", "--log", "run.jsonl", "--animate", "out.gif"]
    result = run_together({"run": (args, folder)})["run"]
    assert result.returncode == 0, result.stderr
    return folder


@pytest.mark.slow
def test_log_has_one_line_per_step_with_its_fields(logged_run):
    lines = (logged_run / "run.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == records[-1]["total_steps"] and [r["total_step"] for r in records] == list(
        range(1, len(records) + 1)
    )
    assert all(set(r) == FIELDS for r in records)
    assert all(set(r["parts"]) == {"content", "style", "tv"} for r in records)
    assert [r["scale"] for r in records] == sorted(r["scale"] for r in records) and records[-1]["scale"] == 2
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    seconds = [r["seconds"] for r in records]
    assert seconds == sorted(seconds) and seconds[0] >= 0


@pytest.mark.slow
def test_animation_has_a_frame_per_snapshot_and_the_result(logged_run):
    total = len((logged_run / "run.jsonl").read_text().splitlines())
    snapshots = sorted((logged_run / "out_snapshots").iterdir())
    assert len(snapshots) == total // 2
    with Image.open(logged_run / "out.gif") as gif, Image.open(logged_run / "out.png") as result:
        assert gif.n_frames == len(snapshots) + 1
        assert gif.size == result.size  # earlier scales' frames are resized up to the result's size
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("RGB"), np.int16)
        assert np.abs(last - np.asarray(result.convert("RGB"), np.int16)).mean() < 8  # GIF's palette


@pytest.mark.slow
def test_plot_draws_the_curve(logged_run, capsys):
    assert main(["plot", str(logged_run / "run.jsonl"), "-o", str(logged_run / "curve.png")]) == 0
    with Image.open(logged_run / "curve.png") as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 20 and (pixels < 128).mean() > 0.005  # lines, labels and axes, not a blank canvas
    # Not again without --overwrite; with it, yes.
    assert main(["plot", str(logged_run / "run.jsonl"), "-o", str(logged_run / "curve.png")]) == 2
    assert "already exists" in capsys.readouterr().err


def _error(capsys, argv, folder):
    before = tree(folder)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("nst: error: "), err
    assert tree(folder) == before  # nothing written, nothing replaced
    return err[0]


def test_plot_errors_are_one_sentence(tmp_path, capsys):
    log = tmp_path / "run.jsonl"
    log.write_text('{"scale": 1, "step": 1, "total_step": 1, "loss": 1.0, "parts": {}}\nnot json\n')
    assert "must end in one of .png" in _error(capsys, ["plot", str(log), "-o", str(tmp_path / "c.txt")], tmp_path)
    assert "line 2 of" in _error(capsys, ["plot", str(log), "-o", str(tmp_path / "c.png")], tmp_path)
    missing = str(tmp_path / "none.jsonl")
    assert "does not exist" in _error(capsys, ["plot", missing, "-o", str(tmp_path / "c.png")], tmp_path)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--animate", "out.avi", "--snapshot-every", "1"], "must end in .gif or .mp4"),
        (["--animate", "out.gif"], "--animate needs --snapshot-every N"),
        (["--animate", "nowhere/out.gif", "--snapshot-every", "1"], "animation directory 'nowhere' does not exist"),
        (["--log", "old.jsonl"], "log 'old.jsonl' already exists; pass --overwrite"),
        (["--log", "nowhere/run.jsonl"], "log directory 'nowhere' does not exist"),
        (["--log", "out.png"], "--log 'out.png' is also the output or an input"),
        (["--log", "a.gif", "--animate", "a.gif", "--snapshot-every", "1"], "--animate 'a.gif' is also the output"),
    ],
)
def test_stylize_log_and_animate_errors_are_one_sentence(tmp_path, capsys, monkeypatch, extra, message):
    make_pics(tmp_path)
    (tmp_path / "old.jsonl").write_text("the user's earlier log\n")
    monkeypatch.chdir(tmp_path)
    argv = ["stylize", "content.png", "style.png", "-o", "out.png", "--size", "32", "--steps", "1", "-q", *extra]
    assert message in _error(capsys, argv, tmp_path)


def test_mp4_without_imageio_ffmpeg_says_to_use_a_gif(tmp_path, capsys, monkeypatch):
    try:
        import imageio_ffmpeg  # noqa: F401

        pytest.skip("imageio-ffmpeg is installed here: .mp4 is written")
    except ImportError:
        pass
    make_pics(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["stylize", "content.png", "style.png", "-o", "out.png", "--animate", "out.mp4", "--snapshot-every", "1"]
    assert "use a .gif instead" in _error(capsys, argv, tmp_path)


def test_a_resumed_run_appends_to_its_log_and_goes_on_counting_seconds(tmp_path):
    def info(step):
        return StepInfo(
            scale=0,
            scales=1,
            height=24,
            width=32,
            step=step,
            steps=4,
            total_step=step,
            total_steps=4,
            loss=1.0 / step,
            parts={"content": 0.1, "style": 0.2, "tv": 0.0},
        )

    path = tmp_path / "run.jsonl"
    first = StepLog(path, overwrite=False, append=False)
    for step in (1, 2, 3):  # stopped after step 3; the checkpoint was made at step 2
        first.write(info(step))
    first.close()
    last_seconds = read_log(path)[-1]["seconds"]
    resumed = StepLog(path, overwrite=False, append=True)  # what nst resume does
    for step in (3, 4):
        resumed.write(info(step))
    resumed.close()
    assert len(path.read_text().splitlines()) == 5
    records = read_log(path)  # step 3, logged twice, counts once
    assert [r["total_step"] for r in records] == [1, 2, 3, 4] and records[-1]["seconds"] >= last_seconds
