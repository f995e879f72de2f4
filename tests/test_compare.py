"""`nst compare`: the sheet's geometry, the run matrix, and the command end to end."""

import re

import numpy as np
import pytest
import torch
from helpers import one_error_line, run_together
from PIL import Image

from cli.compare import PAD, Column, make_sheet, variants
from engine import Config, UserError


def flat(h, w, value):
    return torch.full((3, h, w), value)


def test_sheet_has_one_column_per_picture_at_a_common_height():
    columns = [
        Column("content", flat(40, 60, 0.2)),
        Column("style", flat(80, 80, 0.4)),
        Column("gram  1.0 s", flat(20, 30, 0.6)),
        Column("ot  1.0 s", flat(20, 30, 0.8)),
    ]
    sheet, spans = make_sheet(columns)
    assert len(spans) == 4
    # Every tile scaled to the results' height (20): widths 30, 20, 30, 30, with padding between.
    assert [right - left for left, right in spans] == [30, 20, 30, 30]
    assert sheet.width == 30 + 20 + 30 + 30 + 5 * PAD
    assert all(spans[i][1] + PAD == spans[i + 1][0] for i in range(3))
    pixels = np.asarray(sheet)
    bottom = sheet.height - PAD - 1
    # Each column shows its own picture (grey levels 0.2, 0.4, 0.6, 0.8), under a label strip.
    levels = [pixels[bottom, (left + right) // 2, 0] for left, right in spans]
    assert levels == sorted(levels) and len(set(levels)) == 4
    assert (pixels[:PAD, :, :] == 255).all()  # white margin above the labels


def test_long_labels_are_shortened_to_their_column():
    sheet, _ = make_sheet([Column("a very long label that cannot fit above a tiny tile", flat(10, 10, 0.5))])
    assert sheet.width == 10 + 2 * PAD  # the label did not widen the sheet


def test_variants_cross_losses_with_a_varied_setting():
    runs = variants(Config(), ["gram", "w2"], ("style_weight", ["1", "10"]))
    assert [label for label, _ in runs] == [
        "gram\nstyle_weight=1",
        "gram\nstyle_weight=10",
        "w2\nstyle_weight=1",
        "w2\nstyle_weight=10",
    ]
    assert [(c.style_loss, c.style_weight) for _, c in runs] == [
        ("gram", 1.0),
        ("gram", 10.0),
        ("w2", 1.0),
        ("w2", 10.0),
    ]
    with pytest.raises(UserError, match="not a setting to vary"):
        variants(Config(), ["gram"], ("warp", ["1"]))
    with pytest.raises(UserError, match="not a valid style_weight"):
        variants(Config(), ["gram"], ("style_weight", ["lots"]))


def test_several_varied_settings_are_crossed_and_each_gets_a_label_line():
    runs = variants(Config(), ["gram"], [("style_weight", ["1", "4"]), ("tv_weight", ["0", "2"])])
    assert [label for label, _ in runs] == [
        "gram\nstyle_weight=1\ntv_weight=0",
        "gram\nstyle_weight=1\ntv_weight=2",
        "gram\nstyle_weight=4\ntv_weight=0",
        "gram\nstyle_weight=4\ntv_weight=2",
    ]
    assert [(c.style_weight, c.tv_weight) for _, c in runs] == [(1, 0), (1, 2), (4, 0), (4, 2)]
    with pytest.raises(UserError, match="names 'tv_weight' twice"):
        variants(Config(), ["gram"], [("tv_weight", ["0"]), ("tv_weight", ["1"])])


def test_multi_line_labels_are_fitted_line_by_line():
    one, _ = make_sheet([Column("gram", flat(60, 60, 0.5))])
    three, _ = make_sheet([Column("gram\nstyle_weight=1\n0.6 s", flat(60, 60, 0.5))])
    assert three.width == one.width and three.height > one.height  # taller strip, nothing cut for width


@pytest.fixture(scope="module")
def compare_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    yy, xx = np.mgrid[0:32, 0:40]
    Image.fromarray(np.stack([xx * 6, yy * 7, (xx + yy) * 3], -1).astype(np.uint8)).save(folder / "c.png")
    Image.fromarray(np.stack([(xx % 5) * 50, yy * 3, 255 - xx * 6], -1).astype(np.uint8)).save(folder / "s.png")
    (folder / "taken.png").write_bytes(b"the user's sheet")
    tiny = [
        "--size",
        "40",
        "--min-size",
        "40",
        "--steps",
        "2",
        "-q",
        "--device",
        "cpu",
        "--content-layers",
        "relu2_2",
        "--style-layers",
        "relu1_1,relu2_1",
    ]
    return run_together(
        {
            "ok": (["compare", "c.png", "s.png", "-o", "sheet.png", "--losses", "gram,ot,w2", *tiny], folder),
            "vary": (
                [
                    "compare",
                    "c.png",
                    "s.png",
                    "c.png",
                    "-o",
                    "vary.png",
                    "--losses",
                    "gram",
                    "--vary",
                    "tv_weight=0,10",
                    "--vary",
                    "lr=0.02",
                    *tiny,
                ],
                folder,
            ),
            "taken": (["compare", "c.png", "s.png", "-o", "taken.png", *tiny], folder),
            "bad loss": (["compare", "c.png", "s.png", "-o", "x.png", "--losses", "gram,fourier", *tiny], folder),
        }
    ), folder


@pytest.mark.slow
def test_compare_writes_the_sheet(compare_runs):
    results, folder = compare_runs
    for case, name, runs, styles in (("ok", "sheet.png", 3, 1), ("vary", "vary.png", 2, 2)):
        r = results[case]
        assert r.returncode == 0, r.stderr
        match = re.fullmatch(rf"wrote {name} \((\d+)x(\d+), {runs} runs\) in \d+\.\d s", r.stdout.strip())
        assert match, r.stdout
        with Image.open(folder / name) as sheet:
            assert sheet.size == (int(match[1]), int(match[2]))
            # content (40 wide), every style (40 at height 32), and one 40-wide result per run
            assert sheet.width == 40 * (1 + styles + runs) + PAD * (2 + styles + runs)
    assert "gram: " in results["ok"].stderr and "w2: " in results["ok"].stderr
    assert "gram, tv_weight=10, lr=0.02: " in results["vary"].stderr  # both varied settings, crossed


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,message",
    [
        ("taken", "output 'taken.png' already exists"),
        ("bad loss", "--losses must be among gram, ot, w2, not 'fourier'"),
    ],
)
def test_compare_errors(compare_runs, case, message):
    results, folder = compare_runs
    assert results[case].returncode == 2 and message in one_error_line(results[case])
    assert (folder / "taken.png").read_bytes() == b"the user's sheet"
