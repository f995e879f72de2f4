"""Videos on Ray in overlapping chunks (scale/video.py): the plan, the cross-fade, and real local Ray runs.

The clip is made here (video/synthetic.py, from the sample photo); the Ray tests start a real local cluster
of 2 CPUs, as tests/test_scale_ray.py does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import ENV, ROOT, TIMEOUT, one_error_line

pytest.importorskip("av")
pytest.importorskip("cv2")

from engine import Config  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.images import load_image  # noqa: E402
from scale.video import (  # noqa: E402
    Chunking,
    VideoJob,
    blend_weight,
    chunk_store,
    join_frame,
    plan_chunks,
    stylize_videos_on_ray,
)
from video.run import FrameStore, VideoSettings, stylize_frames  # noqa: E402
from video.synthetic import make_clip  # noqa: E402

STYLE = ROOT / "examples/starry_night.jpg"
CONFIG = dict(
    device="cpu", size=64, min_size=32, steps=4, style_layers=("relu1_1", "relu2_1"), content_layers=("relu2_1",)
)


def clip(frames, size=(48, 64)):
    photo = load_image(ROOT / "examples/tubingen.jpg")
    return make_clip(photo, 1 - photo.flip(-1), frames, size)


# ------------------------------------------------------------------------------------------------ no Ray


def test_chunks_cover_every_frame_and_neighbours_share_exactly_the_overlap():
    assert plan_chunks(10, Chunking(chunk=4, overlap=1)) == [(0, 4), (3, 7), (6, 10)]
    assert plan_chunks(11, Chunking(chunk=4, overlap=2)) == [(0, 4), (2, 6), (4, 8), (6, 10), (8, 11)]
    assert plan_chunks(3, Chunking(chunk=8, overlap=3)) == [(0, 3)]
    for total in range(1, 30):
        for chunk, overlap in ((5, 1), (5, 4), (7, 3), (2, 1)):
            plan = plan_chunks(total, Chunking(chunk=chunk, overlap=overlap))
            assert plan[0][0] == 0 and plan[-1][1] == total
            assert all(b - a <= chunk and b - a > min(overlap, total - 1) for a, b in plan)
            assert all(plan[i][1] - plan[i + 1][0] == overlap for i in range(len(plan) - 1))


def test_chunking_refuses_an_overlap_that_brings_no_new_frames():
    with pytest.raises(UserError, match="--overlap must be less than --chunk"):
        Chunking(chunk=3, overlap=3)
    with pytest.raises(UserError, match="--overlap must be a whole number of 1 or more, not 0"):
        Chunking(chunk=3, overlap=0)


def test_the_cross_fade_goes_linearly_from_the_earlier_chunk_to_the_later():
    plan = [(0, 5), (2, 7)]  # frames 2, 3, 4 shared
    assert [blend_weight(k, plan, 0) for k in (2, 3, 4)] == [0.25, 0.5, 0.75]
    assert [blend_weight(k, plan, 0, fade=False) for k in (2, 3, 4)] == [0.0, 1.0, 1.0]
    earlier, later = np.full((3, 2, 2), 0, np.uint8), np.full((3, 2, 2), 200, np.uint8)
    frame = lambda i, k: earlier if i == 0 else later  # noqa: E731
    assert [int(join_frame(k, plan, frame)[0, 0, 0]) for k in range(7)] == [0, 0, 50, 100, 150, 200, 200]


# ---------------------------------------------------------------------------------------------- real Ray

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield context.address_info["address"]
    ray.shutdown()


def _pixels(image: torch.Tensor) -> np.ndarray:
    return np.rint(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@pytest.mark.slow
def test_two_videos_in_chunks_join_every_frame_once_in_order_with_the_overlaps_cross_faded(cluster, tmp_path):
    torch.set_num_threads(1)
    config, settings, style = Config(**CONFIG), VideoSettings(), load_image(STYLE)
    clips = [clip(7), clip(5, size=(32, 48))]
    chunking = Chunking(chunk=4, overlap=2)
    stores = [FrameStore(tmp_path / f"v{v}", [f"f{k}.png" for k in range(len(c.frames))]) for v, c in enumerate(clips)]
    for s in stores:
        s.folder.mkdir()
    jobs = [
        VideoJob(frames=lambda c=c: iter(c.frames), styles=[style], store=s, size=tuple(c.frames.shape[-2:]))
        for c, s in zip(clips, stores)
    ]
    done = []
    stylize_videos_on_ray(jobs, config, settings, chunking, on_chunk=done.append, keep_chunks=True)
    assert sorted((d.video, d.chunk) for d in done) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    for c, store in zip(clips, stores):
        total = len(c.frames)
        plan = plan_chunks(total, chunking)
        assert sorted(p.name for p in store.folder.glob("*.png")) == sorted(store.names)  # every frame, once
        chunks = [chunk_store(store, i, span) for i, span in enumerate(plan)]
        for k in range(total):
            out = np.asarray(_pixels(store.load(k)), np.float64)
            owners = [i for i, (a, b) in enumerate(plan) if a <= k < b]
            mine = [np.asarray(_pixels(chunks[i].load(k - plan[i][0])), np.float64) for i in owners]
            if len(owners) == 1:
                assert np.array_equal(out, mine[0]), k  # frame k of the one chunk that has it: in order
            else:
                start, stop = plan[owners[1]][0], plan[owners[0]][1]
                a = (k - start + 1) / (stop - start + 1)
                assert np.array_equal(out, np.rint((1 - a) * mine[0] + a * mine[1])), k
                assert not np.array_equal(mine[0], mine[1])  # the seam: the chunks disagree there
    # As if stopped before chunk 1 of the first video was saved (and before the join): only that chunk runs
    # again, and the joined frames are those of the uninterrupted run.
    joined = {k: stores[0].path(k).read_bytes() for k in range(7)}
    for k in range(7):
        stores[0].path(k).unlink()
    lost = chunk_store(stores[0], 1, plan_chunks(7, chunking)[1])
    lost.path(2).unlink()
    again = []
    stylize_videos_on_ray(jobs, config, settings, chunking, on_chunk=again.append)
    assert [(d.video, d.chunk) for d in again] == [(0, 1)]
    assert {k: stores[0].path(k).read_bytes() for k in range(7)} == joined
    assert not list(stores[0].folder.glob("chunk_*"))  # removed once joined (kept only when asked)


@pytest.mark.slow
def test_one_chunk_as_long_as_the_video_equals_the_single_process_run_bit_for_bit(cluster, tmp_path):
    torch.set_num_threads(1)
    config, settings, style = Config(**CONFIG), VideoSettings(), load_image(STYLE)
    c = clip(4)
    size = tuple(c.frames.shape[-2:])
    names = [f"f{k}.png" for k in range(4)]
    plain, chunked = FrameStore(tmp_path / "plain", names), FrameStore(tmp_path / "ray", names)
    plain.folder.mkdir(), chunked.folder.mkdir()
    stylize_frames(iter(c.frames), [style], config, settings, plain, size)
    job = VideoJob(frames=lambda: iter(c.frames), styles=[style], store=chunked, size=size)
    stylize_videos_on_ray([job], config, settings, Chunking(chunk=6, overlap=2))
    for k in range(4):
        assert plain.path(k).read_bytes() == chunked.path(k).read_bytes(), k


def nst(*args, cwd):
    code = "import sys; from cli.main import main; sys.exit(main())"
    env = {**ENV, "HOME": os.path.expanduser("~"), "RAY_AUTH_MODE": "token"}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


FLAGS = ["-s", "64", "--min-size", "32", "-n", "4", "--style-layers", "relu1_1,relu2_1", "--content-layers", "relu2_1"]
FLAGS += ["--device", "cpu", "-q", "--keep-frames"]


@pytest.mark.slow
def test_the_cli_runs_a_video_in_chunks_on_ray(cluster, tmp_path):
    import av

    frames = clip(6).frames
    with av.open(str(tmp_path / "clip.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(12))
        stream.height, stream.width, stream.pix_fmt, stream.options = 48, 64, "yuv420p", {"crf": "8"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(_pixels(f), format="rgb24")))
        out.mux(stream.encode(None))
    chunked = ("stylize", "clip.mp4", STYLE, "-o", "ray.mp4", *FLAGS, "--ray", cluster, "--chunk", "4")
    done = nst(*chunked, "--overlap", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ray.mp4").is_file() and "6 frames" in done.stdout
    work = tmp_path / "ray.mp4.frames"
    assert len(list(work.glob("frame_*.png"))) == 6 and len(list(work.glob("chunk_000[01]/*.png"))) == 8
    bad = nst("stylize", "clip.mp4", STYLE, "-o", "x.mp4", *FLAGS, "--chunk", "4", cwd=tmp_path)
    assert bad.returncode != 0
    sentence = "--chunk and --overlap cut a video into Ray tasks; add --ray, or drop them"
    assert one_error_line(bad) == f"nst: error: {sentence}"
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "x.mp4.frames").exists()


@pytest.mark.slow
def test_a_chunk_that_fails_is_one_sentence_naming_it(cluster, tmp_path):
    frames = torch.full((3, 3, 16, 16), float("nan"))  # the engine refuses the frame in one sentence
    store = FrameStore(tmp_path / "out", [f"f{k}.png" for k in range(3)])
    store.folder.mkdir()
    job = VideoJob(frames=lambda: iter(frames), styles=[load_image(STYLE)], store=store, size=(16, 16))
    with pytest.raises(UserError) as caught:
        stylize_videos_on_ray([job], Config(**CONFIG), VideoSettings(), Chunking(chunk=2, overlap=1))
    sentence = str(caught.value)
    assert sentence.startswith("chunk ") and " of video 1 failed: " in sentence and "\n" not in sentence
    assert sentence.endswith("has NaN or infinite values"), sentence  # the engine's own sentence, passed on
    assert not list(store.folder.glob("*.png"))  # no joined frame from a run that failed
