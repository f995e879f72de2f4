"""Video jobs in ``nst serve`` (serve/video.py): a real server on loopback, a real video file made here with PyAV.

The job's progress is counted in frames, its preview is the frame being made, and its result is the video
(every frame, at the output size); a file that is not a video is refused in one sentence, leaving nothing.
"""

from __future__ import annotations

import io
import json
import time
from fractions import Fraction

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image
from serving import SMALL, Server

pytest.importorskip("fastapi")
av = pytest.importorskip("av")
pytest.importorskip("cv2")

from engine.images import load_image  # noqa: E402
from video.synthetic import make_clip  # noqa: E402

pytestmark = pytest.mark.slow
FRAMES = 4


def clip_bytes(tmp_path, count: int = FRAMES) -> bytes:
    photo = load_image(ROOT / "examples/tubingen.jpg")
    frames = make_clip(photo, 1 - photo.flip(-1), count, (48, 64)).frames
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(12))
        stream.height, stream.width, stream.pix_fmt, stream.options = 48, 64, "yuv420p", {"crf": "8"}
        for f in frames:
            rgb = np.rint(f.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode(None))
    return path.read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("state"))
    yield s
    assert s.stop(), "".join(s.stderr)


def test_a_video_job_reports_frames_previews_the_current_frame_and_gives_the_video(server, tmp_path):
    data = {"style_sample": "starry_night.jpg", **SMALL}
    answer = server.client.post("/videos", data=data, files=[("video", ("clip.mp4", clip_bytes(tmp_path)))])
    assert answer.status_code == 201, answer.text
    job = answer.json()
    assert (
        job["state"] in ("queued", "running") and job["frames"] == FRAMES and (job["width"], job["height"]) == (48, 36)
    )
    seen, previews = set(), 0
    deadline = time.monotonic() + 300
    while job["state"] not in ("done", "failed", "cancelled") and time.monotonic() < deadline:
        seen.add(job["frames_done"])
        if job["state"] == "running":
            shot = server.client.get(f"/videos/{job['id']}/preview")
            if shot.status_code == 200:
                assert Image.open(io.BytesIO(shot.content)).size == (48, 36)
                previews += 1
        time.sleep(0.1)
        job = server.client.get(f"/videos/{job['id']}").json()
    assert job["state"] == "done", job
    assert job["frames_done"] == FRAMES and len(seen) >= 2  # counted up frame by frame while it ran
    assert previews >= 1 and job["seconds_first_frame"] > 0 and job["seconds_per_later_frame"] > 0
    result = server.client.get(f"/videos/{job['id']}/result")
    assert result.status_code == 200 and result.headers["content-type"] == "video/mp4"
    (tmp_path / "out.mp4").write_bytes(result.content)
    with av.open(str(tmp_path / "out.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == FRAMES and decoded[0].shape == (36, 48, 3)
    last = server.client.get(f"/videos/{job['id']}/preview")
    assert last.status_code == 200 and Image.open(io.BytesIO(last.content)).size == (48, 36)


def test_a_file_that_is_not_a_video_is_refused_in_one_sentence_and_leaves_nothing(server):
    before = sorted(p.name for p in (server.state_dir / "videos").iterdir())
    answer = server.client.post(
        "/videos",
        data={"style_sample": "starry_night.jpg", **SMALL},
        files=[("video", ("clip.mp4", b"not a video at all"))],
    )
    assert answer.status_code == 422
    sentence = answer.json()["detail"]
    assert sentence.startswith("content 'clip.mp4' could not be read as a video"), sentence
    assert "\n" not in sentence and "server" not in sentence
    assert sorted(p.name for p in (server.state_dir / "videos").iterdir()) == before
    style = ("starry.jpg", (ROOT / "examples/starry_night.jpg").read_bytes())
    missing = server.client.post("/videos", data=SMALL, files=[("style", style)])
    assert missing.status_code == 422 and missing.json()["detail"] == "send exactly one 'video' file"
    assert server.client.get("/videos/nothing-here").status_code == 404


def test_a_running_video_job_can_be_cancelled_and_has_no_result(server, tmp_path):
    data = {"style_sample": "starry_night.jpg", **SMALL, "steps": "400"}  # minutes of work: cancelled long before
    job = server.client.post("/videos", data=data, files=[("video", ("clip.mp4", clip_bytes(tmp_path)))]).json()
    deadline = time.monotonic() + 120
    while server.client.get(f"/videos/{job['id']}").json()["state"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.1)
    cancelled = server.client.delete(f"/videos/{job['id']}").json()
    assert cancelled["state"] == "cancelled" and cancelled["frames_done"] < FRAMES
    answer = server.client.get(f"/videos/{job['id']}/result")
    assert (
        answer.status_code == 409 and answer.json()["detail"] == f"video job {job['id']} has no result: it is cancelled"
    )


def test_a_video_job_goes_on_at_its_next_frame_after_a_restart(tmp_path):
    state = tmp_path / "state"
    first = Server(state)
    data = {"style_sample": "starry_night.jpg", **SMALL, "steps": "60"}
    job = first.client.post("/videos", data=data, files=[("video", ("clip.mp4", clip_bytes(tmp_path, 8)))]).json()
    deadline = time.monotonic() + 300
    while first.client.get(f"/videos/{job['id']}").json()["frames_done"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.stop(), "".join(first.stderr)
    assert "1 unfinished video job kept for the next start" in "".join(first.stderr)
    folder = state / "videos" / job["id"]
    kept = sorted(p.name for p in (folder / "frames").glob("*.png"))
    assert 2 <= len(kept) < 8 and json.loads((folder / "job.json").read_text())["state"] == "queued"
    second = Server(state)
    try:
        again = second.client.get(f"/videos/{job['id']}").json()
        assert again["frames_done"] >= len(kept) and again["state"] in ("queued", "running", "done")
        while again["state"] not in ("done", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(0.1)
            again = second.client.get(f"/videos/{job['id']}").json()
        assert again["state"] == "done" and again["frames_done"] == 8, again
        # It went on at its next frame: only the frames not kept ran again (frame 0 was not among them).
        assert again["frames_run"] == 8 - len(kept) and again["seconds_first_frame"] is None
        assert f"video job {job['id']} queued again" in "".join(second.stderr)
        (tmp_path / "out.mp4").write_bytes(second.client.get(f"/videos/{job['id']}/result").content)
        with av.open(str(tmp_path / "out.mp4")) as container:
            assert sum(1 for _ in container.decode(video=0)) == 8
    finally:
        assert second.stop(), "".join(second.stderr)
