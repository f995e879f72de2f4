"""Registers ``nst bench`` (through the ``nst.commands`` entry point, so ``engine`` never imports ``bench``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="time the optimisation step under each speed lever (a table of ratios to a baseline)",
        description="Time one optimisation step of the engine under each speed lever (precision, channels-last, "
                    "CUDA graphs, TorchScript, batches), at several sizes, against an eager fp32 baseline measured "
                    "in the same run. See bench/suite.py for what each column means.",
    )
    p.add_argument("--sizes", type=_sizes, metavar="A,B,...", help="square sizes (default: 256,512,1024,2048 on "
                   "CUDA, 128,256 on the CPU)")
    p.add_argument("--only", type=lambda t: [x for x in t.split(",") if x], metavar="A,B",
                   help="run only these configurations (and the baseline)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    p.add_argument("--warmup", type=_positive, default=5, help="untimed steps first (default: 5)")
    p.add_argument("--repeats", type=_positive, default=20, help="timed steps; the median is reported (default: 20)")
    p.add_argument("--batch", type=_positive, default=4, help="jobs per step in the batch rows (default: 4)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results, with machine and commit, as JSON")
    p.add_argument("--profile", type=Path, metavar="PATH",
                   help="instead of the table, write a torch.profiler trace of the 'all' configuration")
    p.set_defaults(run=run)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _sizes(text: str) -> list[int]:
    return [_positive(part) for part in text.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    from . import suite

    if args.profile:
        size = (args.sizes or [256])[0]
        path = suite.profile(args.only[0] if args.only else "all", size, args.device, args.profile)
        print(f"wrote {path} (open it in https://ui.perfetto.dev or chrome://tracing)")
        return 0
    results = suite.run(args.sizes, args.device, args.warmup, args.repeats, args.batch, args.only)
    if args.json:
        print(f"wrote {suite.write_json(results, args.json)}")
    return 0
