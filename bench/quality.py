"""A quality judge for results, by measures the optimisation does not use, and quality-vs-time curves.

The judge compares a result with its content photo and its style image through
a fixed Caffe VGG19, at layers and with distances that no default loss
optimises, so that a configuration cannot score well just by minimising its
own objective harder:

* **style**: the sliced Wasserstein distance (SWD) between the result's and the
  style's feature vectors (one C-vector per pixel) at ``STYLE_LAYERS``, ten
  layers the default style loss (relu1_1 ... relu5_1) and content loss
  (relu4_2, and relu3_1 with ot) never read. Per layer, the distance is divided by the photo's own
  distance to the style, then the ten ratios are averaged: the photo scores
  1.0, the style image itself 0; lower is closer to the style.
* **content**: the relative L2 distance of the result's features to the
  photo's, ``||F(x) - F(photo)|| / ||F(photo)||``, at ``CONTENT_LAYERS``
  (relu3_2 and relu4_3, beside the default content layers relu3_1 and
  relu4_2, not on them; relu3_2 is one convolution after relu3_1),
  divided per layer by the same distance of the style image stretched
  to the photo's size, then averaged: the photo scores 0, the style image
  1.0; lower is closer to the photo.
* **colour**: the SWD between the result's and the style's pixel colours
  (RGB, the colour histograms without binning), divided by the photo's: the
  photo scores 1.0, lower has the style's colours.

The style image is resized to the result's long side (the engine's default
``--style-scale 1``). The random projections are drawn from a fixed seed
(``seed``; ``PROJECTIONS`` per layer), so a judge gives the same scores for
the same images; how much they move with that seed and with the run's own
seed is in the documentation (docs/quality.md).

``run_quality`` runs configurations on (content, style) pairs and judges
snapshots taken along each run, against the run's wall time and pixel-steps
(the sum over steps of the pixels optimised): ``nst bench quality``.
"""

from __future__ import annotations

import json
import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .memory import process_peak

STYLE_LAYERS = (
    "relu1_2",
    "relu2_2",
    "relu3_2",
    "relu3_3",
    "relu3_4",
    "relu4_3",
    "relu4_4",
    "relu5_2",
    "relu5_3",
    "relu5_4",
)
CONTENT_LAYERS = ("relu3_2", "relu4_3")
PROJECTIONS = 256  # directions per layer: the judge's own sampling noise is in docs/quality.md
COLOUR_PROJECTIONS = 256
# Points per set: larger feature maps are subsampled (a fixed random subset), which keeps the judge to about a
# second per image at 256 px; the sorted projections of 49k points at relu1_2 alone took seconds.
MAX_POINTS = 8192
MEASURES = ("style", "content", "colour")


@dataclass(frozen=True)
class Scores:
    """One result's scores (see the module's docstring) and the per-layer ratios behind them."""

    style: float
    content: float
    colour: float
    style_layers: dict = field(default_factory=dict)
    content_layers: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"style": self.style, "content": self.content, "colour": self.colour}


def _directions(channels: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    d = torch.randn(count, channels, generator=generator, dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def _sorted_projections(points: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``points (C, P)`` projected on ``directions (K, C)`` and sorted: the K one-dimensional distributions."""
    return torch.sort(directions @ points.double(), dim=1).values


def _quantiles(projections: torch.Tensor, count: int) -> torch.Tensor:
    """The sorted ``(K, P)`` projections' empirical quantile function at the ``count`` midpoints ``(i + 1/2) / count``.

    A step function, not an interpolation: between two sets whose sizes divide
    each other this gives the exact one-dimensional transport cost.
    """
    size = projections.shape[1]
    if size == count:
        return projections
    index = ((torch.arange(count, dtype=torch.float64) + 0.5) * size / count).floor().long().clamp_max(size - 1)
    return projections[:, index]


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced 2-Wasserstein distance between point sets ``a (C, P)`` and ``b (C, Q)`` along ``directions``.

    In one dimension, optimal transport pairs the sorted values; sets of
    different sizes are compared through their quantile functions at the
    larger count. The root of the mean squared difference: a distance, 0
    between a set and itself.
    """
    pa, pb = _sorted_projections(a, directions), _sorted_projections(b, directions)
    count = max(pa.shape[1], pb.shape[1])
    return float((_quantiles(pa, count) - _quantiles(pb, count)).pow(2).mean().sqrt())


def _points(features: torch.Tensor, limit: int = 0) -> torch.Tensor:
    """``(1, C, H, W)`` or ``(C, H, W)`` -> ``(C, H*W)``; with ``limit``, at most that many of the pixels.

    The subset is drawn from a fixed seed that depends on the pixel count only, so two images of one size
    are compared on the same pixels' positions (an image against itself stays at distance 0).
    """
    f = features[0] if features.dim() == 4 else features
    points = f.reshape(f.shape[0], -1)
    if limit and points.shape[1] > limit:
        generator = torch.Generator().manual_seed(points.shape[1])
        points = points[:, torch.randperm(points.shape[1], generator=generator)[:limit]]
    return points


class Judge:
    """Scores results of one (photo, style) pair; built once per pair and output size.

    ``photo`` and ``style`` are ``(3, H, W)`` images in [0, 1]; results are
    judged at the photo's size (a smaller snapshot is resized to it first).
    """

    def __init__(self, photo: torch.Tensor, style: torch.Tensor, seed: int = 0, extractor=None):
        from engine.images import fit_long_side, resize

        self.seed = seed
        self.extractor = extractor or judge_extractor()
        self.photo = photo.float()
        height, width = self.photo.shape[-2:]
        self.size = (height, width)
        self.style = resize(style.float(), fit_long_side(*style.shape[-2:], max(height, width)))
        with torch.no_grad():
            self.photo_features = self.extractor(self.photo[None])
            style_features = self.extractor(self.style[None])
            stretched = self.extractor(resize(style.float(), (height, width))[None])
        self.style_points = {name: _points(style_features[name], MAX_POINTS).double() for name in STYLE_LAYERS}
        self.directions = {
            name: _directions(self.style_points[name].shape[0], PROJECTIONS, seed * 1000 + i)
            for i, name in enumerate(STYLE_LAYERS)
        }
        self.colour_directions = _directions(3, COLOUR_PROJECTIONS, seed * 1000 + 999)
        # What 1.0 means: the photo's distances to the style, the stretched style's distances to the photo.
        self.style_reference = {name: self._style_distance(name, self.photo_features) for name in STYLE_LAYERS}
        self.colour_reference = self._colour_distance(self.photo)
        self.content_reference = {name: self._content_distance(name, stretched) for name in CONTENT_LAYERS}

    def _style_distance(self, name: str, features: dict) -> float:
        points = _points(features[name], MAX_POINTS)
        return sliced_wasserstein(points, self.style_points[name], self.directions[name])

    def _colour_distance(self, image: torch.Tensor) -> float:
        return sliced_wasserstein(_points(image, MAX_POINTS), _points(self.style, MAX_POINTS), self.colour_directions)

    def _content_distance(self, name: str, features: dict) -> float:
        target = self.photo_features[name].double()
        return float((features[name].double() - target).norm() / target.norm().clamp_min(1e-12))

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> Scores:
        from engine.images import resize

        image = image.detach().float().cpu()
        if image.dim() == 4:
            image = image[0]
        if tuple(image.shape[-2:]) != self.size:
            image = resize(image, self.size)
        features = self.extractor(image[None])
        style = {n: self._style_distance(n, features) / max(self.style_reference[n], 1e-12) for n in STYLE_LAYERS}
        content = {
            n: self._content_distance(n, features) / max(self.content_reference[n], 1e-12) for n in CONTENT_LAYERS
        }
        colour = self._colour_distance(image) / max(self.colour_reference, 1e-12)
        return Scores(
            style=sum(style.values()) / len(style),
            content=sum(content.values()) / len(content),
            colour=colour,
            style_layers=style,
            content_layers=content,
        )


_EXTRACTORS: dict = {}


def judge_extractor():
    """The judge's network: the bundled Caffe VGG19, fp32 on the CPU, up to relu5_4 (built once per process)."""
    if "vgg" not in _EXTRACTORS:
        from engine import Config
        from engine.api import build_extractor

        layers = tuple(dict.fromkeys(STYLE_LAYERS + CONTENT_LAYERS))
        _EXTRACTORS["vgg"] = build_extractor(
            Config(content_layers=(), style_layers=layers, device="cpu"), torch.device("cpu")
        )
    return _EXTRACTORS["vgg"]


# --- runs, snapshots and curves ------------------------------------------------------------------------------


def parse_config(text: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:key=value;key=value`` (Config fields; lists comma-separated) -> ``(name, overrides)``."""
    from engine import Config
    from engine.errors import UserError

    name, _, rest = text.partition(":")
    if not name:
        raise UserError(f"--config {text!r} needs a name before the colon (e.g. decay:style_layer_weights=4,2,1,1,1)")
    hints = typing.get_type_hints(Config)  # as cli/options.py reads them
    overrides = {}
    for item in filter(None, (part.strip() for part in rest.split(";"))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in hints:
            raise UserError(f"--config {text!r}: {item!r} is not key=value with a setting of stylize")
        kind = hints[key]
        kind = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind  # Optional[X]: X
        if kind is bool:
            overrides[key] = value.lower() in ("1", "true", "yes", "on")
        elif kind in (int, float):
            try:
                overrides[key] = kind(value)
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                raise UserError(f"--config {text!r}: {key} must be {what}, not {value.strip()!r}") from None
        else:
            overrides[key] = value  # strings, and lists as comma-separated strings (Config splits them)
    Config(**overrides)  # refused now, in one sentence, not after minutes of other runs
    return name, overrides


@dataclass
class _Snapshots:
    due: int
    started: float = field(default_factory=time.perf_counter)
    pixel_steps: int = 0
    points: list = field(default_factory=list)

    def __call__(self, info) -> None:
        self.pixel_steps += info.height * info.width
        if info.total_step % self.due == 0 or info.total_step == info.total_steps:
            image = info.image
            if image is not None:
                # The clock is read before the copy, so the judge's and the copy's time stay out of it.
                seconds = time.perf_counter() - self.started
                self.points.append((info.total_step, self.pixel_steps, seconds, image[0].detach().float().cpu()))


def run_one(photo_path, style_path, overrides: dict, size: int, every: int, seed: int, judge: Judge) -> dict:
    """One run of ``overrides`` on a pair, judged at its snapshots; the result image is under ``image``."""
    from engine import Callback, Config, stylize

    config = Config(**{"size": size, "seed": seed, **overrides})
    snaps = _Snapshots(every)
    callback = Callback(snaps, image_due=lambda step: step % every == 0)

    def run():
        snaps.started = time.perf_counter()  # after the peak's reset, which is not the run's time
        return stylize(photo_path, [style_path], config, callback=callback)

    # The process's peak, read before judging; it includes the snapshots' float32 copies (3 x 4 bytes a pixel each).
    result, peak = process_peak(run)
    wall = time.perf_counter() - snaps.started
    start = judge(judge.photo)
    curve = [{"step": 0, "pixel_steps": 0, "seconds": 0.0, **start.row()}]
    for step, pixel_steps, seconds, image in snaps.points:
        curve.append({"step": step, "pixel_steps": pixel_steps, "seconds": seconds, **judge(image).row()})
    final = judge(result.image)
    return {
        "seed": seed,
        "wall_seconds": wall,
        "peak_gib": None if peak is None else peak / 2**30,
        "steps": len(result.history),
        "pixel_steps": snaps.pixel_steps,
        "final": final.row(),
        "style_layers": final.style_layers,
        "content_layers": final.content_layers,
        "curve": curve,
        "image": result.image,
    }


def _gib(value: Optional[float]) -> str:
    return "unknown" if value is None else f"{value:.2f} GiB"


def run_quality(
    pairs: Sequence[tuple[str, str]],
    configs: Sequence[tuple[str, dict]],
    size: int,
    every: int,
    seeds: Sequence[int] = (0,),
    judge_seed: int = 0,
    out: Optional[Path] = None,
    log=print,
) -> dict:
    """Every config on every pair (and run seed); with ``out``, the results' PNGs are written there too."""
    import platform

    from engine import Config, stylize
    from engine.images import fit_long_side, load_image, resize, save_image

    # One tiny run first: the process's first steps pay one-off costs (kernel set-up) the first config would carry.
    stylize(pairs[0][0], [pairs[0][1]], Config(size=32, min_size=32, steps=1, style_layers=("relu1_1",)))
    rows = []
    for photo_path, style_path in pairs:
        photo = load_image(photo_path, "content image")
        photo = resize(photo, fit_long_side(*photo.shape[-2:], size))
        judge = Judge(photo, load_image(style_path, "style image"), seed=judge_seed)
        pair = f"{Path(photo_path).stem}+{Path(style_path).stem}"
        for name, overrides in configs:
            for seed in seeds:
                row = run_one(photo_path, style_path, overrides, size, every, seed, judge)
                image = row.pop("image")
                if out is not None:
                    path = out / f"{pair}_{name}_s{seed}_{size}.png"
                    save_image(image, path, overwrite=True)
                    row["image_path"] = str(path)
                row.update(pair=pair, config=name, overrides=overrides, size=size)
                rows.append(row)
                f = row["final"]
                log(
                    f"{pair:<28} {name:<14} seed {seed}: style {f['style']:.3f} content {f['content']:.3f} "
                    f"colour {f['colour']:.3f}  ({row['wall_seconds']:.0f} s, {row['steps']} steps, "
                    f"peak {_gib(row['peak_gib'])}, loaded)"
                )
    meta = {
        "judge": {
            "style_layers": STYLE_LAYERS,
            "content_layers": CONTENT_LAYERS,
            "projections": PROJECTIONS,
            "seed": judge_seed,
        },
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "size": size,
        "snapshot_every": every,
        "commit": _commit(),
    }
    return {"meta": meta, "rows": rows}


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except OSError:
        return ""


def write_json(results: dict, path: Path, overwrite: bool = False) -> Path:
    from engine.files import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda fh: fh.write(json.dumps(results, indent=1).encode()), overwrite, "--json file")
    return path


def plot_curves(results: dict, path: Path, x: str = "seconds") -> Path:
    """Quality against wall time (or ``x="pixel_steps"``, which no load moves): one column per pair, one row per
    measure, one line per configuration (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(
        len(MEASURES), len(pairs), figsize=(4 * len(pairs), 2.6 * len(MEASURES)), dpi=80, squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, pair in enumerate(pairs):
        for row_index, measure in enumerate(MEASURES):
            ax = axes[row_index][col]
            for k, name in enumerate(configs):
                runs = [r for r in rows if r["pair"] == pair and r["config"] == name]
                for j, run in enumerate(runs):
                    # A run judged only at its end is a point: a line from the photo would invent its curve.
                    points = run["curve"] if len(run["curve"]) > 2 else run["curve"][-1:]
                    xs = [p[x] / (1e6 if x == "pixel_steps" else 1) for p in points]
                    ys = [p[measure] for p in points]
                    ax.plot(
                        xs,
                        ys,
                        color=colours[k % len(colours)],
                        alpha=1.0 if j == 0 else 0.4,
                        label=name if j == 0 else None,
                        marker="." if len(points) > 1 else "x",
                        markersize=3 if len(points) > 1 else 7,
                    )
            ax.set_title(f"{pair}: {measure}", fontsize=9)
            ax.set_xlabel("seconds (loaded CPU)" if x == "seconds" else "million pixel-steps", fontsize=8)
            ax.grid(alpha=0.3)
            if row_index == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def summary(results: dict) -> list[str]:
    """The final scores as a table, the mean over seeds per pair and configuration."""
    lines = [f"{'pair':<28} {'config':<14} {'style':>6} {'content':>8} {'colour':>7} {'seconds':>8}"]
    groups: dict = {}
    for r in results["rows"]:
        groups.setdefault((r["pair"], r["config"]), []).append(r)
    for (pair, name), runs in groups.items():
        mean = {m: sum(r["final"][m] for r in runs) / len(runs) for m in MEASURES}
        secs = sum(r["wall_seconds"] for r in runs) / len(runs)
        lines.append(
            f"{pair:<28} {name:<14} {mean['style']:6.3f} {mean['content']:8.3f} {mean['colour']:7.3f} {secs:8.0f}"
        )
    return lines


# Within the judge's own noise (docs/quality.md: two standard deviations of its sampling on style and colour;
# content has no sampling, the same margin is kept for it).
REACH_TOLERANCE = {"style": 0.01, "content": 0.01, "colour": 0.012}


def reached(point: dict, target: dict, tolerance: Optional[dict] = None) -> bool:
    """Whether a snapshot's scores are as good as ``target``'s on every measure, within ``tolerance``."""
    tolerance = REACH_TOLERANCE if tolerance is None else tolerance
    return all(point[m] <= target[m] + tolerance[m] for m in MEASURES)


def time_to_quality(results: dict, baseline: str) -> list[dict]:
    """For each pair and configuration (seed 0), when its run first reached the final quality of ``baseline``'s
    run on the same pair (``reached``): seconds and pixel-steps, None if it never did; beside them the
    baseline's own wall time, from the same run of the bench."""
    rows = [r for r in results["rows"] if r["seed"] == min(x["seed"] for x in results["rows"])]
    out = []
    for pair in dict.fromkeys(r["pair"] for r in rows):
        base = next((r for r in rows if r["pair"] == pair and r["config"] == baseline), None)
        if base is None:
            continue
        for run in (r for r in rows if r["pair"] == pair):
            hit = next((p for p in run["curve"] if reached(p, base["final"])), None)
            if hit is None and reached(run["final"], base["final"]):
                hit = {"seconds": run["wall_seconds"], "pixel_steps": run["pixel_steps"]}
            out.append(
                {
                    "pair": pair,
                    "config": run["config"],
                    "baseline": baseline,
                    "target": base["final"],
                    "seconds": None if hit is None else hit["seconds"],
                    "pixel_steps": None if hit is None else hit["pixel_steps"],
                    "baseline_seconds": base["wall_seconds"],
                    "speedup": None if hit is None else base["wall_seconds"] / hit["seconds"],
                }
            )
    return out


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
