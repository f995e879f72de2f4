"""The ``nst`` command in subprocesses, as a user runs it: results, errors, and files left alone.

Every subprocess imports torch (about 3 s of CPU), so the runs a group of tests needs are started
together by one module-scoped fixture and the tests then read their results: the file takes about
half the time it would with one run after the other. Selecting a single parametrized case still
starts its whole group.
"""

import dataclasses
import hashlib
import re

import numpy as np
import pytest
from helpers import one_error_line, run_together, tree
from PIL import Image

from engine import Config

TINY = ["--size", "48", "--min-size", "48", "--steps", "3", "--quiet"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def make_pics(folder):
    """A 48x40 content with stripes and a 40x40 diagonal-gradient style, both PNG."""
    yy, xx = np.mgrid[0:40, 0:48]
    content = np.stack([(xx % 8 < 4) * 200 + 20, yy * 5, 255 - xx * 4], -1).astype(np.uint8)
    style = np.stack([(xx[:, :40] + yy[:, :40]) * 3, 255 - yy[:, :40] * 6, (xx[:, :40] * 7) % 256], -1)
    Image.fromarray(content).save(folder / "content.png")
    Image.fromarray(style.astype(np.uint8)).save(folder / "style.png")
    return folder


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), np.int16)


# ---------------------------------------------------------------------------------------------
# Successful runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_runs(tmp_path_factory):
    fresh = make_pics(tmp_path_factory.mktemp("fresh"))
    again = make_pics(tmp_path_factory.mktemp("overwrite"))
    (again / "out.jpg").write_bytes(b"the user's earlier result")
    results = run_together(
        {
            "fresh": (["stylize", "content.png", "style.png", "-o", "out.png", "--snapshot-every", "1", *TINY], fresh),
            "overwrite": (
                ["stylize", "content.png", "style.png", "-o", "out.jpg", "--overwrite", "--snapshot-every", "2", *TINY],
                again,
            ),
        }
    )
    return {"fresh": (results["fresh"], fresh), "overwrite": (results["overwrite"], again)}


@pytest.mark.slow
def test_run_writes_output(good_runs):
    r, folder = good_runs["fresh"]
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip() == ""  # --quiet: no progress bar either
    last = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"wrote out\.png \(48x40, 3 steps, style loss ot\) in \d+\.\d s", last), last
    out = folder / "out.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    with Image.open(out) as img:
        assert img.size == (48, 40) and img.mode == "RGB"  # 48 on the long side, aspect kept
    # Three Adam steps moved the pixels, but not far from the content they started from.
    diff = np.abs(pixels(out) - pixels(folder / "content.png"))
    assert diff.max() > 0 and diff.mean() < 40
    assert sorted(tree(folder)) == [
        "content.png",
        "out.png",
        "out_snapshots",
        *[f"out_snapshots/step0000{i}_scale1.png" for i in (1, 2, 3)],
        "style.png",
    ]  # and no .part file anywhere


@pytest.mark.slow
def test_snapshot_every_step(good_runs):
    r, folder = good_runs["fresh"]
    assert r.returncode == 0, r.stderr
    snaps = sorted((folder / "out_snapshots").iterdir())
    assert [p.name for p in snaps] == ["step00001_scale1.png", "step00002_scale1.png", "step00003_scale1.png"]
    for p in snaps:
        assert p.read_bytes()[:8] == PNG_MAGIC
        with Image.open(p) as img:
            assert img.size == (48, 40)
    assert not np.array_equal(pixels(snaps[0]), pixels(snaps[-1]))  # each is the image of its step
    np.testing.assert_array_equal(pixels(snaps[-1]), pixels(folder / "out.png"))  # the last step is the result


@pytest.mark.slow
def test_overwrite_replaces_existing_output(good_runs):
    r, folder = good_runs["overwrite"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("wrote out.jpg (48x40, 3 steps, style loss ot)")
    out = folder / "out.jpg"
    assert out.read_bytes()[:3] == JPEG_MAGIC  # the old bytes are gone, replaced by a JPEG
    with Image.open(out) as img:
        assert img.size == (48, 40) and img.format == "JPEG"
    # Every second step, in the output's format.
    assert sorted(tree(folder)) == [
        "content.png",
        "out.jpg",
        "out_snapshots",
        "out_snapshots/step00002_scale1.jpg",
        "style.png",
    ]


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit 2, no traceback, nothing touched
# ---------------------------------------------------------------------------------------------

# case: (positional inputs, extra options, what the error line must contain)
BAD = {
    "missing input": (["nope.png", "style.png"], [], ["content image 'nope.png' does not exist"]),
    "unreadable image": (["notes.jpg", "style.png"], [], ["content image 'notes.jpg' could not be read as an image"]),
    "unknown layer": (["content.png", "style.png"], ["--style-layers", "relu1_1,relu9_9"], ["unknown layer 'relu9_9'"]),
    "negative weight": (
        ["content.png", "style.png"],
        ["--style-weight", "-1"],
        ["--style-weight must be a finite number zero or more, not -1.0"],
    ),
    "nan weight": (
        ["content.png", "style.png"],
        ["--content-weight", "nan"],
        ["--content-weight must be a finite number zero or more, not nan"],
    ),
    "output is an input": (
        ["content.png", "style.png"],
        ["-o", "content.png", "--overwrite"],
        ["output 'content.png' is also an input"],
    ),
    "existing output": (["content.png", "style.png"], [], ["output 'out.png' already exists", "--overwrite"]),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    jobs, folders, before = {}, {}, {}
    for case, (inputs, extra, _) in BAD.items():
        folder = make_pics(tmp_path_factory.mktemp(case.replace(" ", "_")))
        (folder / "notes.jpg").write_text("not an image\n")
        (folder / "out.png").write_bytes(b"the user's earlier result")
        args = ["stylize", *inputs, *TINY, "--snapshot-every", "1", *extra]
        if "-o" not in extra:
            # --overwrite on purpose: a run that fails must not touch out.png even when allowed to.
            args += ["-o", "out.png"] + ([] if case == "existing output" else ["--overwrite"])
        jobs[case], folders[case], before[case] = (args, folder), folder, tree(folder)
    results = run_together(jobs)
    return {case: (results[case], before[case], tree(folders[case])) for case in BAD}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_sentence_and_touches_nothing(bad_runs, case):
    r, before, after = bad_runs[case]
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stdout == ""  # in particular no "wrote" line
    line = one_error_line(r)
    for part in BAD[case][2]:
        assert part in line, line
    assert after == before  # out.png and the inputs byte for byte the same; no new file or folder
    assert before["out.png"] == hashlib.sha256(b"the user's earlier result").hexdigest()


# ---------------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def help_runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("help")
    return run_together({"top": (["--help"], cwd), "stylize": (["stylize", "--help"], cwd), "bare": ([], cwd)})


def _default_text(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def test_help(help_runs):
    r = help_runs["top"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: nst") and "stylize" in r.stdout and r.stderr == ""


def test_stylize_help_shows_config_defaults(help_runs):
    r = help_runs["stylize"]
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps to the terminal width
    defaults = Config()
    assert "content layers (default: the style loss's own, see docs/losses.md)" in text
    assert "weight of the style loss (default: the style loss's own, see docs/losses.md)" in text
    assert f"style layers (default: {','.join(defaults.style_layers)})" in text
    # Every Config field is an option, with its help and (where not None) its default from Config.
    for f in dataclasses.fields(Config):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        value = getattr(defaults, f.name)
        if value is not None:
            assert f"{f.metadata['help']} (default: {_default_text(value)})" in text, f.name


def test_bare_nst_prints_the_help(help_runs):
    r = help_runs["bare"]
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == help_runs["top"].stdout


# ---------------------------------------------------------------------------------------------
# A folder of contents: one result per image, same-size images batched
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory):
    root = make_pics(tmp_path_factory.mktemp("folder"))
    photos = root / "photos"
    photos.mkdir()
    for i, size in enumerate([(48, 40), (48, 40), (40, 48)]):
        Image.fromarray(np.full((*size[::-1], 3), 60 * i + 20, np.uint8)).save(photos / f"p{i}.png")
    (photos / "notes.txt").write_text("not an image, and not picked up\n")
    taken = root / "taken"
    taken.mkdir()
    (taken / "p1.jpg").write_bytes(b"the user's earlier result")
    (root / "afile").write_text("x")
    args = ["stylize", "photos", "style.png", *TINY, "--batch-size", "2"]
    return run_together(
        {
            "ok": ([*args, "-o", "results"], root),
            "taken": ([*args, "-o", "taken", "--output-format", "jpg"], root),
            "file as folder": ([*args, "-o", "afile"], root),
            "file name as folder": ([*args, "-o", "folderout.png"], root),
            "16 bits in jpg": ([*args, "-o", "deep", "--output-format", "jpg", "--bit-depth", "16"], root),
        }
    ), root


@pytest.mark.slow
def test_folder_writes_one_result_per_image(folder_runs):
    results, root = folder_runs
    r = results["ok"]
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"wrote 3 images to results in \d+\.\d s", r.stdout.strip()), r.stdout
    assert sorted(p.name for p in (root / "results").iterdir()) == ["p0.png", "p1.png", "p2.png"]
    for name, size in (("p0.png", (48, 40)), ("p2.png", (40, 48))):
        with Image.open(root / "results" / name) as img:
            assert img.size == size


@pytest.mark.slow
def test_folder_skips_results_that_exist_and_takes_a_format(folder_runs):
    results, root = folder_runs
    r = results["taken"]
    assert r.returncode == 0, r.stderr
    assert "skipping 1 image whose result is already in taken (--overwrite redoes them)" in r.stderr
    assert re.fullmatch(r"wrote 2 images to taken in \d+\.\d s", r.stdout.strip()), r.stdout
    assert sorted(p.name for p in (root / "taken").iterdir()) == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert (root / "taken" / "p1.jpg").read_bytes() == b"the user's earlier result"
    assert (root / "taken" / "p0.jpg").read_bytes()[:3] == JPEG_MAGIC


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,message",
    [
        ("file as folder", "output 'afile' must be a folder when CONTENT is a folder"),
        ("file name as folder", "output 'folderout.png' looks like a file name, but CONTENT is a folder"),
        ("16 bits in jpg", "--bit-depth 16 needs --output-format png or tif, not jpg"),
    ],
)
def test_folder_errors_touch_nothing(folder_runs, case, message):
    results, root = folder_runs
    r = results[case]
    assert r.returncode == 2 and message in one_error_line(r)
    assert not (root / "folderout.png").exists() and not (root / "deep").exists()
    assert (root / "afile").read_text() == "x"


@pytest.mark.slow
def test_folder_run_stops_on_sigterm_and_the_same_command_does_the_rest(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from helpers import ENV

    make_pics(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (w, h) in enumerate([(48, 40), (40, 48), (48, 36)]):  # three sizes: three batches, one after another
        Image.fromarray(np.full((h, w, 3), 60 * i + 20, np.uint8)).save(photos / f"p{i}.png")
    args = [
        sys.executable,
        "-m",
        "cli",
        "stylize",
        "photos",
        "style.png",
        "-o",
        "results",
        "--size",
        "48",
        "--min-size",
        "48",
        "--steps",
        "150",
        "--content-layers",
        "relu1_2",
        "--style-layers",
        "relu1_1",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "results" / "p0.png").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "\r" not in err  # stderr is not a terminal: plain log lines, no bar
    assert "stopped by SIGTERM;" in err and "run the same command again to do the rest" in err
    assert ": step " in err and ", loss " in err  # the plain progress lines
    done = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert "p0.png" in done and len(done) < 3
    first = (tmp_path / "results" / "p0.png").read_bytes()
    r = run_together({"again": (args[3:] + ["-q"], tmp_path)})["again"]
    assert r.returncode == 0, r.stderr
    assert f"skipping {len(done)} image" in r.stderr
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["p0.png", "p1.png", "p2.png"]
    assert (tmp_path / "results" / "p0.png").read_bytes() == first
