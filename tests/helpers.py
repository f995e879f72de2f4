"""Shared by the tests: running ``nst`` in subprocesses, and a control that interrupts a run."""

import hashlib
import subprocess
import sys
from pathlib import Path

from engine.control import Control

ROOT = Path(__file__).resolve().parents[1]
# A bare environment, so that nothing from the caller's (warnings filters, CUDA settings) reaches stderr;
# one thread each, since the runs share the machine.
ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMEOUT = 300


def run_together(jobs, env=None):
    """Run ``{key: (args, cwd)}`` of ``python -m cli ARGS`` at once; ``{key: CompletedProcess}``."""
    procs = {}
    try:
        for key, (args, cwd) in jobs.items():
            procs[key] = subprocess.Popen(
                [sys.executable, "-m", "cli", *map(str, args)],
                cwd=cwd,
                env={**ENV, **(env or {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        results = {}
        for key, proc in procs.items():
            out, err = proc.communicate(timeout=TIMEOUT)
            results[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return results
    finally:
        for proc in procs.values():  # only after a failure above: a timeout or a failed start
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(folder):
    """Every file and folder under ``folder``, with a hash of each file's bytes."""
    return {str(p.relative_to(folder)): ("<dir>" if p.is_dir() else sha(p)) for p in sorted(Path(folder).rglob("*"))}


def one_error_line(result):
    """The single non-empty stderr line of a failed run, after checking there is exactly one."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nst: error: "), lines[0]
    return lines[0]


def stop_after(n):
    """A control that asks for an interrupt at the ``n``-th step (its watch runs once per step)."""
    calls = [0]

    def watch():
        calls[0] += 1
        if calls[0] == n:
            control.interrupt()

    control = Control(watch=watch)
    return control
