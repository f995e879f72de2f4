"""Running ``nst stylize`` and ``nst resume``: progress, snapshots, checkpoints, signals, folders.

Nothing the user had is lost: outputs are written atomically and never over
an existing file without ``--overwrite``; SIGINT and SIGTERM finish the
current step, then write the current image and a checkpoint and exit
130 / 143; ``nst resume CHECKPOINT`` goes on to the same result as an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.control import Control
from engine.errors import UserError, is_out_of_memory, plural

from .signals import StopOnSignal


class ProgressBar:
    """A tqdm bar made at the first step, so that a run failing before it leaves no empty bar behind.

    When stderr is not a terminal (a log file, a pipe) there is no bar, whose carriage returns would
    fill the log: a plain line every ``LOG_LINES``-th of the run instead.
    """

    LOG_LINES = 10

    def __init__(self, quiet: bool, file=None):
        self.quiet, self.bar, self.file = quiet, None, file
        self.plain = not quiet and file is None and not sys.stderr.isatty()  # a given file gets the bar

    def callback(self, describe, then=None, image_every: int = 0):
        """The step callback every nst command runs with: the bar, labelled ``describe(info)``, then
        ``then(info)``. The losses are read from the device in groups (``engine.optimize.Callback``), so
        a CUDA run does not wait at every step; ``info.image`` is built every ``image_every`` steps only."""
        from engine.optimize import Callback

        def on_step(info):
            self.step(info, describe(info))
            if then is not None:
                then(info)

        return Callback(on_step, image_due=lambda total_step: bool(image_every) and total_step % image_every == 0)

    def step(self, info, description: str) -> None:
        if self.quiet:
            return
        # A batch's loss is the sum over its images; each image's is what compares across runs.
        loss = info.loss / max(1, len(info.jobs))
        if self.plain:
            every = max(1, info.total_steps // self.LOG_LINES)
            if info.total_step % every == 0 or info.total_step == info.total_steps:
                print(
                    f"{description}: step {info.total_step}/{info.total_steps}, loss {loss:.4g}",
                    file=self.file or sys.stderr,
                )
            return
        if self.bar is None:
            from tqdm import tqdm

            # A resumed run starts where it stopped, not at 0.
            self.bar = tqdm(
                total=info.total_steps,
                initial=info.total_step - 1,
                desc=description,
                unit="step",
                dynamic_ncols=True,
                file=self.file or sys.stderr,
            )
        elif info.step == 1:
            # Label first: reset() redraws, and must not show the last batch's label and loss at 0%.
            self.bar.set_description(description, refresh=False)
            if info.total_step == 1:  # the next batch of a folder, or the next run of a comparison
                self.bar.set_postfix_str("", refresh=False)
                self.bar.reset(total=info.total_steps)
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {loss:.4g}" + ("/image" if len(info.jobs) > 1 else ""), refresh=False)

    def write(self, text: str) -> None:
        """A line of results (shown even with --quiet, which only hides the bar)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True, kw_only=True)
class FileJob:
    """One ``nst stylize`` job from files to a file: what a checkpoint keeps so that ``nst resume`` can finish it."""

    content: str
    styles: tuple[str, ...]
    output: str
    overwrite: bool = False
    bit_depth: int = 8
    snapshot_every: int = 0
    checkpoint_every: int = 0
    log: Optional[str] = None
    animate: Optional[str] = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "FileJob":
        return cls(
            content=args.content,
            styles=tuple(args.styles),
            output=args.output,
            overwrite=args.overwrite,
            bit_depth=args.bit_depth,
            snapshot_every=args.snapshot_every,
            checkpoint_every=args.checkpoint_every,
            log=args.log,
            animate=args.animate,
        )

    @classmethod
    def from_state(cls, state: dict) -> "FileJob":
        """The job a checkpoint's ``cli`` entry holds (lists, as a checkpoint stores them)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in state.items() if k in known}
        return cls(**{**values, "styles": tuple(values.get("styles", ()))})

    def to_state(self) -> dict:
        """Plain values with absolute paths, for a checkpoint (so that ``nst resume`` works from anywhere)."""
        absolute = lambda p: str(Path(p).resolve()) if Path(p).exists() or p == self.output else p  # noqa: E731
        written = lambda p: str(Path(p).resolve()) if p else p  # noqa: E731  (outputs: they need not exist yet)
        return dict(
            dataclasses.asdict(self),
            content=absolute(self.content),
            styles=[absolute(p) for p in self.styles],
            output=absolute(self.output),
            log=written(self.log),
            animate=written(self.animate),
        )


def prepare_stylize(args: argparse.Namespace):
    """``nst stylize``'s arguments for one image, checked and made into ``(job, config, resume)`` for
    ``run_file_job`` (``scale.tiled`` calls it too: the processes there share one image)."""
    from .options import config_from_args
    from .video import wants_video

    if wants_video(args):
        raise UserError("processes share one image, not a video's frames; run the video with nst stylize alone")
    config = config_from_args(args)
    if Path(args.content).is_dir():
        raise UserError("processes share one image, not a folder of contents; a folder's jobs go to --ray")
    if getattr(args, "ray", None) is not None:
        raise UserError("--ray runs the jobs of a folder of contents; give a folder, or drop --ray for one image")
    if args.output_format:
        raise UserError(
            "--output-format applies to a folder of contents; a single output takes its format from its extension"
        )
    return FileJob.from_args(args), config, _resume_of(args)


def prepare_resume(args: argparse.Namespace):
    """``nst resume``'s argument made into ``(job, config, resume)``: all as stored in the checkpoint."""
    from engine import checkpoint

    state = checkpoint.load(args.checkpoint)
    state["path"] = args.checkpoint
    if not (state.get("cli") or {}).get("output"):
        raise UserError(
            f"checkpoint {args.checkpoint!r} was written from Python, not by nst stylize; "
            "resume it with engine.stylize(..., resume=...)"
        )
    job = FileJob.from_state(state["cli"])
    job = dataclasses.replace(job, overwrite=job.overwrite or args.overwrite)
    return job, checkpoint.config_from_state(state["config"]), state


def run_stylize(args: argparse.Namespace) -> int:
    """``nst stylize``: one image, a folder of them, or a video (``video/``: a video file, or ``--frames-dir``)."""
    from .options import config_from_args
    from .video import run_video, wants_video

    if wants_video(args):
        return run_video(args)
    config = config_from_args(args)
    if Path(args.content).is_dir():
        if args.checkpoint_every or args.resume:
            raise UserError("--checkpoint-every and --resume work with one content image, not a folder")
        if args.log or args.animate:
            raise UserError("--log and --animate work with one content image, not a folder")
        return run_folder(args, config)
    job, config, resume = prepare_stylize(args)
    return run_file_job(job, config, resume=resume, quiet=args.quiet)


def _resume_of(args: argparse.Namespace) -> Optional[dict]:
    """``--resume``'s checkpoint, loaded; without it, a refusal to start over an unfinished run's checkpoint."""
    if args.resume:
        from engine import checkpoint

        return checkpoint.load(args.resume)
    left = Path(args.output).with_name(Path(args.output).name + ".ckpt")
    if left.exists() and not args.overwrite:
        # The same command again after Ctrl-C: starting afresh would replace the saved progress.
        raise UserError(
            f"{_shown(left)} holds an unfinished run of this output; go on with: nst resume "
            f"{_shown(left)} (or pass --overwrite to start afresh and replace it)"
        )
    return None


def run_resume(args: argparse.Namespace) -> int:
    """``nst resume CHECKPOINT``: the job and settings are those stored in the checkpoint."""
    job, config, state = prepare_resume(args)
    return run_file_job(job, config, resume=state, quiet=args.quiet)


def run_file_job(job: FileJob, config, *, resume: Optional[dict] = None, quiet: bool = False, share=None) -> int:
    """Run one job to its output file (``resume``: a loaded checkpoint of it); the exit status.

    With ``share`` (``tiling.TileShare``) every process of the group runs this with the same job; they
    check the same things and fail alike, and only the leader shows progress and writes files (output,
    snapshots, checkpoints, the interrupted image).
    """
    from engine import checkpoint
    from engine.api import stylize
    from engine.control import Interrupted
    from engine.images import check_output_path, save_image

    fresh_output = resume is None
    output = Path(job.output)
    # A resumed job may replace the file only where the original command was allowed to.
    check_output_path(output, job.overwrite, job.bit_depth)
    for src in [job.content, *job.styles, *(config.style_masks or ())]:
        if Path(src).exists() and Path(src).resolve() == output.resolve():
            raise UserError(f"output {str(output)!r} is also an input; choose another output name")
    for name in ("snapshot_every", "checkpoint_every"):
        if getattr(job, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, not {getattr(job, name)}")
    snapshots = output.with_name(output.stem + "_snapshots")
    if fresh_output and job.snapshot_every and snapshots.exists() and any(snapshots.iterdir()) and not job.overwrite:
        raise UserError(f"snapshot directory {str(snapshots)!r} is not empty; pass --overwrite or move it")
    ckpt_path = output.with_name(output.name + ".ckpt")
    partial = output.with_name(f"{output.stem}_interrupted{output.suffix}")
    animate = Path(job.animate) if job.animate else None
    taken = {Path(p).resolve() for p in [output, job.content, *job.styles] if Path(p).exists() or p == output}
    for name in ("log", "animate"):
        if getattr(job, name):
            if Path(getattr(job, name)).resolve() in taken:
                raise UserError(f"--{name} {getattr(job, name)!r} is also the output or an input; choose another name")
            taken.add(Path(getattr(job, name)).resolve())
    if animate is not None:
        from .plot import check_animation

        check_animation(animate, job.overwrite, job.snapshot_every)
    started = time.perf_counter()
    leader = share is None or share.leader
    log = None
    if job.log and leader:  # the processes of a shared run: the leader writes the files
        from engine.runlog import StepLog

        # A resumed job (nst resume) appends to its log; a fresh one starts it (never over a file without --overwrite).
        log = StepLog(Path(job.log), job.overwrite, append=not fresh_output)
    bar = ProgressBar(quiet or not leader)
    seen = {}

    def after_step(info):
        seen["info"] = info
        if log is not None:
            log.write(info)
        if leader and job.snapshot_every and info.total_step % job.snapshot_every == 0:
            if fresh_output and job.overwrite and "cleared" not in seen and snapshots.is_dir():
                # --overwrite replaces the earlier run's snapshots too, not only its result; other files stay.
                for old in snapshots.glob(f"step*_scale*{output.suffix}"):
                    old.unlink()
            seen["cleared"] = True
            snapshots.mkdir(exist_ok=True)
            name = snapshots / f"step{info.total_step:05d}_scale{info.scale + 1}{output.suffix}"
            save_image(info.image[0], name, overwrite=True, bit_depth=job.bit_depth)

    callback = bar.callback(
        lambda info: f"scale {info.scale + 1}/{info.scales} {info.width}x{info.height}",
        then=after_step,
        image_every=job.snapshot_every,
    )

    control = Control()
    stop = StopOnSignal(control.interrupt)
    plan = checkpoint.CheckpointPlan(str(ckpt_path), job.checkpoint_every, extra=job.to_state())
    try:
        with stop:
            result = stylize(
                job.content,
                list(job.styles),
                config,
                callback=callback,
                checkpoint=plan,
                resume=resume,
                control=control,
                share=share,
            )
    except Interrupted as exc:
        bar.close()
        if not leader:  # the leader reports it; this process may have stopped only because the leader was asked to
            return 128 + stop.signum if stop.signum else 0
        save_image(exc.image[0], partial, overwrite=True, bit_depth=job.bit_depth)
        info = seen.get("info")
        where = f"step {info.total_step}/{info.total_steps}" if info else "the first step"
        print(
            f"nst: stopped by {stop.name} after {where}; wrote the current image to {_shown(partial)} and a "
            f"checkpoint to {_shown(ckpt_path)}; go on with: nst resume {_shown(ckpt_path)}",
            file=sys.stderr,
        )
        return 128 + stop.signum
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        info = seen.get("info")
        where = (
            f"{info.width}x{info.height} (scale {info.scale + 1}/{info.scales})" if info else f"--size {config.size}"
        )
        kept = f"; the last checkpoint is kept at {_shown(ckpt_path)}" if ckpt_path.exists() else ""
        raise UserError(
            f"ran out of memory at {where}; try a smaller --size, --precision bf16, or fewer --style-layers{kept}"
        ) from None
    finally:
        bar.close()
        if log is not None:
            log.close()
    if not leader:
        return 0
    written = result.save(output, overwrite=job.overwrite, bit_depth=job.bit_depth)
    if animate is not None:
        from .plot import write_animation

        frames = sorted(snapshots.glob(f"step*_scale*{output.suffix}"))  # this run's (and, resumed, the first part's)
        write_animation(frames, result.image, animate, job.overwrite)
    # The job is done: its checkpoints could only repeat it (stylize removed the ones it was given; this also
    # covers a run interrupted before its first step), and a resumed job's interrupted picture is superseded.
    checkpoint.discard(str(ckpt_path), str(partial) if resume is not None else None)
    h, w = result.image.shape[-2:]
    steps = plural(len(result.history), "step")
    loss = f"style loss {result.config.style_loss}"  # what --style-loss auto chose, too
    print(f"wrote {_shown(written)} ({w}x{h}, {steps}, {loss}) in {time.perf_counter() - started:.1f} s")
    return 0


def _shown(path: Path) -> str:
    """``path`` as the user would have typed it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _runner(name: str):
    """A way to run a folder's jobs elsewhere (``--ray``: scale/ray.py), found through the ``nst.runners``
    entry points: engine/ never names the package that provides it, and it is imported only when asked for."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="nst.runners"):
        if entry.name == name:
            return entry.load()
    raise UserError(f"--{name} needs the {name} runner of nst-engine's {name} extra: pip install 'nst-engine[{name}]'")


def run_folder(args: argparse.Namespace, config) -> int:
    """CONTENT is a folder: every image in it against the same style(s), same-size ones batched.

    Results whose file exists are skipped (without ``--overwrite``), so the same command run again after
    an interruption does only the rest. SIGINT and SIGTERM stop after the current step; the batch in
    progress is dropped, the images written so far stay.
    """
    from engine.api import stylize_batch
    from engine.control import Stopped
    from engine.files import check_writable
    from engine.images import FORMATS, SIXTEEN_BIT

    folder, outdir = Path(args.content), Path(args.output)
    contents = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
    if not contents:
        raise UserError(f"content folder {str(folder)!r} has no images ({', '.join(FORMATS)})")
    if args.snapshot_every:
        raise UserError("--snapshot-every works with a single content image, not a folder")
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"output {args.output!r} must be a folder when CONTENT is a folder")
    if not outdir.exists():
        if outdir.suffix.lower() in FORMATS:
            raise UserError(
                f"output {args.output!r} looks like a file name, but CONTENT is a folder; "
                "give a folder for the results (it is created)"
            )
        check_writable(outdir, overwrite=False, what="output folder")  # its parent exists and is writable
    ext = "." + (args.output_format or "png").lower().lstrip(".")
    inputs = {p.resolve() for p in contents} | {
        Path(s).resolve() for s in [*args.styles, *(config.style_masks or ())] if Path(s).exists()
    }
    outputs = [outdir / (p.stem + ext) for p in contents]
    if ext not in FORMATS:
        raise UserError(f"--output-format {args.output_format!r} is not one of {', '.join(f[1:] for f in FORMATS)}")
    if args.bit_depth == 16 and ext not in SIXTEEN_BIT:
        raise UserError(f"--bit-depth 16 needs --output-format png or tif, not {ext[1:]}")
    if len({o.name for o in outputs}) < len(outputs):
        raise UserError(
            f"content folder {str(folder)!r} has images that differ only in extension; their results would share a name"
        )
    for out in outputs:
        if out.resolve() in inputs:
            raise UserError(f"output {str(out)!r} would replace an input; choose another output folder")
    todo = [i for i, out in enumerate(outputs) if args.overwrite or not out.exists()]
    if len(todo) < len(outputs):
        skipped = len(outputs) - len(todo)
        print(
            f"nst: skipping {plural(skipped, 'image')} whose result is already in {_shown(outdir)} "
            "(--overwrite redoes them)",
            file=sys.stderr,
        )
    outdir.mkdir(exist_ok=True)
    if getattr(args, "ray", None) is not None and todo:
        return _runner("ray")(args, config, [(contents[i], args.styles) for i in todo], [outputs[i] for i in todo])
    started = time.perf_counter()
    bar = ProgressBar(args.quiet)
    control = Control()
    stop = StopOnSignal(control.cancel)

    def describe(info):
        first, last = todo[info.jobs[0]] + 1, todo[info.jobs[-1]] + 1
        jobs = f"image {first}" if first == last else f"images {first}-{last}"
        return f"{jobs}/{len(contents)} scale {info.scale + 1}/{info.scales} {info.width}x{info.height}"

    callback = bar.callback(describe)

    written = []

    def save(index, result):  # as each batch finishes: a later failure does not cost earlier results
        written.append(result.save(outputs[todo[index]], overwrite=args.overwrite, bit_depth=args.bit_depth))

    try:
        with stop:
            if todo:
                stylize_batch(
                    [(contents[i], args.styles) for i in todo],
                    config,
                    callback=callback,
                    on_result=save,
                    control=control,
                )
    except Stopped:
        bar.close()
        print(
            f"nst: stopped by {stop.name}; {plural(len(written), 'image')} of {len(todo)} written to "
            f"{_shown(outdir)}; run the same command again to do the rest",
            file=sys.stderr,
        )
        return 128 + stop.signum
    finally:
        bar.close()
    print(f"wrote {plural(len(written), 'image')} to {outdir} in {time.perf_counter() - started:.1f} s")
    return 0
