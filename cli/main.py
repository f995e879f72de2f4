"""``nst``: the command line.

Options of ``nst stylize`` are generated from ``Config``'s fields, with
their help and defaults read from there (argparse itself holds no defaults,
so an option the user did not give never reaches ``Config``). Errors the
user can fix print one line and exit 2; there is no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from engine.config import EXTRACTOR_FIELDS, STYLE_LOSSES, Config
from engine.errors import UserError, cli_wording, plural

from .options import _list_of, add_config_options, config_from_args

EXIT_FAILED_CHECK = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# What other style-transfer tools call the output's long side; difflib would offer --style-scale or --style-size.
OUTPUT_SIZE_NAMES = {
    "--end-scale",
    "--image-size",
    "--image_size",
    "--output-size",
    "--out-size",
    "--max-size",
    "--long-side",
    "--resolution",
    "--img-size",
}
EXPORT_FORMATS = ("torchscript", "onnx")
FORMAT_OF_SUFFIX = {".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript", ".onnx": "onnx"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a bare `nst`: what it can do, not an error
        parser.print_help()
        return 0
    parser.argv = argv
    try:
        with cli_wording():  # messages name --options, not Config fields
            args = parser.parse_args(argv)
            return args.run(args)
    except UserError as exc:
        print(f"nst: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\nnst: interrupted; no partial file was written", file=sys.stderr)
        return EXIT_INTERRUPTED


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line, like every other user error (no usage dump)."""

    argv: Sequence[str] = ()

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"nst: error: {message}{self._suggestion(message)} (see {self.prog} --help)\n")

    def _suggestion(self, message: str) -> str:
        """For an unknown option, the closest one the command has: a typo should not need the whole --help."""
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if not unknown or not unknown[1].startswith("--"):
            return ""
        known = [s for a in self._actions for s in a.option_strings]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                command = next((a for a in self.argv if a in action.choices), None)
                if command is not None:
                    known = [s for a in action.choices[command]._actions for s in a.option_strings]
        given = unknown[1].split("=")[0]
        if given in OUTPUT_SIZE_NAMES and "--size" in known:  # other tools' names for the output size
            return "; did you mean --size (the long side of the output)?"
        close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
        return f"; did you mean {close[0]}?" if close else ""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nst", description="Neural style transfer (Gatys et al.), offline.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    st = sub.add_parser(
        "stylize",
        help="repaint a photo in the style of one or more images",
        description="Repaint CONTENT in the style of STYLE (several styles are blended).",
    )
    st.add_argument("content", metavar="CONTENT", help="content image, or a folder of them (then OUTPUT is a folder)")
    st.add_argument("styles", metavar="STYLE", nargs="+", help="style image(s)")
    st.add_argument("-o", "--output", required=True, help="output file; format from the extension")
    st.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    st.add_argument(
        "--bit-depth", type=int, choices=(8, 16), default=8, help="bits per channel; 16 needs .png or .tif (default: 8)"
    )
    st.add_argument(
        "--snapshot-every",
        type=int,
        default=0,
        metavar="N",
        help="also write the image every N steps into OUTPUT_STEM_snapshots/ (0: never)",
    )
    st.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="save the run's state to OUTPUT.ckpt every N steps (0: only when interrupted)",
    )
    st.add_argument(
        "--resume", metavar="CHECKPOINT", help="go on from a checkpoint made with the same settings and images"
    )
    st.add_argument(
        "--output-format",
        metavar="EXT",
        help="with a folder of contents: the results' format, e.g. jpg or tif (default: png)",
    )
    st.add_argument(
        "--log",
        metavar="FILE",
        help="write one JSON line per step (scale, step, loss and its parts, seconds) to FILE, e.g. run.jsonl; "
        "draw it with nst plot",
    )
    st.add_argument(
        "--animate",
        metavar="OUT",
        help="also write the progression, the snapshots then the result, as OUT.gif (or .mp4 with imageio-ffmpeg); "
        "needs --snapshot-every",
    )
    st.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="with a folder of contents: run its jobs on a Ray cluster, one worker per GPU (or per core); "
        "with a video: run it in overlapping chunks (--chunk, --overlap), one Ray task each "
        "(ADDRESS: auto, HOST:PORT or ray://HOST:10001; none: $RAY_ADDRESS, else a cluster on this machine); "
        "needs the ray extra: pip install 'nst-engine[ray]'",
    )
    st.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_config_options(st)
    from .video import add_options as add_video_options  # the shell's video mode

    add_video_options(st)
    st.set_defaults(run=lambda args: _run("run_stylize", args))

    rs = sub.add_parser(
        "resume",
        help="go on with an interrupted nst stylize run from its checkpoint",
        description="Finish the job saved in CHECKPOINT (written by nst stylize on SIGINT/SIGTERM or with "
        "--checkpoint-every), with its settings, inputs and output; the result equals an uninterrupted run.",
    )
    rs.add_argument("checkpoint", metavar="CHECKPOINT", help="the .ckpt file")
    rs.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output file (also allowed when the original command had --overwrite)",
    )
    rs.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    rs.set_defaults(run=lambda args: _run("run_resume", args))

    pl = sub.add_parser(
        "plot",
        help="draw the loss curve of an nst stylize --log file",
        description="Draw the total loss and its parts against the step (log scale), with the scales marked, "
        "from a file written by nst stylize --log.",
    )
    pl.add_argument("log", metavar="LOG", help="the --log file (JSON lines)")
    pl.add_argument("-o", "--output", required=True, help="the picture: .png, .svg or .pdf")
    pl.add_argument("--overwrite", action="store_true", help="replace an existing picture")
    pl.set_defaults(run=run_plot)

    ex = sub.add_parser(
        "export",
        help="write the feature extractor as a TorchScript or ONNX file",
        description="Write the truncated VGG (preprocessing included) for the chosen model, weights and layers "
        "as a TorchScript (.pt) or ONNX (.onnx) file. See README, 'Exported artifacts'.",
    )
    ex.add_argument("output", metavar="OUTPUT", help="artifact file: .pt (TorchScript) or .onnx")
    ex.add_argument("--format", choices=EXPORT_FORMATS, help="artifact format (default: from the extension)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing file")
    ex.add_argument("--external-data", action="store_true", help="ONNX only: weights in OUTPUT.data beside the model")
    add_config_options(ex, only=EXTRACTOR_FIELDS)
    ex.set_defaults(run=run_export)

    from export.validate import BACKENDS, DEFAULT_SIZES, TOLERANCE

    va = sub.add_parser(
        "validate",
        help="check the TorchScript and ONNX Runtime extractors against eager PyTorch",
        description="Run the eager, TorchScript and ONNX Runtime extractors on IMAGEs at several sizes, print "
        "each layer's error against eager and each backend's forward time; exit 1 if an error "
        "exceeds the tolerance.",
    )
    va.add_argument("images", metavar="IMAGE", nargs="+", help="images to run the extractors on")
    va.add_argument(
        "--sizes",
        type=_list_of(str),
        default=DEFAULT_SIZES,
        metavar="A,B,...",
        help="long sides (256) or WIDTHxHEIGHT (131x97) (default: %s)" % ",".join(DEFAULT_SIZES),
    )
    va.add_argument(
        "--backends",
        type=_list_of(str),
        default=BACKENDS,
        metavar="A,B",
        help="backends to check (default: %s)" % ",".join(BACKENDS),
    )
    va.add_argument(
        "--torchscript",
        metavar="PATH",
        help="check this TorchScript file (default: the loop's cached "
        "graph); its model, pooling and layers are read from its description unless given",
    )
    va.add_argument(
        "--onnx",
        metavar="PATH",
        help="check this ONNX file (default: a fresh export); its model, "
        "pooling and layers are read from its description unless given",
    )
    va.add_argument("--repeats", type=int, default=3, help="timed forward passes per backend and size (default: 3)")
    va.add_argument(
        "--tolerance",
        type=float,
        help="largest allowed error (default: %s)" % ", ".join(f"{v:g} on {k}" for k, v in TOLERANCE.items()),
    )
    add_config_options(va, only=EXTRACTOR_FIELDS)
    va.set_defaults(run=run_validate)

    cp = sub.add_parser(
        "compare",
        help="run several style losses or settings and write one labelled comparison sheet",
        description="Stylise CONTENT with each loss in --losses (crossed with each value of --vary) and write one "
        "picture: content, style, and every result with its label and wall time.",
    )
    cp.add_argument("content", metavar="CONTENT", help="content image")
    cp.add_argument("styles", metavar="STYLE", nargs="+", help="style image(s)")
    cp.add_argument("-o", "--output", required=True, help="the sheet; format from the extension")
    cp.add_argument(
        "--losses",
        type=_list_of(str),
        default=None,
        metavar="A,B,...",
        help=f"style losses, one column each (default: every registered one: {','.join(STYLE_LOSSES)})",
    )
    cp.add_argument(
        "--vary",
        metavar="FIELD=A,B,...",
        action="append",
        help="also vary a setting, e.g. style_weight=1,4,16 (tuple values joined with +); several --vary are crossed",
    )
    cp.add_argument("--overwrite", action="store_true", help="replace an existing sheet")
    cp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_config_options(cp, only=[f.name for f in dataclasses.fields(Config) if f.name != "style_loss"])
    cp.set_defaults(run=run_compare)

    from importlib.metadata import entry_points

    for plugin in entry_points(group="nst.commands"):  # e.g. `nst bench`, from the bench package
        plugin.load()(sub)
    return parser


def _run(name: str, args: argparse.Namespace) -> int:
    from . import stylize as cli_run

    return getattr(cli_run, name)(args)


def run_compare(args: argparse.Namespace) -> int:
    from engine.files import write_atomically
    from engine.images import FORMATS, check_output_path

    from .compare import make_sheet, run_comparison, variants

    config = config_from_args(args)
    output = check_output_path(args.output, args.overwrite)
    args.losses = tuple(STYLE_LOSSES) if args.losses is None else args.losses
    for loss in args.losses:
        if loss not in STYLE_LOSSES:
            raise UserError(f"--losses must be among {', '.join(STYLE_LOSSES)}, not {loss!r}")
    vary = []
    for text in args.vary or []:
        name, sep, values = text.partition("=")
        if not sep or not values.strip():
            raise UserError(f"--vary {text!r} is not FIELD=A,B,...")
        vary.append((name.strip().lstrip("-").replace("-", "_"), [v.strip() for v in values.split(",") if v.strip()]))
    runs = variants(config, args.losses, vary)  # every combination is a validated Config before the first run
    started = time.perf_counter()
    from .stylize import ProgressBar

    bar = ProgressBar(args.quiet)
    finished = [0]  # runs done so far: the bar is labelled with the one in progress

    callback = bar.callback(lambda info: runs[finished[0]][0].replace("\n", ", "))

    def on_run(label, seconds):
        bar.write(f"{label.replace(chr(10), ', ')}: {seconds:.1f} s")
        finished[0] += 1

    try:
        columns = run_comparison(args.content, args.styles, runs, on_run=on_run, callback=callback)
    finally:
        bar.close()
    sheet, _ = make_sheet(columns)
    write_atomically(output, lambda fh: sheet.save(fh, format=FORMATS[output.suffix.lower()]), args.overwrite)
    print(
        f"wrote {output} ({sheet.width}x{sheet.height}, {plural(len(runs), 'run')}) in "
        f"{time.perf_counter() - started:.1f} s"
    )
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from engine.runlog import read_log

    from .plot import check_plot_output, plot_log

    check_plot_output(Path(args.output), args.overwrite)  # before reading: a bad name costs nothing
    records = read_log(Path(args.log))
    written = plot_log(records, Path(args.output), args.overwrite, title=Path(args.log).name)
    print(f"wrote {written} ({plural(len(records), 'step')})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from engine.files import check_writable

    config = config_from_args(args)
    implied = FORMAT_OF_SUFFIX.get(Path(args.output).suffix.lower())
    if args.format and implied and args.format != implied:
        raise UserError(
            f"--format {args.format} does not match the extension of {args.output!r} ({implied}); "
            f"name the file {Path(args.output).stem}{'.onnx' if args.format == 'onnx' else '.pt'}"
        )
    fmt = args.format or implied
    if fmt is None:
        raise UserError(
            f"cannot tell the format of {args.output!r} from its extension; "
            "name it .pt or .onnx, or pass --format torchscript|onnx"
        )
    if args.external_data and fmt != "onnx":
        raise UserError("--external-data applies to ONNX files only")
    output = check_writable(args.output, args.overwrite, what="artifact")

    from engine.api import build_extractor

    started = time.perf_counter()
    extractor = build_extractor(config)
    if fmt == "onnx":
        from export import onnx_export

        onnx_export.export(extractor, output, overwrite=args.overwrite, external_data=args.external_data)
    else:
        from export import torchscript

        torchscript.export(extractor, output, overwrite=args.overwrite)
    print(
        f"wrote {output} ({fmt}, {config.model}, outputs {', '.join(extractor.output_names)}) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from export.validate import DESCRIBED, config_from_artifact, validate

    config = config_from_args(args)
    if args.torchscript or args.onnx:
        given = [name for name in (*DESCRIBED, "weights") if hasattr(args, name)]
        config = config_from_artifact(config, args.torchscript, args.onnx, given)
    report = validate(
        args.images,
        config,
        sizes=args.sizes,
        backends=args.backends,
        torchscript_path=args.torchscript,
        onnx_path=args.onnx,
        repeats=args.repeats,
        tolerance=args.tolerance,
    )
    print(report.format())
    return 0 if report.passed else EXIT_FAILED_CHECK


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("nst-engine")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
