"""Do the exported graphs compute what the eager extractor computes?

``validate`` runs the eager extractor, the TorchScript graph and the ONNX
graph under ONNX Runtime on real images at several sizes, and compares every
layer against eager. The error of a layer is ``max |f - e| / max |e|``: the
largest deviation relative to the layer's own scale. (An element-wise
relative error is meaningless after a ReLU, where most values are 0.) The
check fails when any error exceeds the tolerance for the device.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from engine.api import build_extractor, resolve_device
from engine.config import Config
from engine.errors import UserError, option
from engine.images import ImageLike, fit_long_side, load_image, resize
from engine.sizes import check_size

from . import onnx_export, ort, torchscript
from .artifact import describe, mismatches

BACKENDS = ("torchscript", "onnxruntime")
# float32 on the CPU: both backends run float32 kernels, so only summation order differs (~1e-6
# measured). On CUDA, cuDNN and ORT may use TF32 convolutions (10-bit mantissa), hence the wider bound.
TOLERANCE = {"cpu": 1e-4, "cuda": 5e-3}
DEFAULT_SIZES = ("256", "161")  # long sides: the second gives odd heights and widths
# The settings an artifact's description fixes; validate reads them from it unless the caller gives them.
DESCRIBED = ("model", "pooling", "padding", "content_layers", "style_layers")
Size = Union[int, tuple[int, int]]


@dataclass(kw_only=True)
class Check:
    image: str
    height: int
    width: int
    backend: str
    layer: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance


@dataclass(kw_only=True)
class Report:
    device: str
    checks: list[Check] = field(default_factory=list)
    # (image, height, width) -> {backend: median forward milliseconds}
    times: dict[tuple[str, int, int], dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def worst(self, backend: str) -> Optional[Check]:
        mine = [c for c in self.checks if c.backend == backend]
        return max(mine, key=lambda c: c.error) if mine else None

    def format(self) -> str:
        backends = list(dict.fromkeys(c.backend for c in self.checks))
        lines = [f"{'image':<20} {'size':>9}  {'layer':<8} " + " ".join(f"{b:>12}" for b in backends)]
        rows: dict[tuple, dict[str, Check]] = {}
        for c in self.checks:
            rows.setdefault((c.image, c.height, c.width, c.layer), {})[c.backend] = c
        for (image, h, w, layer), by_backend in rows.items():
            cells = []
            for b in backends:
                c = by_backend.get(b)
                cells.append(f"{'-':>12}" if c is None else f"{c.error:>11.1e}{' ' if c.passed else '!'}")
            lines.append(f"{image[:20]:<20} {f'{w}x{h}':>9}  {layer:<8} " + " ".join(cells))  # WxH, as given
        timed = list(dict.fromkeys(b for t in self.times.values() for b in t))
        lines += ["", "forward time, median (ms)", f"{'image':<20} {'size':>9}  " + " ".join(f"{b:>12}" for b in timed)]
        for (image, h, w), t in self.times.items():
            cells = " ".join(f"{t[b]:>12.1f}" if b in t else f"{'-':>12}" for b in timed)
            lines.append(f"{image[:20]:<20} {f'{w}x{h}':>9}  {cells}")
        lines += [""] + self.notes
        failed = [c for c in self.checks if not c.passed]
        if failed:
            worst = max(failed, key=lambda c: c.error)
            lines.append(
                f"FAIL: {len(failed)} of {len(self.checks)} layer errors exceed their tolerance; "
                f"worst: {worst.backend} {worst.layer} at {worst.width}x{worst.height} ({worst.image}): "
                f"{worst.error:.2e} > {worst.tolerance:.0e}"
            )
        else:
            lines.append(f"PASS: all {len(self.checks)} layer errors within tolerance")
        return "\n".join(lines)


def parse_size(text: str) -> Size:
    """``"256"`` (long side, aspect kept) or ``"131x97"`` (width x height, as every size the tool prints).

    Returns a long side or an ``(height, width)`` pair (torch's order).
    """
    try:
        if "x" in text.lower():
            w, h = (int(p) for p in text.lower().split("x"))
            size: Size = (h, w)
            ok = h > 0 and w > 0
        else:
            size = int(text)
            ok = size > 0
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"size {text!r} is not a positive long side like 256 or WIDTHxHEIGHT like 131x97")
    return size


def validate(
    images: Sequence[ImageLike],
    config: Optional[Config] = None,
    *,
    sizes: Sequence[Union[str, Size]] = DEFAULT_SIZES,
    backends: Sequence[str] = BACKENDS,
    torchscript_path: Optional[os.PathLike] = None,
    onnx_path: Optional[os.PathLike] = None,
    repeats: int = 3,
    tolerance: Optional[float] = None,
) -> Report:
    """Compare ``backends`` against eager on ``images`` at ``sizes``; see the module docstring.

    Without ``torchscript_path`` the graph the loop would use (the cache) is
    checked; without ``onnx_path`` a fresh ONNX export is made in a
    temporary folder.
    """
    if config is None:
        config = config_from_artifact(Config(), torchscript_path, onnx_path)
    if not backends:
        raise UserError(f"no backend to validate; choose from {', '.join(BACKENDS)}")
    for backend in backends:
        if backend not in BACKENDS:
            raise UserError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if repeats < 1:
        raise UserError(f"repeats must be at least 1, not {repeats}")
    if tolerance is not None and not (0 < tolerance < float("inf")):
        raise UserError(f"tolerance must be a finite number greater than zero, not {tolerance!r}")
    if not images:
        raise UserError("validate needs at least one image")
    sizes = [parse_size(s) if isinstance(s, str) else s for s in sizes]
    for kind, given in (("TorchScript artifact", torchscript_path), ("ONNX model", onnx_path)):
        if given is not None and not Path(given).is_file():
            raise UserError(f"{kind} {os.fspath(given)!r} does not exist or is not a file")
    # Decoded first, so a bad image fails before any export work.
    pictures = []
    for index, source in enumerate(images):
        name = Path(source).name if isinstance(source, (str, os.PathLike)) else f"image {index + 1}"
        pictures.append((name, load_image(source, "image")))
    shapes = []  # every (name, picture, height, width), each size checked before any work
    for name, picture in pictures:
        for size in sizes:
            hw = size if isinstance(size, tuple) else fit_long_side(*picture.shape[-2:], size)
            check_size(
                config,
                *hw,
                f"{name} at size {size if isinstance(size, int) else f'{hw[1]}x{hw[0]}'}",
                advice=f"use larger {option('sizes')} or shallower layers",
            )
            shapes.append((name, picture, hw))
    device = resolve_device(config.device)
    tol = TOLERANCE[device.type] if tolerance is None else tolerance
    eager = build_extractor(config, device)
    wanted = describe(eager)
    report = Report(device=str(device))
    runners: dict[str, Callable] = {"eager": eager}
    with tempfile.TemporaryDirectory(prefix="nst-validate-") as tmp:
        if "torchscript" in backends:
            if torchscript_path is None:
                runners["torchscript"] = torchscript.cached(eager)
            else:
                module, meta = torchscript.load(torchscript_path, device)
                _note_meta(report, "TorchScript", torchscript_path, meta, wanted)
                runners["torchscript"] = module
        if "onnxruntime" in backends:
            path = onnx_path or onnx_export.export(eager, Path(tmp) / "extractor.onnx")
            runner = ort.OrtExtractor(path, device=config.device)
            if onnx_path is not None:
                _note_meta(report, "ONNX", onnx_path, runner.meta, wanted)
            report.notes.append(f"onnxruntime providers: {', '.join(runner.providers)}")
            runners["onnxruntime"] = runner
        for name, picture, hw in shapes:
            batch = resize(picture, hw).unsqueeze(0).to(device)
            _compare(report, name, batch, runners, eager.output_names, tol, repeats)
    report.notes.append(
        f"tolerance {tol:.0e} ({str(next(eager.parameters()).dtype).removeprefix('torch.')} on {device.type}); "
        "error = max|backend - eager| / max|eager| per layer"
    )
    return report


def config_from_artifact(config: Config, torchscript_path=None, onnx_path=None, given=()) -> Config:
    """``config`` with the model, pooling, padding and layers an artifact describes (those not in ``given``).

    The description does not name the weights' source, only their hash: a
    VGG16 artifact is read with ImageNet weights (the bundled ones are VGG19),
    and any other difference is reported by the check's notes.
    """
    meta: dict = {}
    if torchscript_path is not None and Path(torchscript_path).is_file():
        meta = torchscript.load(torchscript_path, torch.device("cpu"))[1]
    elif onnx_path is not None and Path(onnx_path).is_file():
        meta = onnx_export.read_meta(onnx_path)
    if not meta.get("model") or not meta.get("outputs"):
        return config
    changes = {
        "model": meta["model"],
        "pooling": meta.get("pooling", config.pooling),
        "padding": meta.get("padding", "zeros"),  # older descriptions: all their graphs padded with zeros
        "content_layers": (),
        "style_layers": tuple(meta["outputs"]),
    }
    changes = {k: v for k, v in changes.items() if k not in given}
    if "content_layers" in given or "style_layers" in given:  # the caller chose the layers: keep both lists
        changes.pop("content_layers", None)
        changes.pop("style_layers", None)
    if changes.get("model") == "vgg16" and "weights" not in given and config.weights == "caffe":
        changes["weights"] = "imagenet"
    return dataclasses.replace(config, **changes)


def _note_meta(report: Report, kind: str, path, meta: dict, wanted: dict) -> None:
    if not meta:
        report.notes.append(f"{kind} artifact {os.fspath(path)} carries no description; compared by its outputs only")
        return
    differences = mismatches(meta, wanted)
    if differences:
        report.notes.append(f"{kind} artifact {os.fspath(path)} was described as built with " + "; ".join(differences))


@torch.no_grad()
def _compare(report: Report, name: str, batch: torch.Tensor, runners: dict, layers, tol: float, repeats: int) -> None:
    h, w = batch.shape[-2:]
    timings: dict[str, float] = {}
    results = {}
    for backend, run in runners.items():
        results[backend] = run(batch)  # the first call also warms up (allocations, autotuning)
        timings[backend] = _median_ms(run, batch, repeats)
    report.times[(name, h, w)] = timings
    reference = results["eager"]
    for backend, out in results.items():
        if backend == "eager":
            continue
        for layer in layers:
            if layer not in out:
                raise UserError(f"the {backend} extractor has no output {layer!r}; it offers {', '.join(out)}")
            e, f = reference[layer].float(), out[layer].float()
            if e.shape != f.shape:
                raise UserError(
                    f"the {backend} extractor gives {layer} of shape {tuple(f.shape)}, eager {tuple(e.shape)}"
                )
            scale = e.abs().max().item() or 1.0
            error = (f - e).abs().max().item() / scale
            error = error if error == error else float("inf")  # NaN counts as a failure
            report.checks.append(
                Check(image=name, height=h, width=w, backend=backend, layer=layer, error=error, tolerance=tol)
            )


def _median_ms(run: Callable, batch: torch.Tensor, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        if batch.is_cuda:
            torch.cuda.synchronize(batch.device)
        started = time.perf_counter()
        run(batch)
        if batch.is_cuda:
            torch.cuda.synchronize(batch.device)
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)
