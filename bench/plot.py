"""``nst bench --plot DIR``: the run's rows as PNG charts (matplotlib, no display needed).

One line per configuration, against the pixels one step optimises (batch x
side x side), so that a batch row sits where its work does:

* ``time.png``: ms per step, log-log, with each median's 95% interval and the
  fitted cost model (dashed) where there is one;
* ``memory.png``: peak memory, log-log (as measured by ``bench/memory.py``);
* ``speedup.png``: each configuration's speed-up per image over the baseline,
  against the pixels of one image (so that rows of the same size line up);
* ``peak.png``: the share of the measured matmul peak.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHARTS = ("time", "memory", "speedup", "peak")
_DPI = 80


def _series(rows: list[dict], value, per_image: bool = False) -> dict[str, tuple[list[float], list[float]]]:
    """``{config: (megapixels per step, or per image, values)}`` over the rows that have a value, in size order."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in sorted((r for r in rows if "error" not in r), key=lambda r: r["batch"] * r["size"] ** 2):
        y = value(row)
        if y is None:
            continue
        xs, ys = series.setdefault(row["config"], ([], []))
        xs.append((1 if per_image else row["batch"]) * row["size"] ** 2 / 1e6)
        ys.append(y)
    return series


def charts(results: dict) -> dict:
    """``{name: matplotlib Figure}`` for the rows of ``results`` (as ``bench.suite.run`` returns them)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    rows, meta, fits = results["rows"], results["meta"], results.get("fits", {})
    title = f"{meta['device']}, {meta['threads']} threads, torch {meta['torch']}"
    figures = {}

    def figure(name: str, ylabel: str, log_y: bool, xlabel: str = "megapixels per step (batch x side²)"):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=_DPI)
        ax.set_xscale("log")
        axes = [ax.xaxis]
        if log_y:
            ax.set_yscale("log")
            axes.append(ax.yaxis)
        for axis in axes:  # 2000, not 2x10^3; minor ticks labelled when a decade holds few majors
            axis.set_major_formatter(LogFormatter())
            axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.5)))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        figures[name] = fig
        return ax

    ax = figure("time", "ms per step (median, 95% interval)", log_y=True)
    spreads = {(r["config"], r["batch"] * r["size"] ** 2 / 1e6): r.get("ms_ci95") for r in rows if "error" not in r}
    for name, (xs, ys) in _series(rows, lambda r: r["ms_per_step"]).items():
        low = [y - (spreads[name, x] or (y, y))[0] for x, y in zip(xs, ys)]
        high = [(spreads[name, x] or (y, y))[1] - y for x, y in zip(xs, ys)]
        drawn = ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=name)
        if name in fits:
            fit = fits[name]
            grid = np.geomspace(min(xs), max(xs), 50)
            ax.plot(
                grid,
                fit["fixed_ms"] + fit["ms_per_mpx"] * grid,
                linestyle="--",
                linewidth=1,
                color=drawn[0].get_color(),
                label=f"{name}: {fit['fixed_ms']:.0f} ms + {fit['ms_per_mpx']:.0f} ms/Mpx",
            )

    ax = figure("memory", "peak MiB above the level before the row", log_y=True)
    for name, (xs, ys) in _series(rows, lambda r: r["peak_mib"] if r.get("peak_mib") else None).items():
        ax.plot(xs, ys, marker="o", label=name)

    ax = figure("speedup", "speed-up per image over the baseline", log_y=False, xlabel="megapixels per image (side²)")
    ax.axhline(1.0, color="grey", linewidth=1)
    for name, (xs, ys) in _series(rows, lambda r: r.get("speedup"), per_image=True).items():
        ax.plot(xs, ys, marker="o", label=name)

    ax = figure("peak", "% of the measured matmul peak", log_y=False)
    for name, (xs, ys) in _series(rows, lambda r: r.get("pct_matmul_peak")).items():
        ax.plot(xs, ys, marker="o", label=name)

    for fig in figures.values():
        ax = fig.axes[0]
        if ax.get_lines() or ax.containers:
            ax.legend(fontsize=7)
        fig.tight_layout()
    return figures


def write_charts(results: dict, folder: Path) -> list[Path]:
    """Write every chart of :func:`charts` as ``folder/NAME.png``; the paths written."""
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in charts(results).items():
        path = folder / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
