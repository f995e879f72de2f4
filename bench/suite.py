"""``nst bench``: the optimisation step under every speed lever, as ratios to a baseline from the same run.

For each image size, every configuration of the matrix runs the engine's own
step (``engine.optimize.make_step``: the same ``StepFunction``, losses and
CUDA-graph wrapper as ``nst stylize``) on the bundled samples, resized to a
square. Each row gives:

* ms per step: median over ``--repeats`` steps after ``--warmup`` steps
  (CUDA events on a GPU, ``perf_counter`` on the CPU, synchronised), and the
  bootstrap 95% interval of that median (``bench/stats.py``); every repeat is
  kept in the JSON, so that ``nst bench compare`` can weigh two runs' noise;
* Mpx-steps/s: megapixels optimised per second, batch included;
* peak memory of the whole row (building the step, warm-up and timed steps)
  above what was in use before it: CUDA tensors, or the CPU's resident set
  (``bench/memory.py``);
* TFLOP/s by the count in ``bench/flops.py`` and its share of the matmul
  peak measured at the start of the same run, in the row's precision;
* speed-up: the baseline's time per image-step over this row's.

The baseline is eager float32, NCHW, one image, no CUDA graph. A row is a
:class:`Lever`: a name and the ``Config`` fields it changes from the baseline.
With sizes at several scales (``--sweep``), each configuration's times are
fitted to a cost model, a fixed cost per step plus a cost per pixel.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from engine import Config, style_losses
from engine.api import loop_extractor, scale_objective
from engine.criterion import build_criterion
from engine.errors import UserError, is_out_of_memory
from engine.images import load_image, resize
from engine.losses import matmul_tf32
from engine.memory import plan_scale
from engine.optimize import make_step
from engine.runtime import cpu_supports, resolve_device, resolve_runtime
from engine.vgg import VGGFeatures, downsampling

from .flops import step_flops
from .memory import peak_memory
from .stats import fit_cost, summary

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DEFAULT_SIZES = {"cuda": (256, 512, 1024, 2048), "cpu": (128, 256)}
MATMUL_N = {"cuda": 8192, "cpu": 2048}  # large enough to reach the peak, small enough to time quickly


# What every row starts from; a Lever changes some of these (or any other Config field).
BASELINE = {
    "precision": "fp32",
    "memory_format": "contiguous",
    "cuda_graphs": "off",
    "batch_size": 1,
    "backend": "eager",
    "style_loss": "gram",
    "tile": "off",
}
# The tiled row's tile: one tile up to this size, so at the matrix's sizes the row shows the price of the
# second pass; python -m bench.highres measures tiles at the sizes that need them.
TILE = 1024
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(Config)}


@dataclasses.dataclass(frozen=True, init=False)
class Lever:
    """A row of the matrix: a name and the ``Config`` fields it changes from :data:`BASELINE`.

    ``Lever("channels_last", memory_format="channels_last")``; ``batch_size`` is the number of images per step.
    """

    name: str
    overrides: tuple[tuple[str, Any], ...]  # sorted pairs, so that a Lever stays hashable
    cli: bool = False  # timed through stylize() with the command line's own callback, not as a bare step

    def __init__(self, name: str, cli: bool = False, **overrides: Any):
        unknown = sorted(set(overrides) - _CONFIG_FIELDS)
        if unknown:
            raise TypeError(f"Lever {name!r}: {unknown[0]!r} is not a Config field")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "overrides", tuple(sorted(overrides.items())))
        object.__setattr__(self, "cli", cli)

    @property
    def settings(self) -> dict[str, Any]:
        return {**BASELINE, **dict(self.overrides)}

    @property
    def batch(self) -> int:
        return self.settings["batch_size"]

    @property
    def precision(self) -> str:
        return self.settings["precision"]


def matrix(device: torch.device, batch: int = 4) -> tuple[list[Lever], list[str]]:
    """The configurations this device can run, and a line for each one it cannot."""
    cuda = device.type == "cuda"
    levers = [Lever("baseline")]
    skipped = []
    for precision in ("tf32", "bf16", "fp16"):
        if cuda and (precision != "bf16" or torch.cuda.is_bf16_supported()):
            levers.append(Lever(precision, precision=precision))
        elif not cuda and precision != "tf32" and cpu_supports(precision):
            levers.append(Lever(precision, precision=precision))
        elif precision == "tf32" and not cuda:
            skipped.append("tf32: CUDA only")
        else:
            skipped.append(f"{precision}: emulated on this {device.type.upper()}, not native")
    levers.append(Lever("channels_last", memory_format="channels_last"))
    if cuda:
        levers.append(Lever("cuda_graphs", cuda_graphs="on"))
    else:
        skipped.append("cuda_graphs: CUDA only")
    # The step as `nst stylize` runs it: the settings of the row above (cuda_graphs on CUDA, else the
    # baseline), plus the loop's moving average, loss reads and progress bar. It should take the same time.
    levers.append(Lever("cli", cli=True, cuda_graphs="on" if cuda else "off"))
    levers.append(Lever("torchscript", backend="torchscript"))
    levers.append(Lever(f"batch{batch}", batch_size=batch))
    fast = next((lv.precision for lv in levers if lv.precision in ("bf16", "fp16")), "tf32" if cuda else "fp32")
    together = dict(precision=fast, memory_format="channels_last", cuda_graphs="on" if cuda else "off")
    levers.append(Lever("all", **together))
    levers.append(Lever(f"all+batch{batch}", batch_size=batch, **together))
    # Not levers but costs: the other style losses on the baseline settings, and the memory modes that
    # buy room for larger images with time (see engine/memory.py).
    others = [name for name in style_losses.names() if name != BASELINE["style_loss"]]  # the registry's
    levers += [Lever(f"loss_{name}", style_loss=name) for name in others]
    levers += [Lever("checkpoint", tile="checkpoint"), Lever(f"tiled{TILE}", tile=str(TILE))]
    return levers, skipped


def _fields(lever: Lever) -> dict:
    """The row's settings as recorded in the table and the JSON (``batch`` for ``batch_size``)."""
    fields = {k: v for k, v in lever.settings.items() if k != "batch_size"}
    return {**fields, "batch": lever.batch}


def measure_matmul_peak(
    device: torch.device, precisions, repeats: int = 10, n: Optional[int] = None
) -> dict[str, float]:
    """TFLOP/s of an N x N x N matmul in each precision, measured now (the ceiling for the % column).

    ``n`` defaults to ``MATMUL_N`` for the device; a smaller one only for a quick look (it may miss the peak).
    """
    n = n or MATMUL_N[device.type]
    dtypes = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = {}
    for precision in dict.fromkeys(precisions):
        a = torch.randn(n, n, device=device, dtype=dtypes[precision])
        b = torch.randn(n, n, device=device, dtype=dtypes[precision])
        with matmul_tf32(precision == "tf32"):  # a no-op off CUDA
            seconds = median_time(lambda a=a, b=b: torch.mm(a, b), device, warmup=3, repeats=repeats)
        peaks[precision] = 2 * n**3 / seconds / 1e12
    return peaks


def time_samples(fn: Callable, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` calls; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def median_time(fn: Callable, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    return statistics.median(time_samples(fn, device, warmup, repeats))


def build_step(lever: Lever, size: int, device: torch.device, base: Optional[Config] = None):
    """The engine's step for ``lever`` on the samples at ``size`` x ``size``: ``(step, config)``."""
    config = dataclasses.replace(base or Config(), device=device.type, optimizer="adam", **lever.settings)
    runtime = resolve_runtime(config, device)
    content = resize(load_image(EXAMPLES / "tubingen.jpg"), (size, size))
    style = load_image(EXAMPLES / "starry_night.jpg")
    batch = runtime.layout(content.unsqueeze(0).expand(lever.batch, -1, -1, -1))
    extractor = loop_extractor(config, runtime)
    min_side = 2 ** downsampling(config.model, config.feature_layers)
    jobs = [([style], (1.0,))] * lever.batch
    memory = plan_scale(
        config, runtime, size, size, batch=lever.batch, checkpointable=isinstance(extractor, VGGFeatures)
    )
    criterion = build_criterion(
        config, extractor, batch, jobs, min_side=min_side, runtime=runtime, tiling=memory.tiling
    )
    image = batch.clone().requires_grad_(True)
    objective = scale_objective(
        memory=memory, extractor=extractor, criterion=criterion, runtime=runtime, size=(size, size)
    )
    return make_step(image, objective, "adam", config.lr, runtime), config


def cli_step_samples(
    lever: Lever, size: int, device: torch.device, warmup: int, repeats: int
) -> tuple[list[float], Config]:
    """Seconds per step of ``stylize`` with the command line's own callback (its bar drawn to /dev/null).

    One scale of ``warmup + repeats`` steps, timed on the host between the loss reads that end the
    callback's groups (every step where a step takes 0.1 s or more; else every 16 steps): each
    read waits for the device, so all the work between two reads is counted, syncs included. One
    sample per group: its time divided by its steps.
    """
    from cli.stylize import ProgressBar
    from engine import Callback, stylize

    warmup = max(warmup, 1)  # the timed span starts on a read, after at least one step
    config = dataclasses.replace(
        Config(),
        device=device.type,
        optimizer="adam",
        **lever.settings,
        size=size,
        min_size=size,
        steps=warmup + repeats,
    )
    content = resize(load_image(EXAMPLES / "tubingen.jpg"), (size, size))
    style = load_image(EXAMPLES / "starry_night.jpg")
    reads = []
    with open(os.devnull, "w") as sink:
        bar = ProgressBar(quiet=False, file=sink)
        cli = bar.callback(lambda info: f"scale {info.scale + 1}/{info.scales} {info.width}x{info.height}")

        def timed(info):
            cli(info)
            if info.total_step >= warmup and info.source is not None:  # the last step of a group: a read
                reads.append((info.total_step, time.perf_counter()))

        # One more read, at the end of the warm-up, so that the timed span starts on one.
        stylize(
            content,
            style,
            config,
            callback=Callback(
                timed,
                every=cli.every,
                seconds=cli.seconds,
                image_due=lambda step: step == warmup or cli.image_due(step),
            ),
        )
        bar.close()
    return [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(reads, reads[1:])], config


# ``(lever, size, device) -> (step, config)``: build_step, or a stand-in in the tests.
StepBuilder = Callable[[Lever, int, torch.device], tuple[Callable, Config]]


def run_row(
    lever: Lever, size: int, device: torch.device, warmup: int, repeats: int, build: StepBuilder = build_step
) -> dict:
    """Time one configuration at one size; its memory is that of the whole row (building included)."""

    def work():
        if lever.cli:
            return cli_step_samples(lever, size, device, warmup, repeats)
        step, config = build(lever, size, device)
        return time_samples(step, device, warmup, repeats), config

    if device.type == "cuda":
        torch.cuda.empty_cache()
    (samples, config), peak = peak_memory(work, device)
    spread = summary(samples)
    seconds = spread["median"]
    flops = step_flops(
        config.model, config.feature_layers, config.style_layers, size, size, lever.batch, config.style_loss
    )
    return {
        "config": lever.name,
        **_fields(lever),
        "size": size,
        "ms_per_step": seconds * 1e3,
        "ms_ci95": [spread["ci_low"] * 1e3, spread["ci_high"] * 1e3],
        "ms_iqr": [spread["q1"] * 1e3, spread["q3"] * 1e3],
        "samples_ms": [t * 1e3 for t in samples],
        "mpx_steps_per_s": lever.batch * size * size / 1e6 / seconds,
        "peak_mib": peak / 2**20 if peak is not None else None,
        "flops_per_step": flops["total"],
        "tflops": flops["total"] / seconds / 1e12,
    }


def sweep_sizes(low: int, high: int, count: Optional[int] = None) -> list[int]:
    """``count`` sizes from ``low`` to ``high`` in a geometric progression (default: a factor of about sqrt(2))."""
    if not 0 < low < high:
        raise UserError(f"the sweep {low}:{high} must go from a smaller size to a larger one")
    if count is None:
        count = round(2 * math.log2(high / low)) + 1
    if count < 2:
        raise UserError(f"a sweep needs at least 2 sizes, not {count}")
    sizes = [round(low * (high / low) ** (i / (count - 1))) for i in range(count)]
    return list(dict.fromkeys(sizes))  # a short range can round two steps to one size


def select(levers: list[Lever], only: Optional[list[str]]) -> list[Lever]:
    """The baseline and the levers named in ``only`` (all of them when ``only`` is empty)."""
    if not only:
        return levers
    unknown = [name for name in only if name not in {lv.name for lv in levers}]
    if unknown:
        raise UserError(
            f"configuration {unknown[0]!r} is not in the matrix here; available: {', '.join(lv.name for lv in levers)}"
        )
    return [lv for lv in levers if lv.name == "baseline" or lv.name in only]


def run(
    sizes=None,
    device_name: str = "auto",
    *,
    warmup: int = 5,
    repeats: int = 20,
    batch: int = 4,
    only: Optional[list[str]] = None,
    log: Callable[[str], None] = print,
    levers: Optional[list[Lever]] = None,
    build: StepBuilder = build_step,
) -> dict:
    """The matrix (or ``levers``) at every size; returns ``{"meta", "rows", "fits"}`` and logs the table as it goes.

    ``fits`` holds a cost model per configuration measured at two sizes or more.
    """
    device = resolve_device(device_name)
    skipped = []
    if levers is None:
        levers, skipped = matrix(device, batch)
    levers = select(levers, only)
    sizes = sizes or DEFAULT_SIZES[device.type]
    peaks = measure_matmul_peak(device, [lv.precision for lv in levers])
    meta = describe_machine(device)
    meta.update(
        matmul_peak_tflops=peaks,
        warmup=warmup,
        repeats=repeats,
        skipped=skipped,
        flop_count="bench/flops.py: convolutions forward + input-gradient backward, Gram forward + backward",
        peak_memory=PEAK_MEMORY[device.type],
    )
    log(f"device: {meta['device']}, torch {meta['torch']}, commit {meta['commit'][:12]}")
    log(f"host: {meta['cpu']}, {meta['threads']} threads; CUDA {meta['cuda']}, cuDNN {meta['cudnn']}")
    log("matmul peak measured now: " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peaks.items()))
    for line in skipped:
        log(f"skipped {line}")
    log(
        f"ms/step: median of {repeats} steps after {warmup}, with the bootstrap 95% interval of the median; "
        f"peak MiB: {meta['peak_memory']}"
    )
    # Loads the weights into their cache once, so that no row's memory includes reading them.
    build(levers[0], min(sizes), device)
    log(HEADER)
    rows = []
    for size in sizes:
        for row in rows_at(size, levers, device, warmup=warmup, repeats=repeats, peaks=peaks, build=build):
            rows.append(row)
            log(format_row(row))
    fits = fit_levers(rows)
    for name, fit in fits.items():
        log(f"cost model {name}: {fit['text']}")
    return {"meta": meta, "rows": rows, "fits": fits}


def rows_at(
    size: int,
    levers: list[Lever],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    peaks: dict[str, float],
    build: StepBuilder = build_step,
) -> Iterator[dict]:
    """Each lever's row at one size, as it is timed, with its share of ``peaks`` and its speed-up.

    The speed-up is over the ``baseline`` lever's row of the same size (put it first). A generator, so
    that a caller with a deadline (``bench/gpu_check.py``) can stop between rows.
    """
    baseline = None
    for lever in levers:
        try:
            row = run_row(lever, size, device, warmup, repeats, build)
        except RuntimeError as exc:  # torch's OutOfMemoryError is a RuntimeError too
            if not is_out_of_memory(exc):
                raise
            row = {"config": lever.name, **_fields(lever), "size": size, "error": "out of memory"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "error" not in row:
            row["pct_matmul_peak"] = 100 * row["tflops"] / peaks[lever.precision]
            if lever.name == "baseline":
                baseline = row
            per_image = row["ms_per_step"] / lever.batch
            row["speedup"] = baseline["ms_per_step"] / per_image if baseline else None
        yield row


PEAK_MEMORY = {
    "cpu": "the row's peak resident set above the resident set before it (building, warm-up, timing)",
    "cuda": "the row's peak of allocated CUDA tensors above what was allocated before it",
}


def fit_levers(rows: list[dict]) -> dict[str, dict]:
    """A cost model (``bench.stats.fit_cost``) per configuration timed at two sizes or more."""
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        if "error" not in row:
            by_name.setdefault(row["config"], []).append(row)
    fits = {}
    for name, measured in by_name.items():
        if len({row["size"] for row in measured}) < 2:
            continue
        model = fit_cost(
            [row["batch"] * row["size"] ** 2 for row in measured], [row["ms_per_step"] / 1e3 for row in measured]
        )
        fits[name] = {
            "fixed_ms": model.fixed_s * 1e3,
            "ms_per_mpx": model.per_pixel_s * 1e9,
            "worst_residual": model.worst_residual,
            "text": model.describe(),
        }
    return fits


HEADER = (
    f"{'config':<16} {'size':>5} {'batch':>5} {'ms/step':>9} {'95% interval':>17} {'Mpx-steps/s':>11} "
    f"{'peak MiB':>9} {'TFLOP/s':>8} {'% peak':>7} {'speed-up':>8}"
)


def format_row(row: dict) -> str:
    head = f"{row['config']:<16} {row['size']:>5} {row['batch']:>5}"
    if "error" in row:
        return f"{head} {row['error']}"
    peak = f"{row['peak_mib']:>9.0f}" if row["peak_mib"] is not None else f"{'-':>9}"
    speedup = f"{row['speedup']:>7.2f}x" if row.get("speedup") else f"{'-':>8}"
    low, high = row["ms_ci95"]
    interval = f"{low:.1f}-{high:.1f}"
    return (
        f"{head} {row['ms_per_step']:>9.1f} {interval:>17} {row['mpx_steps_per_s']:>11.3f} {peak} "
        f"{row['tflops']:>8.3f} {row['pct_matmul_peak']:>6.1f}% {speedup}"
    )


def describe_machine(device: torch.device) -> dict:
    cpu = _cpu_model() or platform.processor() or platform.machine() or "cpu"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    return {
        "device": name,
        "device_type": device.type,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "threads": torch.get_num_threads(),
        "commit": commit + ("+dirty" if dirty else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def profile(lever_name: str, size: int, device_name: str, path: Path, steps: int = 5) -> Path:
    """A torch.profiler trace (Chrome/Perfetto JSON) of ``steps`` steps of one configuration."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = resolve_device(device_name)
    levers = {lv.name: lv for lv in matrix(device)[0]}
    if lever_name not in levers:
        raise UserError(f"configuration {lever_name!r} is not in the matrix here; available: {', '.join(levers)}")
    step, _ = build_step(levers[lever_name], size, device)
    for _ in range(5):  # warm-up, including any CUDA-graph capture
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    prof.export_chrome_trace(str(path))
    return path


def write_json(results: dict, path: Path, overwrite: bool = False) -> Path:
    """Atomically, never over an existing file unless ``overwrite``, and only into an existing folder."""
    from engine.files import write_atomically

    text = (json.dumps(results, indent=2) + "\n").encode()
    return write_atomically(path, lambda fh: fh.write(text), overwrite, what="--json file")
