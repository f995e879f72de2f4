"""The pictures of a run: ``nst plot`` (the loss curve of a ``--log`` file) and ``--animate`` (its snapshots).

Drawing is the shell's business: the engine writes the log (``engine.runlog``) and the snapshots; this
module reads them back with matplotlib and Pillow (and imageio-ffmpeg for ``.mp4``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from engine.errors import UserError
from engine.files import check_writable, write_atomically

PLOT_FORMATS = (".png", ".svg", ".pdf")
ANIMATION_FORMATS = (".gif", ".mp4")
FRAME_SECONDS = 0.1  # each snapshot's time on screen; the result, last, stays HOLD_SECONDS
HOLD_SECONDS = 1.0


def check_plot_output(output: Path, overwrite: bool) -> None:
    if Path(output).suffix.lower() not in PLOT_FORMATS:
        raise UserError(f"plot {str(output)!r} must end in one of {', '.join(PLOT_FORMATS)}")
    check_writable(output, overwrite, what="plot")


def plot_log(records: Sequence[dict], output: Path, overwrite: bool, title: Optional[str] = None) -> Path:
    """The loss curve of ``records``: the total and each part against the step, log scale, scales marked."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    except ImportError:
        raise UserError("nst plot needs matplotlib; install it with: pip install matplotlib") from None
    check_plot_output(output, overwrite)
    x = [r["total_step"] for r in records]
    series = {"total": [r["loss"] for r in records]}
    for name in dict.fromkeys(k for r in records for k in r["parts"]):
        series[name] = [r["parts"].get(name) for r in records]
    figure = Figure(figsize=(9, 4.5), dpi=120)
    axes = figure.add_subplot()
    scales = [r["scale"] for r in records]
    for index, (name, values) in enumerate(series.items()):
        colour = f"C{index}"
        for scale in dict.fromkeys(scales):  # one line per scale: the jump between scales is not a step
            # A log scale cannot show 0 (a part whose weight or layers are off): such points are left out.
            points = [(s, v) for s, v, k in zip(x, values, scales) if k == scale and v is not None and v > 0]
            if points:
                width = 2.0 if name == "total" else 1.2
                axes.plot(*zip(*points), color=colour, linewidth=width, label=name if scale == scales[0] else None)
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (parts unweighted)")
    for i, record in enumerate(records):
        if i == 0 or record["scale"] != records[i - 1]["scale"]:
            if i:
                axes.axvline(x[i] - 0.5, color="grey", linestyle="--", linewidth=0.8)
            size = f" {record['width']}x{record['height']}" if "width" in record else ""
            axes.annotate(
                f"scale {record['scale']}{size}",
                (x[i], 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -3),
                textcoords="offset points",
                va="top",
                fontsize=8,
                color="dimgrey",
            )
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    axes.grid(True, which="major", alpha=0.3)
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()
    fmt = Path(output).suffix.lower()[1:]
    return write_atomically(output, lambda fh: figure.savefig(fh, format=fmt), overwrite, what="plot")


def check_animation(output: Path, overwrite: bool, snapshot_every: int) -> None:
    """Fail before the run when ``--animate`` cannot be written as asked."""
    ext = Path(output).suffix.lower()
    if ext not in ANIMATION_FORMATS:
        raise UserError(f"--animate {str(output)!r} must end in .gif or .mp4")
    if ext == ".mp4" and not _has_ffmpeg():
        raise UserError(
            f"--animate {str(output)!r}: writing .mp4 needs the imageio-ffmpeg package "
            "(pip install imageio-ffmpeg); use a .gif instead"
        )
    if snapshot_every <= 0:
        raise UserError("--animate needs --snapshot-every N: its frames are the snapshots taken every N steps")
    check_writable(output, overwrite, what="animation")


def _has_ffmpeg() -> bool:
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def write_animation(frames: Sequence[Path], result, output: Path, overwrite: bool) -> Path:
    """The snapshots ``frames`` (in order) and then the ``result`` image, as a GIF or an MP4 at the result's size.

    Snapshots of earlier, smaller scales are resized up to it.
    """
    import numpy as np
    from PIL import Image

    from engine.images import load_image, to_pil

    last = to_pil(result)
    size = last.size
    pictures = [to_pil(load_image(p, what="snapshot")).resize(size, Image.BICUBIC) for p in frames] + [last]
    if Path(output).suffix.lower() == ".gif":
        durations = [round(FRAME_SECONDS * 1000)] * (len(pictures) - 1) + [round(HOLD_SECONDS * 1000)]

        def write(fh):
            pictures[0].save(
                fh, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0, optimize=False
            )

        return write_atomically(output, write, overwrite, what="animation")
    return _write_mp4([np.asarray(p) for p in pictures], output, overwrite)


def _write_mp4(arrays, output: Path, overwrite: bool) -> Path:
    import os

    import imageio_ffmpeg
    import numpy as np

    from engine.files import create_temporary, publish

    height, width = (d - d % 2 for d in arrays[0].shape[:2])  # H.264 in yuv420p wants even sides
    fd, tmp = create_temporary(Path(output))
    os.close(fd)
    try:
        fps = round(1 / FRAME_SECONDS)
        writer = imageio_ffmpeg.write_frames(
            tmp, (width, height), fps=fps, macro_block_size=1, output_params=["-f", "mp4"]
        )
        writer.send(None)
        for i, frame in enumerate(arrays):
            repeats = round(HOLD_SECONDS * fps) if i == len(arrays) - 1 else 1
            for _ in range(repeats):
                writer.send(np.ascontiguousarray(frame[:height, :width]))
        writer.close()
        publish(tmp, Path(output), overwrite, what="animation")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Path(output)
