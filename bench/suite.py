"""``nst bench``: the optimisation step under every speed lever, as ratios to a baseline from the same run.

For each image size, every configuration of the matrix runs the engine's own
step (``engine.optimize.make_step``: the same ``StepFunction``, losses and
CUDA-graph wrapper as ``nst stylize``) on the bundled samples, resized to a
square. Each row gives:

* ms per step: median over ``--repeats`` steps after ``--warmup`` steps
  (CUDA events on a GPU, ``perf_counter`` on the CPU, synchronised);
* Mpx-steps/s: megapixels optimised per second, batch included;
* peak memory (CUDA only: ``torch.cuda.max_memory_allocated``);
* TFLOP/s by the count in ``bench/flops.py`` and its share of the matmul
  peak measured at the start of the same run, in the row's precision;
* speed-up: the baseline's time per image-step over this row's.

The baseline is eager float32, NCHW, one image, no CUDA graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from engine import Config
from engine.api import loop_extractor
from engine.criterion import build_criterion
from engine.errors import UserError
from engine.images import load_image, resize
from engine.optimize import Objective, make_step
from engine.runtime import cpu_supports, resolve_device, resolve_runtime
from engine.vgg import downsampling

from .flops import step_flops

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DEFAULT_SIZES = {"cuda": (256, 512, 1024, 2048), "cpu": (128, 256)}
MATMUL_N = {"cuda": 8192, "cpu": 2048}  # large enough to reach the peak, small enough to time quickly


@dataclasses.dataclass(frozen=True)
class Lever:
    name: str
    precision: str = "fp32"
    memory_format: str = "contiguous"
    cuda_graphs: str = "off"
    batch: int = 1
    backend: str = "eager"
    style_loss: str = "gram"


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
    levers.append(Lever("torchscript", backend="torchscript"))
    levers.append(Lever(f"batch{batch}", batch=batch))
    fast = next((lv.precision for lv in levers if lv.precision in ("bf16", "fp16")), "tf32" if cuda else "fp32")
    together = dict(precision=fast, memory_format="channels_last", cuda_graphs="on" if cuda else "off")
    levers.append(Lever("all", **together))
    levers.append(Lever(f"all+batch{batch}", batch=batch, **together))
    # Not levers but costs: the other style losses on the baseline settings.
    levers += [Lever("loss_ot", style_loss="ot"), Lever("loss_w2", style_loss="w2")]
    return levers, skipped


def _fields(lever: Lever) -> dict:
    return {k: v for k, v in dataclasses.asdict(lever).items() if k != "name"}


def measure_matmul_peak(device: torch.device, precisions, repeats: int = 10) -> dict[str, float]:
    """TFLOP/s of an N x N x N matmul in each precision, measured now (the ceiling for the % column)."""
    n = MATMUL_N[device.type]
    dtypes = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = {}
    for precision in dict.fromkeys(precisions):
        a = torch.randn(n, n, device=device, dtype=dtypes[precision])
        b = torch.randn(n, n, device=device, dtype=dtypes[precision])
        with _tf32(device, precision == "tf32"):
            seconds = median_time(lambda: torch.mm(a, b), device, warmup=3, repeats=repeats)
        peaks[precision] = 2 * n**3 / seconds / 1e12
    return peaks


@contextlib.contextmanager
def _tf32(device: torch.device, enabled: bool):
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def median_time(fn: Callable, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def build_step(lever: Lever, size: int, device: torch.device, base: Optional[Config] = None):
    """The engine's step for ``lever`` on the samples at ``size`` x ``size``: ``(step, config)``."""
    base = base or Config()
    config = dataclasses.replace(
        base, device=device.type, precision=lever.precision, memory_format=lever.memory_format,
        cuda_graphs=lever.cuda_graphs, backend=lever.backend, batch_size=lever.batch, optimizer="adam",
        style_loss=lever.style_loss,
    )
    runtime = resolve_runtime(config, device)
    content = resize(load_image(EXAMPLES / "tubingen.jpg"), (size, size))
    style = load_image(EXAMPLES / "starry_night.jpg")
    batch = runtime.layout(content.unsqueeze(0).expand(lever.batch, -1, -1, -1))
    extractor = loop_extractor(config, runtime)
    min_side = 2 ** downsampling(config.model, config.feature_layers)
    jobs = [([style], (1.0,))] * lever.batch
    criterion = build_criterion(config, extractor, batch, jobs, min_side, runtime)
    image = batch.clone().requires_grad_(True)
    return make_step(image, Objective(extractor, criterion, runtime.autocast), "adam", config.lr, runtime), config


def run_row(lever: Lever, size: int, device: torch.device, warmup: int, repeats: int) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step, config = build_step(lever, size, device)
    seconds = median_time(step, device, warmup, repeats)
    flops = step_flops(config.model, config.feature_layers, config.style_layers, size, size, lever.batch,
                       lever.style_loss)
    return {
        "config": lever.name, **_fields(lever), "size": size, "ms_per_step": seconds * 1e3,
        "mpx_steps_per_s": lever.batch * size * size / 1e6 / seconds,
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "flops_per_step": flops["total"], "tflops": flops["total"] / seconds / 1e12,
    }


def run(sizes=None, device_name: str = "auto", warmup: int = 5, repeats: int = 20, batch: int = 4,
        only: Optional[list[str]] = None, log: Callable[[str], None] = print) -> dict:
    """The whole matrix; returns ``{"meta": ..., "rows": [...]}`` and logs the table as it goes."""
    device = resolve_device(device_name)
    levers, skipped = matrix(device, batch)
    if only:
        unknown = [name for name in only if name not in {lv.name for lv in levers}]
        if unknown:
            raise UserError(f"configuration {unknown[0]!r} is not in the matrix here; "
                            f"available: {', '.join(lv.name for lv in levers)}")
        levers = [lv for lv in levers if lv.name == "baseline" or lv.name in only]
    sizes = sizes or DEFAULT_SIZES[device.type]
    peaks = measure_matmul_peak(device, [lv.precision for lv in levers])
    meta = describe_machine(device)
    meta.update(matmul_peak_tflops=peaks, warmup=warmup, repeats=repeats, skipped=skipped,
                flop_count="bench/flops.py: convolutions forward + input-gradient backward, Gram forward + backward")
    log(f"device: {meta['device']}, torch {meta['torch']}, commit {meta['commit'][:12]}")
    log("matmul peak measured now: " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peaks.items()))
    for line in skipped:
        log(f"skipped {line}")
    log(HEADER)
    rows = []
    for size in sizes:
        baseline = None
        for lever in levers:
            try:
                row = run_row(lever, size, device, warmup, repeats)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                # CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError ("can't allocate memory").
                if not isinstance(exc, torch.OutOfMemoryError) and "allocate" not in str(exc):
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
            rows.append(row)
            log(format_row(row))
    return {"meta": meta, "rows": rows}


HEADER = (f"{'config':<16} {'size':>5} {'batch':>5} {'ms/step':>9} {'Mpx-steps/s':>11} {'peak MiB':>9} "
          f"{'TFLOP/s':>8} {'% peak':>7} {'speed-up':>8}")


def format_row(row: dict) -> str:
    head = f"{row['config']:<16} {row['size']:>5} {row['batch']:>5}"
    if "error" in row:
        return f"{head} {row['error']}"
    peak = f"{row['peak_mib']:>9.0f}" if row["peak_mib"] is not None else f"{'-':>9}"
    speedup = f"{row['speedup']:>7.2f}x" if row.get("speedup") else f"{'-':>8}"
    return (f"{head} {row['ms_per_step']:>9.1f} {row['mpx_steps_per_s']:>11.3f} {peak} "
            f"{row['tflops']:>8.3f} {row['pct_matmul_peak']:>6.1f}% {speedup}")


def describe_machine(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() or platform.processor() or platform.machine() or "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    return {
        "device": name, "device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), "commit": commit + ("+dirty" if dirty else ""),
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
    from torch.profiler import ProfilerActivity, profile as torch_profile

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


def write_json(results: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
