"""``nst bench compare OLD.json NEW.json``: which rows got faster or slower, beyond the noise.

Rows are matched by configuration and size. For each pair the ratio of the
medians NEW/OLD comes with a bootstrap 95% interval (``bench/stats.py``),
computed from every repeat both runs recorded. A row is marked

* ``slower`` when the whole interval lies above 1 and the ratio is above
  ``1 + noise``; ``faster`` likewise below 1 and below ``1 - noise``;
* ``~`` otherwise: the change is inside the noise;
* ``?`` when either file kept no repeats (an older file): the ratio alone.

The interval only sees the noise *within* each run (step to step). Between
two runs a shared machine also drifts (other load, clocks, caches), which
no run's repeats can show; ``noise`` (``--noise PCT``) is the floor for that.

Either file may also be pytest-benchmark's JSON (``pytest bench/
--benchmark-enable --benchmark-json=PATH``): its benchmarks are rows named
after the test, and its rounds (``stats.data``) are the repeats. A file
without them gets the ratio of the medians alone, never marked.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from engine.errors import UserError

from .stats import ratio_interval

Key = tuple[str, Optional[int]]


@dataclasses.dataclass(frozen=True)
class Timings:
    """One recorded run: a description line and ``{(config, size): (median ms, repeats in ms or None)}``."""

    label: str
    rows: dict[Key, tuple[float, Optional[list[float]]]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Change:
    key: Key
    old_ms: float
    new_ms: float
    ratio: float
    interval: Optional[tuple[float, float]]  # None when either run kept no repeats
    verdict: str  # "slower", "faster" or "~"


@dataclasses.dataclass(frozen=True)
class Comparison:
    changes: list[Change]
    only_old: list[Key]
    only_new: list[Key]


def load(path: Path) -> Timings:
    """A run written by ``nst bench --json`` or by pytest-benchmark's ``--benchmark-json``."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not a JSON file") from None
    if isinstance(data, dict) and isinstance(data.get("rows"), list) and "meta" in data:
        meta = data["meta"]
        rows = {}
        for row in data["rows"]:
            if "error" not in row:
                rows[row["config"], row["size"]] = (row["ms_per_step"], row.get("samples_ms"))
        label = (
            f"{meta.get('device')}, {meta.get('threads')} threads, torch {meta.get('torch')}, "
            f"commit {str(meta.get('commit'))[:12]}, {meta.get('date')}"
        )
        return Timings(label, rows)
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        rows = {}
        for bench in data["benchmarks"]:
            stats = bench["stats"]
            samples = [t * 1e3 for t in stats["data"]] if stats.get("data") else None
            rows[bench["name"], None] = (stats["median"] * 1e3, samples)
        machine = data.get("machine_info", {})
        commit = data.get("commit_info", {}).get("id") or "unknown"
        label = (
            f"pytest-benchmark, {machine.get('cpu', {}).get('brand_raw', machine.get('node', '?'))}, "
            f"commit {str(commit)[:12]}, {data.get('datetime')}"
        )
        return Timings(label, rows)
    raise UserError(f"{path} is neither an `nst bench --json` file nor a pytest-benchmark JSON file")


def compare(old: Timings, new: Timings, noise: float = 0.20) -> Comparison:
    changes = []
    for key in (k for k in old.rows if k in new.rows):
        (old_ms, old_samples), (new_ms, new_samples) = old.rows[key], new.rows[key]
        if old_samples and new_samples:
            ratio, low, high = ratio_interval(old_samples, new_samples)
            interval = (low, high)
            verdict = "slower" if low > 1 and ratio > 1 + noise else "faster" if high < 1 and ratio < 1 - noise else "~"
        else:
            ratio, interval, verdict = new_ms / old_ms, None, "?"
        changes.append(Change(key=key, old_ms=old_ms, new_ms=new_ms, ratio=ratio, interval=interval, verdict=verdict))
    return Comparison(changes, [k for k in old.rows if k not in new.rows], [k for k in new.rows if k not in old.rows])


def _name(key: Key) -> str:
    return key[0] if key[1] is None else f"{key[0]} {key[1]}"


def report(result: Comparison, old: Timings, new: Timings, noise: float) -> list[str]:
    lines = [
        f"old: {old.label}",
        f"new: {new.label}",
        f"marked: the 95% interval of NEW/OLD excludes 1 and the change exceeds the {100 * noise:.0f}% "
        f"run-to-run floor (--noise)",
        f"{'config':<28} {'old ms':>9} {'new ms':>9} {'new/old':>8} {'95% interval':>15}  verdict",
    ]
    for change in result.changes:
        interval = f"{change.interval[0]:.2f}-{change.interval[1]:.2f}x" if change.interval else "no repeats"
        lines.append(
            f"{_name(change.key):<28} {change.old_ms:>9.1f} {change.new_ms:>9.1f} {change.ratio:>7.2f}x "
            f"{interval:>15}  {change.verdict}"
        )
    for label, keys in (("old", result.only_old), ("new", result.only_new)):
        if keys:
            lines.append(f"only in {label}: " + ", ".join(map(_name, keys)))
    counts = {v: sum(c.verdict == v for c in result.changes) for v in ("slower", "faster", "~", "?")}
    summary = (
        f"{len(result.changes)} rows compared: {counts['slower']} slower, {counts['faster']} faster, "
        f"{counts['~']} within the noise"
    )
    if counts["?"]:
        summary += f", {counts['?']} not judged (a file kept no repeats)"
    lines.append(summary)
    return lines


def too_slow(result: Comparison, percent: float) -> list[Change]:
    """The rows marked slower whose ratio exceeds ``1 + percent / 100``."""
    return [c for c in result.changes if c.verdict == "slower" and c.ratio > 1 + percent / 100]
