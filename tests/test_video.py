"""Video mode (video/): flow and masks against a known motion, the temporal term's effect, resuming, files.

The clips are made here from the sample photo (video/synthetic.py: a camera pan with known flow and a
textured square moving against it) and written as real video files by PyAV; nothing is downloaded.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import ENV, ROOT, one_error_line, tree

av = pytest.importorskip("av")
pytest.importorskip("cv2")

from cli.main import main  # noqa: E402
from engine import Config  # noqa: E402
from engine.control import Control, Stopped  # noqa: E402
from engine.images import load_image  # noqa: E402
from video import flow as fl  # noqa: E402
from video import io  # noqa: E402
from video.measure import warping_error  # noqa: E402
from video.run import FrameStore, VideoSettings, stylize_frames, temporal_target  # noqa: E402
from video.synthetic import make_clip  # noqa: E402

STYLE = ROOT / "examples/starry_night.jpg"
TINY = dict(device="cpu", style_layers=("relu1_1", "relu2_1", "relu3_1"), content_layers=("relu2_1",))


def clip(frames=4, size=(48, 64), zoom=0.0):
    photo = load_image(ROOT / "examples/tubingen.jpg")
    patch = 1 - photo.flip(-1)  # a textured square that looks like nothing in the background
    return make_clip(photo, patch, frames, size, zoom=zoom)


def write_video(path, frames, fps=Fraction(12), audio=False, codec="libx264"):
    """``frames`` ((T, 3, H, W) in [0, 1]) as a real video file; ``audio``: a second of a tone beside it."""
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=fps)
        video.height, video.width = frames.shape[-2:]
        video.pix_fmt = "yuv420p"
        if codec == "libx264":
            video.options = {"crf": "8"}
        sound = out.add_stream("aac", rate=16000) if audio else None  # every stream before the first packet
        for f in frames:
            rgb = np.rint(f.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(video.encode(None))
        if audio:
            tone = (np.sin(np.arange(16000) / 8) * 4000).astype(np.int16)[None]
            for start in range(0, 16000, 1024):
                frame = av.AudioFrame.from_ndarray(tone[:, start : start + 1024], format="s16", layout="mono")
                frame.sample_rate, frame.pts = 16000, start
                out.mux(sound.encode(frame))
            out.mux(sound.encode(None))
    return path


def nst(*args, cwd, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


# ------------------------------------------------------------------------------------------ flow and masks


@pytest.mark.parametrize("zoom", [0.0, 0.03], ids=["pan", "pan-and-zoom"])
def test_flow_and_masks_match_the_known_motion(zoom):
    c = clip(zoom=zoom)
    for t in range(1, len(c.frames)):
        backward = fl.dis_flow(c.frames[t], c.frames[t - 1])
        forward = fl.dis_flow(c.frames[t - 1], c.frames[t])
        reliable = fl.reliability(forward, backward).bool()
        error = (backward - c.flows[t]).pow(2).sum(0).sqrt()
        assert float(error[reliable].median()) < 0.5  # px, where the weights trust the flow
        # Disoccluded pixels (behind the moving square, and where the pan brings in new ones) are caught ...
        assert float((~reliable)[c.hidden[t]].float().mean()) > 0.9
        # ... and away from the square's edges, where the flow is plain, nearly every pixel is trusted.
        edges = c.square[t] | c.square[t - 1]
        near = torch.nn.functional.max_pool2d(edges[None, None].float(), 9, 1, 4)[0, 0].bool()
        plain = ~near & ~c.hidden[t]
        # DIS fits a shift per patch; under a zoom each patch is also scaled, so a few more fail the check.
        assert float(reliable[plain].float().mean()) > (0.9 if not zoom else 0.85)


def test_warping_by_the_known_flow_gives_the_next_frame_where_it_is_visible():
    c = clip()
    warped = fl.warp(c.frames[1 - 1], c.flows[1])
    visible = ~c.hidden[1]
    assert float((warped - c.frames[1]).abs().amax(0)[visible].max()) < 1e-5  # whole-pixel shifts: exact


def test_a_zooming_clip_has_the_flow_of_a_zoom():
    c = clip(frames=3, zoom=0.05)
    # The background's flow points towards the centre and grows with the distance from it (the square moves left).
    flow = c.flows[1]
    assert float(flow[0, 24, 2]) > 1.0 + float(flow[0, 24, 61]) and float(flow[1, 2, 32]) > float(flow[1, 45, 32])
    visible = ~c.hidden[1] & ~c.square[1] & ~c.square[0]
    warped = fl.warp(c.frames[0], flow)
    # Resampled twice (the frame, then the warp), so not exact, but far closer than the frame before it.
    assert float((warped - c.frames[1]).abs()[:, visible].mean()) < 0.25 * float(
        (c.frames[0] - c.frames[1]).abs()[:, visible].mean()
    )


def test_long_term_weights_take_the_nearest_frame_that_shows_a_pixel():
    a, b, d = (torch.tensor([1.0, 0, 0, 1]), torch.tensor([1.0, 1, 0, 0]), torch.tensor([1.0, 1, 1, 0]))
    kept = fl.long_term_weights([a, b, d])
    assert [k.tolist() for k in kept] == [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]]


def test_the_init_takes_the_content_where_the_flow_is_unreliable():
    c = clip(frames=2)
    previous = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))
    init, target, weight = temporal_target(c.frames[1], [c.frames[0]], [previous])
    free = weight == 0
    assert free.any() and (~free).any()
    assert torch.equal(init[:, free], c.frames[1][:, free])
    backward = fl.dis_flow(c.frames[1], c.frames[0])
    torch.testing.assert_close(init[:, ~free], fl.warp(previous, backward)[:, ~free])


# ------------------------------------------------------------------------------------------ the temporal term


def stylise(c, settings, tmp_path, name, steps=16, size=64):
    config = Config(size=size, min_size=size // 2, steps=steps, **TINY)
    store = FrameStore(tmp_path / name, [f"{k:03d}.png" for k in range(len(c.frames))])
    store.folder.mkdir()
    style = load_image(STYLE)
    stylize_frames(list(c.frames), [style], config, settings, store, tuple(c.frames.shape[-2:]))
    return [store.load(k) for k in range(len(c.frames))]


@pytest.mark.slow
def test_temporal_consistency_beats_independent_frames_without_ghosts(tmp_path):
    c = clip(frames=5)
    contents = list(c.frames)
    independent = stylise(c, VideoSettings(independent=True), tmp_path, "independent")
    temporal = stylise(c, VideoSettings(), tmp_path, "temporal")
    floor, flicker, steady = (warping_error(x, contents) for x in (contents, independent, temporal))
    assert steady <= 0.3 * flicker, (floor, flicker, steady)
    # No ghosting: where the square uncovers background, the temporal frames show that background as an
    # independent stylisation of it does, not the square's stylised texture carried along by the warp.
    for t in range(1, len(contents)):
        gone = c.hidden[t] & ~fl.motion_boundary(c.flows[t])  # behind the square (and at the border)
        ghost = fl.warp(temporal[t - 1], c.flows[t])  # what a plain warp would leave there
        own = (temporal[t] - independent[t])[:, gone].pow(2).mean()
        carried = (ghost - independent[t])[:, gone].pow(2).mean()
        towards_content = (temporal[t] - contents[t])[:, gone].pow(2).mean()
        alone = (independent[t] - contents[t])[:, gone].pow(2).mean()
        assert own < carried and towards_content <= 1.25 * alone, (t, own, carried, towards_content, alone)


def test_a_resumed_frame_loop_writes_the_frames_of_an_uninterrupted_one(tmp_path):
    c = clip(frames=3, size=(32, 48))
    whole = stylise(c, VideoSettings(long_term=True), tmp_path, "whole", steps=4, size=48)
    config = Config(size=48, min_size=24, steps=4, **TINY)
    store = FrameStore(tmp_path / "parts", [f"{k:03d}.png" for k in range(3)])
    store.folder.mkdir()

    def stop_in_the_third_frame():
        if store.done(1):  # the first step of frame 2
            control.cancel("stopped in the third frame")

    control = Control(watch=stop_in_the_third_frame)
    style = load_image(STYLE)
    settings = VideoSettings(long_term=True)
    with pytest.raises(Stopped):
        stylize_frames(list(c.frames), [style], config, settings, store, (32, 48), control=control)
    assert [store.done(k) for k in range(3)] == [True, True, False]
    stylize_frames(list(c.frames), [style], config, settings, store, (32, 48))
    for k in range(3):
        assert torch.equal(store.load(k), whole[k]), k


# ------------------------------------------------------------------------------------------ files and the CLI


def test_video_files_round_trip_with_rate_range_and_audio(tmp_path):
    c = clip(frames=6)
    source = write_video(tmp_path / "in.mp4", c.frames, fps=Fraction(15), audio=True)
    info = io.probe(source, io.Span(2, 5))
    assert (info.frames, info.height, info.width, info.fps, info.audio) == (3, 48, 64, Fraction(15), True)
    frames = list(io.read_frames(source, io.Span(2, 5)))
    assert len(frames) == 3 and float((frames[0] - c.frames[2]).abs().mean()) < 0.03  # lossy, but that frame
    out = tmp_path / "out.mp4"
    rgb = (np.rint(f.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for f in frames)
    io.encode(rgb, out, info.fps, overwrite=False, audio_from=str(source), span=io.Span(2, 5))
    with av.open(str(out)) as back:
        assert back.streams.video[0].average_rate == 15 and back.streams.audio
        assert sum(1 for _ in back.decode(video=0)) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


@pytest.mark.slow
def test_cli_stylizes_a_video_and_resumes_after_sigint_to_the_same_video(tmp_path):
    c = clip(frames=5)
    write_video(tmp_path / "in.mp4", c.frames, audio=True)
    args = ["stylize", "in.mp4", STYLE, "-s", 64, "--min-size", 32, "-n", 6, "--style-layers", "relu1_1,relu2_1"]
    args += ["--content-layers", "relu2_1", "--device", "cpu"]
    nst(*args, "-o", "plain.mp4", cwd=tmp_path)
    assert not (tmp_path / "plain.mp4.frames").exists()  # the work folder goes once the video is written
    nst(*args, "-o", "whole.mp4", "--keep-frames", cwd=tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *map(str, args), "-o", "parts.mp4"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    work = tmp_path / "parts.mp4.frames"
    deadline = time.monotonic() + 120
    while not (work / "frame_000001.png").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command again" in err and not (tmp_path / "parts.mp4").exists()
    kept = sorted(p.name for p in work.glob("frame_*.png"))
    assert 2 <= len(kept) < 5
    again = nst(*args, "-o", "parts.mp4", "--keep-frames", cwd=tmp_path)
    assert f"going on at frame {len(kept) + 1}/5" in again.stderr
    # The stylised frames are bit for bit those of the uninterrupted run. (The H.264 bits of the two videos
    # may still differ: x264 does not always encode the same frames to the same bits.)
    assert tree(tmp_path / "whole.mp4.frames") == tree(work)
    decoded = [list(io.read_frames(tmp_path / name)) for name in ("whole.mp4", "parts.mp4")]
    assert len(decoded[0]) == len(decoded[1]) == 5
    assert all(float((a - b).abs().mean()) < 0.02 for a, b in zip(*decoded))
    with av.open(str(tmp_path / "parts.mp4")) as back:
        assert back.streams.audio and back.streams.video[0].average_rate == 12


@pytest.mark.slow
def test_cli_frames_dir_in_and_out(tmp_path):
    from engine.images import save_image

    c = clip(frames=3)
    (tmp_path / "frames").mkdir()
    for k, frame in enumerate(c.frames):
        save_image(frame, tmp_path / "frames" / f"f{k:02d}.png")
    args = ["stylize", "frames", STYLE, "-o", "styled", "--frames-dir", "-s", 64, "--min-size", 32, "-n", 4]
    nst(*args, "--style-layers", "relu1_1,relu2_1", "--content-layers", "relu2_1", "--device", "cpu", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "styled").glob("*.png")) == ["f00.png", "f01.png", "f02.png"]


def test_bad_inputs_get_one_sentence_and_leave_nothing(tmp_path, monkeypatch, capsys):
    c = clip(frames=3)
    write_video(tmp_path / "ok.mp4", c.frames)
    (tmp_path / "text.mp4").write_text("not a video")
    with av.open(str(tmp_path / "empty.avi"), "w") as out:  # a video stream without a single frame
        stream = out.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
    # A frame size change midway: two H.264 streams of different sizes, one after the other, in MPEG-TS.
    raw = b"".join(_h264(w, h) for w, h in ((64, 48), (48, 64)))
    (tmp_path / "raw.h264").write_bytes(raw)
    with av.open(str(tmp_path / "raw.h264")) as src, av.open(str(tmp_path / "resized.ts"), "w") as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for i, packet in enumerate(p for p in src.demux(video=0) if p.size):
            packet.pts = packet.dts = i * 7500
            packet.stream = stream
            out.mux(packet)
    (tmp_path / "raw.h264").unlink()
    (tmp_path / "taken.mp4").write_bytes(b"the user's file")
    before = tree(tmp_path)
    cases = {
        ("text.mp4", "-o", "a.mp4"): "could not be read as a video",
        ("empty.avi", "-o", "a.mp4"): "has no frames",
        ("ok.mp4", "-o", "a.mp4", "--frames", "7:9"): "has no frames in --frames 7:9",
        ("resized.ts", "-o", "a.mp4"): "changes its frame size at frame 2, from 64x48 to 48x64",
        ("ok.mp4", "-o", "a.mp4", "--max-pixels", 1000): "above the",
        ("ok.mp4", "-o", "taken.mp4"): "already exists",
        ("ok.mp4", "-o", "a.png"): "must end in .mp4",
        ("ok.mp4", "-o", "a.mp4", "--frames", "5:2"): "--frames must be A:B",
    }
    monkeypatch.chdir(tmp_path)
    for extra, expected in cases.items():  # in this process: the checks come before any work
        code = main(["stylize", extra[0], str(STYLE), *map(str, extra[1:]), "-s", "64", "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        assert expected in one_error_line(subprocess.CompletedProcess([], code, "", err)), (extra, err)
    assert tree(tmp_path) == before  # nothing written, nothing touched


def _h264(width, height, frames=2):
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt, codec.time_base = width, height, "yuv420p", Fraction(1, 12)
    data = b""
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 90, np.uint8), format="rgb24")
        frame = frame.reformat(format="yuv420p")
        frame.pts = i
        data += b"".join(bytes(p) for p in codec.encode(frame))
    return data + b"".join(bytes(p) for p in codec.encode(None))


def test_a_plain_folder_still_means_independent_images_and_frames_needs_a_video(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pics").mkdir()
    assert main(["stylize", "pics", str(STYLE), "-o", "out", "--frames", "0:2"]) == 2
    assert "'pics' is not a video file" in capsys.readouterr().err
    assert main(["stylize", "pics", str(STYLE), "-o", "out"]) == 2  # the folder of images it always was
    assert "has no images" in capsys.readouterr().err


def test_only_video_extensions_switch_to_video_mode():
    from argparse import Namespace

    from cli.video import wants_video

    assert wants_video(Namespace(content="clip.MP4", frames=None, frames_dir=False))
    assert wants_video(Namespace(content="frames", frames=None, frames_dir=True))
    for image in ("photo.jpg", "anim.gif", "folder"):  # a GIF has always been an image, its first frame
        assert not wants_video(Namespace(content=image, frames=None, frames_dir=False))
