"""Decoding and encoding video with PyAV (FFmpeg, shipped in its wheels).

Input: any container FFmpeg reads; the first video stream is used. Every frame is decoded once before
any work (``probe``) so that a file that is not a video, has no frames, or changes its frame size midway
is refused in one sentence while nothing has been written. Output: H.264 (libx264, yuv420p) in an mp4,
mov or mkv container at the input's frame rate, with the input's first audio track copied (packets as
they are, no re-encoding), cut to the frames taken when ``--frames`` takes a range.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from engine.errors import UserError
from engine.files import create_temporary, publish

# Not .gif: a GIF content has always been an image (its first frame), and stays one.
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".ts", ".mpg", ".mpeg")
OUTPUT_CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}
CRF = 16  # x264's quality: visually lossless for stylised frames, whose brush texture costs bits


def is_video(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class Span:
    """Frames ``start`` to ``stop`` (exclusive; None: to the end), as ``--frames A:B`` gives them."""

    start: int = 0
    stop: Optional[int] = None

    @classmethod
    def parse(cls, text: Optional[str]) -> "Span":
        if not text:
            return cls()
        a, sep, b = text.partition(":")
        try:
            start = int(a) if a.strip() else 0
            stop = int(b) if b.strip() else None
        except ValueError:
            start = -1
        if not sep or start < 0 or (stop is not None and stop <= start):
            raise UserError(
                f"--frames must be A:B, the first frame (from 0) and the frame after the last, with A < B "
                f"(either may be left out), not {text!r}"
            )
        return cls(start, stop)

    def __contains__(self, index: int) -> bool:
        return index >= self.start and (self.stop is None or index < self.stop)


@dataclass(frozen=True)
class VideoInfo:
    path: str
    frames: int  # in the span
    height: int
    width: int
    fps: Fraction
    audio: bool


def _open(path):
    import av

    if not Path(path).is_file():
        raise UserError(f"content video {str(path)!r} does not exist")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise UserError(f"content {str(path)!r} could not be read as a video ({str(exc)[:100]})") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"content {str(path)!r} has no video stream")
    return container


def probe(path, span: Span = Span()) -> VideoInfo:
    """Decode every frame of the span once: its count, size, rate, and whether there is audio to copy."""
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        count, size = 0, None
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index not in span:
                    if span.stop is not None and index >= span.stop:
                        break
                    continue
                if size is None:
                    size = (frame.height, frame.width)
                elif (frame.height, frame.width) != size:
                    raise UserError(
                        f"content video {str(path)!r} changes its frame size at frame {index}, from "
                        f"{size[1]}x{size[0]} to {frame.width}x{frame.height}; convert it to one size first"
                    )
                count += 1
        except av.error.FFmpegError as exc:
            raise UserError(f"content video {str(path)!r} could not be decoded ({str(exc)[:100]})") from None
        if count == 0:
            where = "" if span == Span() else f" in --frames {span.start}:{'' if span.stop is None else span.stop}"
            raise UserError(f"content video {str(path)!r} has no frames{where}")
        return VideoInfo(str(path), count, size[0], size[1], Fraction(rate), bool(container.streams.audio))
    finally:
        container.close()


def read_frames(path, span: Span = Span()) -> Iterator[torch.Tensor]:
    """The span's frames as ``(3, H, W)`` float32 tensors in [0, 1], in order (checked by ``probe`` first)."""
    container = _open(path)
    try:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if span.stop is not None and index >= span.stop:
                break
            if index in span:
                rgb = frame.to_ndarray(format="rgb24")
                yield torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255)
    finally:
        container.close()


def even_size(height: int, width: int) -> tuple[int, int]:
    """H.264 in yuv420p halves the colour planes: both sides must be even (one row or column is dropped)."""
    return max(2, height - height % 2), max(2, width - width % 2)


def check_output(path, overwrite: bool) -> Path:
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_CONTAINERS:
        raise UserError(
            f"video output {str(path)!r} must end in {', '.join(OUTPUT_CONTAINERS)} (H.264), "
            "or use --frames-dir for a folder of frames"
        )
    from engine.files import check_writable

    return check_writable(path, overwrite, "video output")


def encode(
    frames: Iterable[np.ndarray],
    output,
    fps: Fraction,
    overwrite: bool,
    audio_from: Optional[str] = None,
    span: Span = Span(),
    crf: int = CRF,
) -> Path:
    """Write ``(H, W, 3)`` uint8 frames as H.264 at ``fps`` to ``output`` atomically (a hidden file beside it,
    renamed at the end); ``audio_from``: a video whose first audio track is copied, cut to ``span``; ``crf``:
    x264's quality (lower is better and larger)."""
    import av

    output = Path(output)
    fd, tmp = create_temporary(output)
    os.close(fd)
    try:
        with av.open(tmp, "w", format=OUTPUT_CONTAINERS[output.suffix.lower()]) as out:
            video = out.add_stream("libx264", rate=fps)
            video.pix_fmt = "yuv420p"
            # One thread, lookahead included: with its threads x264 made different bits from run to run for the
            # same frames. (Some content still varies in its last bits; the frames themselves never do.)
            video.options = {"crf": str(crf), "x264-params": "threads=1:lookahead-threads=1"}
            source = av.open(audio_from) if audio_from else None
            try:
                audio_in = source.streams.audio[0] if source is not None and source.streams.audio else None
                audio_out = out.add_stream_from_template(audio_in) if audio_in is not None else None
                frames = iter(frames)
                first = next(frames)
                video.height, video.width = first.shape[:2]  # before the first frame: PyAV's default is 640x480
                for index, arr in enumerate(itertools.chain([first], frames)):
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
                    frame.pts = index
                    out.mux(video.encode(frame))
                out.mux(video.encode(None))
                if audio_in is not None:
                    _copy_audio(source, audio_in, audio_out, out, fps, span)
            finally:
                if source is not None:
                    source.close()
        publish(tmp, output, overwrite, "video output")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output


def _copy_audio(source, audio_in, audio_out, out, fps: Fraction, span: Span) -> None:
    """The audio packets of the span's time, shifted to start with the video (cut to whole packets)."""
    base = audio_in.time_base
    start = Fraction(span.start) / fps
    stop = None if span.stop is None else Fraction(span.stop) / fps
    shift = int(start / base)
    for packet in source.demux(audio_in):
        if packet.pts is None or packet.dts is None:
            continue  # the demuxer's final empty packet
        at = packet.pts * base
        if at < start or (stop is not None and at >= stop):
            continue
        packet.pts -= shift
        packet.dts -= shift
        packet.stream = audio_out
        out.mux(packet)
