"""Fixed-seed runs whose outputs a refactor must not change: ``record`` them before, ``compare`` after.

    python tests/golden.py record DIR       # runs every case with the code on PYTHONPATH, writes DIR/*.npy
    python tests/golden.py compare OLD NEW  # a table: bit-identical or the largest difference, per case

The cases go through the public surfaces a user has (the Python API, ``nst`` in a subprocess, a real
``nst serve`` on loopback, ``torchrun`` with two gloo ranks), so the same script runs on the code before and
after a redesign of what lies between. Images are 96 px or less and a whole recording takes a few minutes.
Results are kept as float arrays where the surface gives floats (the API) and as 16-bit PNGs read back
where it writes files: a 16-bit file still shows a change far below what a viewer could see.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONTENT, STYLE = str(EXAMPLES / "tubingen.jpg"), str(EXAMPLES / "starry_night.jpg")
ENV = {
    "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
    "PYTHONPATH": str(ROOT),
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# 96 px over two scales (64 and 96): every scale change, carry-over included, is on the path.
SMALL = dict(device="cpu", size=96, min_size=64, steps=12, seed=3)
# ``nst`` from whichever package holds the command line (it moved out of engine/ in a redesign).
NST = (
    "import sys\n"
    "try:\n    from engine.cli import main\n"
    "except ImportError:\n    from cli.main import main\n"
    "sys.argv[0] = 'nst'\nsys.exit(main())"
)
CLI_SMALL = ["--device", "cpu", "--size", "96", "--min-size", "64", "--steps", "12", "--seed", "3", "-q"]


def _api_cases(out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from engine import Config, stylize, stylize_batch

    runs = {
        "api_gram": Config(**SMALL),
        "api_w2": Config(**SMALL, style_loss="w2"),
        "api_ot": Config(**SMALL, style_loss="ot"),
        "api_tiled_gram": Config(**SMALL, tile="40"),
        "api_tiled_w2": Config(**SMALL, tile="40", style_loss="w2"),
        "api_lbfgs": Config(**{**SMALL, "steps": 6}, optimizer="lbfgs"),
        "api_noise_init": Config(**SMALL, init="noise"),
        "api_luminance": Config(**SMALL, preserve_colors="luminance"),
    }
    for name, config in runs.items():
        np.save(out / f"{name}.npy", stylize(CONTENT, STYLE, config).image.numpy())
    # Three jobs of one size: one batch through the extractor.
    crops = [str(EXAMPLES / "tubingen.jpg"), str(EXAMPLES / "starry_night.jpg"), str(EXAMPLES / "tubingen.jpg")]
    results = stylize_batch([(c, STYLE) for c in crops], Config(**SMALL, batch_size=3))
    for i, result in enumerate(results):
        np.save(out / f"api_batch_{i}.npy", result.image.numpy())


def _png16(path: Path) -> np.ndarray:
    import png

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    return np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, info["planes"])


def _nst(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NST, *args], cwd=cwd, env=ENV, capture_output=True, text=True, check=check
    )


def _cli_cases(out: Path, work: Path) -> None:
    _nst("stylize", CONTENT, STYLE, "-o", "cli.png", "--bit-depth", "16", *CLI_SMALL, cwd=work)
    np.save(out / "cli_single.npy", _png16(work / "cli.png"))
    # A folder of three contents (two sizes: two batches).
    folder = work / "folder"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(Path(CONTENT).read_bytes())
    (folder / "c.jpg").write_bytes(Path(STYLE).read_bytes())
    _nst("stylize", str(folder), STYLE, "-o", "folder_out", "--bit-depth", "16", *CLI_SMALL, cwd=work)
    for name in ("a", "b", "c"):
        np.save(out / f"cli_folder_{name}.npy", _png16(work / "folder_out" / f"{name}.png"))
    # Interrupted by SIGINT as soon as a checkpoint exists, then resumed: the result of an uninterrupted run.
    proc = subprocess.Popen(
        [sys.executable, "-c", NST, "stylize", CONTENT, STYLE, "-o", "resumed.png", "--bit-depth", "16"]
        + ["--checkpoint-every", "4", *CLI_SMALL],
        cwd=work,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    ckpt = work / "resumed.png.ckpt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=300)
    if (work / "resumed.png").exists():
        raise SystemExit("the run finished before it could be interrupted: make it longer")
    _nst("resume", str(ckpt), "-q", cwd=work)
    np.save(out / "cli_resumed.npy", _png16(work / "resumed.png"))


def _serve_case(out: Path, work: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from serving import Server

    server = Server(work / "state")
    try:
        options = {"size": "64", "min_size": "48", "steps": "10", "seed": "3"}
        response = server.submit(options)
        assert response.status_code == 201, response.text
        job = response.json()["id"]
        state = server.wait(job)
        assert state["state"] == "done", state
        result = server.client.get(f"/jobs/{job}/result", params={"bits": "16"})
        assert result.status_code == 200, result.text
        (work / "served.png").write_bytes(result.content)
    finally:
        server.stop()
    np.save(out / "serve_job.npy", _png16(work / "served.png"))


def _torchrun_case(out: Path, work: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "scale.tiled", "stylize"]
    command += [CONTENT, STYLE, "-o", "ranks.png", "--bit-depth", "16", "--tile", "40", *CLI_SMALL]
    subprocess.run(command, cwd=work, env=ENV, capture_output=True, text=True, check=True)
    np.save(out / "torchrun_2ranks.npy", _png16(work / "ranks.png"))


def record(directory: str) -> None:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for case in (_api_cases, _cli_cases, _serve_case, _torchrun_case):
            started = time.perf_counter()
            case(out) if case is _api_cases else case(out, work)
            print(f"{case.__name__[1:]}: {time.perf_counter() - started:.1f} s", flush=True)
    print(f"recorded {len(list(out.glob('*.npy')))} outputs in {out}")


def compare(old: str, new: str) -> int:
    rows, worst = [], 0
    for path in sorted(Path(old).glob("*.npy")):
        other = Path(new) / path.name
        if not other.exists():
            rows.append((path.stem, "missing", ""))
            worst = 2
            continue
        a, b = np.load(path), np.load(other)
        if a.shape != b.shape:
            rows.append((path.stem, "shape", f"{a.shape} vs {b.shape}"))
            worst = 2
            continue
        same = a.tobytes() == b.tobytes()
        diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
        scale = 65535.0 if a.dtype == np.uint16 else 1.0
        rows.append((path.stem, "identical" if same else "differs", "" if same else f"max {diff / scale:.3g}"))
        worst = max(worst, 0 if same else 1)
    width = max(len(r[0]) for r in rows)
    for name, verdict, detail in rows:
        print(f"{name:<{width}}  {verdict:<9}  {detail}")
    print(json.dumps({"cases": len(rows), "identical": sum(r[1] == "identical" for r in rows)}))
    return worst


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
