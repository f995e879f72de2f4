"""High resolution: one step's time and peak memory per size and memory mode (untiled, checkpoint, tiles).

Each row runs in a fresh process, so that its peak memory is its own: on the
CPU the peak RSS of the whole process (as ``/usr/bin/time -v`` reports it,
the ~0.4 GiB of torch and the weights included), on CUDA the allocator's peak.
The step is the engine's own (``engine.api.scale_objective`` and
``engine.optimize.make_step``, as ``nst stylize`` runs it) on the bundled
samples, the style scaled with the output as in a real run. One untimed
step first, then the median of ``--steps`` timed steps. The overhead of a
mode is its time over the untiled row's at the same size, from the same run.

    nst bench highres --sizes 1024,2048 --modes off,checkpoint,512
    nst bench highres --sizes 1024 --modes off,1024,1024/lagged   (tiles with lagged statistics)
    nst bench highres --sizes 6144x4608 --modes 1024 --steps 0
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from engine.errors import UserError
from engine.files import write_atomically

ROOT = Path(__file__).resolve().parents[1]


def _build(height: int, width: int, mode: str, device: str, extractor=None, precision: str = "auto"):
    """``(step, memory plan, runtime, extractor, seconds spent on the targets)`` for one mode.

    ``mode`` is a ``--tile`` value, or ``TILE/lagged`` for tiles with ``--tile-stats lagged`` (the untimed
    first step is the scale's exact one; the timed ones are lagged)."""
    from engine import Config
    from engine.api import loop_extractor, scale_objective
    from engine.criterion import build_criterion
    from engine.images import load_image, resize
    from engine.memory import plan_scale
    from engine.optimize import make_step
    from engine.runtime import resolve_runtime
    from engine.vgg import VGGFeatures

    tile, _, stats = mode.partition("/")
    config = Config(
        device=device,
        tile=tile,
        tile_stats=stats or "exact",
        size=max(height, width),
        max_pixels=height * width,
        precision=precision,
        # The rows compare memory modes, tiles among them, which only gram (of the defaults) can use.
        style_loss="gram",
    )
    runtime = resolve_runtime(config)
    extractor = extractor or loop_extractor(config, runtime)
    content = runtime.layout(resize(load_image(ROOT / "examples/tubingen.jpg"), (height, width))[None])
    style = load_image(ROOT / "examples/starry_night.jpg")
    memory = plan_scale(config, runtime, height, width, checkpointable=isinstance(extractor, VGGFeatures))
    started = time.perf_counter()
    criterion = build_criterion(
        config, extractor, content, [([style], (1.0,))], min_side=16, runtime=runtime, tiling=memory.tiling
    )
    targets = time.perf_counter() - started
    objective = scale_objective(
        memory=memory,
        extractor=extractor,
        criterion=criterion,
        runtime=runtime,
        size=(height, width),
        stats=config.tile_stats,
    )
    step = make_step(content.clone().requires_grad_(True), objective, "adam", config.lr, runtime)
    return step, memory, runtime, extractor, targets


def interleaved(
    height: int, width: int, modes: list[str], steps: int, device: str, precision: str = "auto"
) -> dict[str, float]:
    """Each mode's time over the untiled one's, steps taken in turn in one process: the median over rounds.

    On a machine shared with other work, rows timed one after another see
    different loads; taking the modes' steps in turn and the ratio within
    each round cancels most of that (memory is not measured this way).
    """
    built, extractor = {}, None
    for mode in ["off", *[m for m in modes if m != "off"]]:
        step, _, runtime, extractor, _ = _build(height, width, mode, device, extractor, precision=precision)
        built[mode] = step
    ratios: dict[str, list[float]] = {mode: [] for mode in built}
    for round_ in range(steps + 1):
        seconds = {}
        for mode, step in built.items():
            started = time.perf_counter()
            step()
            runtime.synchronize()
            seconds[mode] = time.perf_counter() - started
        if round_:  # the first round allocates Adam's state and warms up
            for mode in built:
                ratios[mode].append(seconds[mode] / seconds["off"])
    return {mode: statistics.median(values) for mode, values in ratios.items()}


def measure(height: int, width: int, tile: str, steps: int, device: str, precision: str = "auto") -> dict:
    """One row, in this process."""
    import torch

    from engine.memory import GiB

    step, memory, runtime, _, targets = _build(height, width, tile, device, precision=precision)
    times = []
    for i in range(steps + 1):
        started = time.perf_counter()
        step()
        runtime.synchronize()
        if i or steps == 0:  # the first step allocates Adam's state and warms up the kernels
            times.append(time.perf_counter() - started)
        if steps == 0:  # --steps 0: time the one and only step (for sizes where a step takes many minutes)
            break
    if runtime.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(runtime.device)
    else:
        peak = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    tiles = len(memory.tiling.grid(height, width).tiles) if memory.tiling else 1
    lagged = memory.mode == "tiled" and tile.endswith("/lagged")
    return {
        "size": f"{width}x{height}",
        "mode": "lagged" if lagged else memory.mode,
        "tile": memory.tiling.tile if memory.tiling else None,
        "tiles": tiles,
        "s_per_step": statistics.median(times),
        "targets_s": targets,
        "peak_gib": peak / GiB,
        "estimate_gib": memory.estimate / GiB,
        "device": runtime.device.type,
        "precision": runtime.precision,
    }


def _size(text: str) -> tuple[int, int]:
    """``"1024"`` or ``"6144x4608"`` (width x height) -> ``(height, width)``."""
    w, x, h = text.partition("x")
    if not w.isdigit() or (x and not h.isdigit()) or int(w) < 1 or int(h or w) < 1:
        raise ValueError(text)
    return (int(h or w), int(w))


def table(
    sizes: list[str],
    modes: list[str],
    *,
    steps: int,
    device: str,
    json_path: Optional[Path],
    interleave: bool = False,
    precision: str = "auto",
) -> int:
    """The rows of ``sizes`` x ``modes``, each in a fresh process (``--row``), printed as they come.

    With ``interleave``, one process per size takes the modes' steps in turn and prints their time ratios.
    ``precision`` is ``--precision``'s (``auto``: what a run on this machine would use).
    """
    if json_path is not None and json_path.exists():
        raise UserError(f"{json_path} already exists; choose another name")
    for size in sizes:
        try:
            _size(size)
        except ValueError:
            raise UserError(f"size {size!r} is not a whole number or WIDTHxHEIGHT") from None
    if interleave:
        return _interleaved_table(sizes, modes, steps, device, precision)
    rows = []
    print(
        f"{'size':>11} {'mode':>10} {'tile':>5} {'tiles':>5} {'s/step':>8} {'peak GiB':>9} {'model GiB':>9} "
        f"{'overhead':>8}",
        flush=True,
    )
    for size in sizes:
        base = None
        for mode in modes:
            done = subprocess.run(
                [sys.executable, "-m", "bench.highres", "--row", size, mode, "--steps", str(steps), "--device", device]
                + ["--precision", precision],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if done.returncode != 0:
                reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
                print(f"{size:>11} {mode:>10}  failed: {reason}", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            base = row["s_per_step"] if mode == "off" else base
            row["overhead"] = row["s_per_step"] / base if base else None
            rows.append(row)
            overhead = f"{row['overhead']:.2f}x" if row["overhead"] else "-"
            print(
                f"{row['size']:>11} {row['mode']:>10} {row['tile'] or '-':>5} {row['tiles']:>5} "
                f"{row['s_per_step']:>8.2f} {row['peak_gib']:>9.2f} {row['estimate_gib']:>9.2f} {overhead:>8}",
                flush=True,
            )
    if json_path is not None:
        write_atomically(
            json_path, lambda fh: fh.write(json.dumps(rows, indent=1).encode()), overwrite=False, what="results"
        )
    return 0


def _interleaved_table(sizes, modes, steps, device, precision) -> int:
    print(f"{'size':>11} " + " ".join(f"{m:>10}" for m in modes) + "   (time per step over untiled, median of rounds)")
    for size in sizes:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.highres",
                "--row",
                size,
                ",".join(modes),
                "--steps",
                str(max(steps, 1)),
                "--device",
                device,
                "--interleave",
                "--precision",
                precision,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if done.returncode != 0:
            print(f"{size:>11}  failed: {(done.stderr.strip().splitlines() or ['failed'])[-1]}", flush=True)
            continue
        ratios = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{size:>11} " + " ".join(f"{ratios.get(m, ratios.get('off')):>9.2f}x" for m in modes), flush=True)
    return 0


def main(argv=None) -> int:
    """``--row SIZE MODE``: one row in this process, as JSON (what ``table`` runs per row)."""
    parser = argparse.ArgumentParser(prog="python -m bench.highres")
    parser.add_argument("--row", nargs=2, metavar=("SIZE", "MODE"), required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--interleave", action="store_true", help="MODE is a comma-separated list; time ratios only")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "tf32", "bf16", "fp16"))
    args = parser.parse_args(argv)
    if args.interleave:
        modes, steps = args.row[1].split(","), max(args.steps, 1)
        print(json.dumps(interleaved(*_size(args.row[0]), modes, steps, args.device, args.precision)))
        return 0
    print(json.dumps(measure(*_size(args.row[0]), args.row[1], args.steps, args.device, args.precision)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
