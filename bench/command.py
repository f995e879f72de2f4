"""Registers ``nst bench`` (through the ``nst.commands`` entry point, so ``engine`` never imports ``bench``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time the optimisation step under each speed lever (a table of ratios to a baseline)",
        description="Time one optimisation step of the engine under each speed lever (precision, channels-last, "
        "CUDA graphs, TorchScript, batches), at several sizes, against an eager fp32 baseline measured "
        "in the same run. See bench/suite.py for what each column means.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--sizes",
        type=_sizes,
        metavar="A,B,...",
        help="square sizes (default: 256,512,1024,2048 on CUDA, 128,256 on the CPU)",
    )
    which.add_argument(
        "--sweep",
        type=_sweep,
        metavar="LOW:HIGH[:N]",
        help="N sizes from LOW to HIGH in a geometric progression (default N: a factor of about "
        "sqrt(2)), for the baseline only unless --only adds configurations; fits each one's "
        "cost, fixed + per pixel",
    )
    p.add_argument(
        "--only",
        type=lambda t: [x for x in t.split(",") if x],
        metavar="A,B",
        help="run only these configurations (and the baseline)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    p.add_argument("--warmup", type=_positive, default=5, help="untimed steps first (default: 5)")
    p.add_argument(
        "--repeats",
        type=_positive,
        default=20,
        help="timed steps; the median is reported with its 95%% interval, narrower with more repeats (default: 20)",
    )
    p.add_argument("--batch", type=_positive, default=4, help="jobs per step in the batch rows (default: 4)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results, with machine and commit, as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="DIR",
        help="also write PNG charts (time, memory, speedup, peak) into DIR, replacing those there",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="PATH",
        help="instead of the table, write a torch.profiler trace of the 'all' configuration",
    )
    p.set_defaults(run=run)

    sub_bench = p.add_subparsers(dest="bench_command", metavar="{compare,highres,quality,video}", required=False)
    c = sub_bench.add_parser(
        "compare",
        help="compare two recorded runs: NEW/OLD per row, marked only outside the noise",
        description="Compare two runs recorded with `nst bench --json` (or pytest-benchmark JSON): per row of both, "
        "the ratio of the median times NEW/OLD with its bootstrap 95% interval, marked slower or "
        "faster only outside the noise. Rows in only one file are listed.",
    )
    c.add_argument("old", type=Path, metavar="OLD.json")
    c.add_argument("new", type=Path, metavar="NEW.json")
    c.add_argument(
        "--noise",
        type=_percent,
        default=20.0,
        metavar="PCT",
        help="changes smaller than this are never marked: the drift between two runs that one run's "
        "repeats cannot show (default: 20, measured between consecutive runs on a quiet 2-core CPU: up to 17%%)",
    )
    c.add_argument(
        "--fail-slower",
        type=_percent,
        metavar="PCT",
        help="exit with status 1 if a row is marked slower by more than PCT percent",
    )
    c.set_defaults(run=run_compare)
    h = sub_bench.add_parser(
        "highres",
        help="one step's time and peak memory per size and memory mode (untiled, checkpoint, tiles)",
        description="Time one optimisation step and measure its peak memory at large sizes, for each --tile mode, "
        "each row in a fresh process; the overhead column is the ratio to the untiled row of the same "
        "size in the same run. See bench/highres.py.",
    )
    h.add_argument("--sizes", default="1024,2048", metavar="A,WxH,...", help="sizes (default: 1024,2048)")
    h.add_argument(
        "--modes",
        default="off,checkpoint,1024",
        metavar="A,B,...",
        help="--tile values, off first for the overhead column, TILE/lagged for tiles with --tile-stats lagged "
        "(default: off,checkpoint,1024)",
    )
    h.add_argument("--steps", type=int, default=2, help="timed steps after an untimed one; 0 times a single step")
    h.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    h.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "tf32", "bf16", "fp16"),
        help="as nst stylize's (default: auto, what a run here would use)",
    )
    h.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON (never over a file)")
    h.add_argument(
        "--interleave",
        action="store_true",
        help="time ratios only, the modes' steps taken in turn in one process per size (robust on a busy machine)",
    )
    h.set_defaults(run=run_highres)
    q = sub_bench.add_parser(
        "quality",
        help="judge results by measures the optimisation does not use, against time and pixel-steps",
        description="Run each configuration on each (content, style) pair and judge snapshots along the run: "
        "style (sliced Wasserstein distance to the style at ten VGG layers no default loss reads), content "
        "(feature distance to the photo at relu3_2 and relu4_3) and colour (distance of the colour "
        "distributions). Style and colour are 1.0 for the photo itself and 0 for the style; content is 0 for the "
        "photo and 1.0 for the style image. See docs/quality.md.",
    )
    q.add_argument(
        "--pair",
        nargs=2,
        action="append",
        metavar=("CONTENT", "STYLE"),
        help="a content photo and a style image (repeatable; default: the bundled examples)",
    )
    q.add_argument(
        "--config",
        action="append",
        metavar="NAME[:KEY=VALUE;...]",
        help="a configuration: a name and stylize settings, e.g. 'ot:style_loss=ot' or "
        "'decay:style_layer_weights=256,64,16,4,1' (repeatable; default: 'default', the defaults)",
    )
    q.add_argument("--size", type=_positive, default=256, help="long side of the results (default: 256)")
    q.add_argument(
        "--snapshot-every", type=_positive, default=50, metavar="N", help="judge the image every N steps (default: 50)"
    )
    q.add_argument(
        "--seeds", type=_sizes_or_zero, default=[0], metavar="A,B", help="run seeds (--seed) of each run (default: 0)"
    )
    q.add_argument("--judge-seed", type=int, default=0, help="seed of the judge's random projections (default: 0)")
    q.add_argument(
        "--out",
        type=Path,
        default=Path("out/quality"),
        metavar="DIR",
        help="where results.json, curves.png (against seconds), curves-pixel-steps.png and the result images "
        "go (default: out/quality)",
    )
    q.add_argument("--overwrite", action="store_true", help="replace an existing DIR/results.json")
    q.add_argument(
        "--baseline",
        metavar="NAME",
        help="also say when each configuration first reached NAME's final quality (within the judge's noise), "
        "in seconds and as a speed-up over NAME's whole run",
    )
    q.set_defaults(run=run_quality)
    v = sub_bench.add_parser(
        "video",
        help="a video's flicker (warping error) with the temporal term and frame by frame, and seconds per frame",
        description="Stylise the synthetic clip (a panned photo with a moving square: known motion) twice with the "
        "same --steps, with temporal consistency and each frame on its own; report the warping error of each "
        "beside the content clip's own (the floor), and the seconds per frame, first and later. See docs/video.md.",
    )
    v.add_argument("--frames", type=_positive, default=8, help="frames of the clip (default: 8)")
    v.add_argument("--size", default="64x96", metavar="HxW", help="frame size (default: 64x96)")
    v.add_argument("--steps", type=_positive, default=40, help="--steps of both runs (default: 40)")
    v.add_argument("--later-steps", type=float, metavar="F", help="the temporal run's later frames: F x --steps")
    v.add_argument("--temporal-weight", type=float, metavar="W", help="the temporal term's weight")
    v.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="(default: cpu)")
    v.add_argument("--json", type=Path, metavar="PATH", help="also write the results, with machine and commit, as JSON")
    v.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    v.set_defaults(run=run_video)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage from 0 up")
    return value


def _sweep(text: str) -> tuple[int, int, Optional[int]]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW:HIGH or LOW:HIGH:N (e.g. 128:1024)")
    low, high, *count = (_positive(part) for part in parts)
    if low >= high:
        raise argparse.ArgumentTypeError(f"{text!r} must go from a smaller size to a larger one")
    if count and count[0] < 2:
        raise argparse.ArgumentTypeError(f"{text!r} must have at least 2 sizes")
    return low, high, count[0] if count else None


def _sizes_or_zero(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers from 0 up")
    return values


def _sizes(text: str) -> list[int]:
    return [_positive(part) for part in text.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    from engine import Config
    from engine.files import check_writable
    from engine.sizes import check_size

    from . import suite

    sizes, only = args.sizes, args.only
    if args.sweep:
        sizes = suite.sweep_sizes(*args.sweep)
        only = only or ["baseline"]
    for size in sizes or []:  # before any timing: the same size check as every other entry point
        check_size(Config(), size, size, f"--sizes {size}", advice="use a larger size")
    if args.json:  # refused now, not after minutes of timing
        check_writable(args.json, args.overwrite, what="--json file")
    if args.profile:
        size = (args.sizes or [256])[0]
        path = suite.profile(args.only[0] if args.only else "all", size, args.device, args.profile)
        print(f"wrote {path} (open it in https://ui.perfetto.dev or chrome://tracing)")
        return 0
    results = suite.run(sizes, args.device, warmup=args.warmup, repeats=args.repeats, batch=args.batch, only=only)
    if args.json:
        print(f"wrote {suite.write_json(results, args.json, args.overwrite)}")
    if args.plot:
        from .plot import write_charts

        print("wrote " + ", ".join(map(str, write_charts(results, args.plot))))
    return 0


def run_highres(args: argparse.Namespace) -> int:
    from . import highres

    return highres.table(
        args.sizes.split(","),
        args.modes.split(","),
        steps=args.steps,
        device=args.device,
        json_path=args.json,
        interleave=args.interleave,
        precision=args.precision,
    )


def run_quality(args: argparse.Namespace) -> int:
    from engine.errors import UserError
    from engine.files import check_writable

    from . import quality

    root = Path(__file__).resolve().parents[1]
    pairs = args.pair or [(str(root / "examples/tubingen.jpg"), str(root / "examples/starry_night.jpg"))]
    configs = [quality.parse_config(text) for text in args.config or ["default"]]
    if args.baseline is not None and args.baseline not in [name for name, _ in configs]:
        names = ", ".join(name for name, _ in configs)
        raise UserError(f"--baseline {args.baseline!r} is not one of the --config names ({names})")
    json_path = args.out / "results.json"
    args.out.mkdir(parents=True, exist_ok=True)
    check_writable(json_path, args.overwrite, what="results file")  # refused now, not after the runs
    results = quality.run_quality(pairs, configs, args.size, args.snapshot_every, args.seeds, args.judge_seed, args.out)
    if args.baseline is not None:
        results["time_to_quality"] = quality.time_to_quality(results, args.baseline)
    print(f"wrote {quality.write_json(results, json_path, args.overwrite)}")
    print(f"wrote {quality.plot_curves(results, args.out / 'curves.png')}")
    print(f"wrote {quality.plot_curves(results, args.out / 'curves-pixel-steps.png', x='pixel_steps')}")
    for line in quality.summary(results):
        print(line)
    for row in results.get("time_to_quality", []):
        when = (
            f"after {row['seconds']:.0f} s ({row['speedup']:.2f}x faster than {row['baseline']}'s "
            f"{row['baseline_seconds']:.0f} s)"
            if row["seconds"] is not None
            else "never"
        )
        print(f"{row['pair']:<28} {row['config']:<14} reached {row['baseline']}'s final quality {when}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from . import compare

    old, new = compare.load(args.old), compare.load(args.new)
    noise = args.noise / 100
    result = compare.compare(old, new, noise)
    for line in compare.report(result, old, new, noise):
        print(line)
    if args.fail_slower is not None:
        failed = compare.too_slow(result, args.fail_slower)
        if failed:
            print(
                f"FAIL: {len(failed)} row(s) slower by more than {args.fail_slower:g}%: "
                + ", ".join(compare._name(c.key) for c in failed)
            )
            return 1
    return 0


def run_video(args: argparse.Namespace) -> int:
    from . import video

    return video.run(args)
