"""Per-step time of the optimisation loop, as a ratio to a forward pass measured in the same run.

    python -m bench.step_time --sizes 128 256 --repeats 10

For each size: the median time of a no-grad extractor forward (the baseline),
of one Adam step and of one L-BFGS step (the same ``StepFunction`` the engine
runs), each after warm-up, with the device synchronised around every timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from engine import Config
from engine.api import build_criterion, loop_extractor
from engine.runtime import resolve_device, resolve_runtime
from engine.images import fit_long_side, load_image, resize
from engine.optimize import StepFunction
from engine.vgg import downsampling

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_problem(size: int, config: Config, device: torch.device):
    """The bundled samples at ``size`` on ``device``: ``(content batch, extractor, criterion)``."""
    content, style = load_image(EXAMPLES / "tubingen.jpg"), load_image(EXAMPLES / "starry_night.jpg")
    runtime = resolve_runtime(config, device)
    content = runtime.layout(resize(content, fit_long_side(*content.shape[-2:], size)).unsqueeze(0))
    extractor = loop_extractor(config, runtime)
    min_side = 2 ** downsampling(config.model, config.feature_layers)
    return content, extractor, build_criterion(config, extractor, content, [([style], (1.0,))], min_side, runtime)


def measure(size: int, config: Config, warmup: int = 2, repeats: int = 5) -> dict:
    device = resolve_device(config.device)
    content, extractor, criterion = build_problem(size, config, device)
    h, w = content.shape[-2:]

    def forward():
        with torch.no_grad():
            extractor(content)

    row = {"size": size, "height": h, "width": w, "forward_s": median_seconds(forward, device, warmup, repeats)}
    for name in ("adam", "lbfgs"):
        image = content.clone().requires_grad_(True)
        step = StepFunction(image, extractor, criterion, name, config.lr)
        row[f"{name}_s"] = median_seconds(step, device, warmup, repeats)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="eager", choices=("eager", "torchscript"))
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    config = Config(device=args.device, backend=args.backend)
    device = resolve_device(config.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{config.backend} {config.model} to {config.feature_layers[-1]}, {len(config.style_layers)} Gram layers + content")
    print(f"{'size':>9} {'forward ms':>11} {'adam ms':>9} {'adam/fwd':>9} {'lbfgs ms':>9} {'lbfgs/fwd':>10} {'Mpx-steps/s':>12}")
    rows = []
    for size in args.sizes:
        r = measure(size, config, args.warmup, args.repeats)
        rows.append(r)
        mpx = r["height"] * r["width"] / 1e6
        print(f"{r['width']:>4}x{r['height']:<4} {r['forward_s'] * 1e3:>11.1f} {r['adam_s'] * 1e3:>9.1f} "
              f"{r['adam_s'] / r['forward_s']:>9.2f} {r['lbfgs_s'] * 1e3:>9.1f} {r['lbfgs_s'] / r['forward_s']:>10.2f} "
              f"{mpx / r['adam_s']:>12.3f}", flush=True)
    if args.json:
        meta = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads()}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
