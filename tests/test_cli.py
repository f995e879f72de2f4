"""The ``nst`` command in subprocesses, as a user runs it: results, errors, and files left alone."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import Config

ROOT = Path(__file__).resolve().parents[1]


def nst(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "engine", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def pics(tmp_path):
    """A 48x40 content with stripes and a 40x40 diagonal-gradient style, both PNG."""
    yy, xx = np.mgrid[0:40, 0:48]
    content = np.stack([(xx % 8 < 4) * 200 + 20, yy * 5, 255 - xx * 4], -1).astype(np.uint8)
    style = np.stack([(xx[:, :40] + yy[:, :40]) * 3, 255 - yy[:, :40] * 6, (xx[:, :40] * 7) % 256], -1).astype(np.uint8)
    Image.fromarray(content).save(tmp_path / "content.png")
    Image.fromarray(style).save(tmp_path / "style.png")
    return tmp_path


TINY = ["--size", "48", "--min-size", "48", "--steps", "3", "--quiet"]


@pytest.mark.slow
def test_run_writes_output_and_snapshots(pics):
    r = nst("stylize", "content.png", "style.png", "-o", "out.png", "--snapshot-every", "2", *TINY, cwd=pics)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("wrote out.png (48x40, 3 steps) in ") and last.endswith(" s")
    out = Image.open(pics / "out.png")
    assert out.size == (48, 40) and out.mode == "RGB"
    assert sorted(p.name for p in (pics / "out_snapshots").iterdir()) == ["step00002_scale1.png"]
    assert not list(pics.glob("*.part"))


@pytest.mark.slow
def test_overwrite_replaces_existing_output(pics):
    (pics / "out.jpg").write_bytes(b"old")
    r = nst("stylize", "content.png", "style.png", "-o", "out.jpg", "--overwrite", *TINY, cwd=pics)
    assert r.returncode == 0, r.stderr
    assert Image.open(pics / "out.jpg").size == (48, 40)


BAD = {
    "missing input": (["nope.png", "style.png"], [], "does not exist"),
    "unreadable image": (["notes.jpg", "style.png"], [], "could not be read as an image"),
    "unknown layer": (["content.png", "style.png"], ["--style-layers", "relu1_1,relu9_9"], "unknown layer 'relu9_9'"),
    "negative weight": (["content.png", "style.png"], ["--style-weight", "-1"], "--style-weight must be a finite number zero or more, not -1.0"),
    "nan weight": (["content.png", "style.png"], ["--content-weight", "nan"], "--content-weight must be a finite"),
    "output is an input": (["content.png", "style.png"], ["-o", "content.png", "--overwrite"], "is also an input"),
    "existing output": (["content.png", "style.png"], [], "already exists"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_sentence_and_touches_nothing(pics, case):
    inputs, extra, message = BAD[case]
    (pics / "notes.jpg").write_text("not an image\n")
    (pics / "out.png").write_bytes(b"the user's earlier result")
    before = {p.name: sha(p) for p in pics.iterdir()}
    args = ["stylize", *inputs, *TINY, *extra]
    if "-o" not in extra:
        # --overwrite on purpose: a run that fails must not touch out.png even when allowed to.
        args += ["-o", "out.png"] + ([] if case == "existing output" else ["--overwrite"])
    r = nst(*args, cwd=pics)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("nst: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert {p.name: sha(p) for p in pics.iterdir()} == before


def test_help_shows_config_defaults():
    r = nst("stylize", "--help", cwd=ROOT)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    defaults = Config()
    assert f"weight of the style loss (default: {defaults.style_weight})" in text
    assert f"(default: {','.join(defaults.style_layers)})" in text
    assert f"(default: {defaults.content_layers[0]})" in text
    r = nst(cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
