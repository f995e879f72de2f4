"""`nst bench video` (bench/video.py) end to end at a tiny size: its rows, its JSON, and the floor it reports."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT

pytest.importorskip("av")
pytest.importorskip("cv2")

from cli.main import main  # noqa: E402
from engine.images import load_image  # noqa: E402
from video.measure import warping_error  # noqa: E402
from video.synthetic import make_clip  # noqa: E402


def test_nst_bench_video_reports_both_runs_beside_the_floor_as_json(tmp_path, capsys):
    path = tmp_path / "video.json"
    args = ["bench", "video", "--frames", "3", "--size", "32x48", "--steps", "4", "--json", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "temporal / independent warping error:" in out and f"wrote {path}" in out
    results = json.loads(path.read_text())
    rows = {row["name"]: row for row in results["rows"]}
    assert list(rows) == ["content (the floor)", "temporal", "independent"]
    photo = load_image(ROOT / "examples/tubingen.jpg")
    clip = list(make_clip(photo, 1 - photo.flip(-1), 3, (32, 48)).frames)
    assert rows["content (the floor)"]["warping_error"] == pytest.approx(warping_error(clip, clip), rel=1e-6)
    # Both runs have --steps 4: the temporal run's later frames take 0.5 x 4 at the output size; independent frames
    # and every first frame run the full schedule (here 48 px over a 24 px minimum: two scales).
    temporal, independent = rows["temporal"], rows["independent"]
    assert temporal["steps_later"] == 2 and independent["steps_later"] == temporal["steps_first"]
    assert rows["temporal"]["steps_first"] > 4
    for name in ("temporal", "independent"):
        row = rows[name]
        assert len(row["warping_errors"]) == 2 and row["warping_error"] > 0
        assert 0 < row["s_first"] and 0 < row["s_later_mean"] <= row["s_later_max"] <= row["s_total"]
    ratio = rows["temporal"]["warping_error"] / rows["independent"]["warping_error"]
    assert results["meta"]["temporal_over_independent"] == pytest.approx(ratio)
    assert results["meta"]["clip"] == {"frames": 3, "height": 32, "width": 48, "pan": [2, 1], "occluder": 3}
    assert main(args) == 2  # the JSON is not overwritten without --overwrite
    assert "exists" in capsys.readouterr().err
