"""A bounded load test of ``nst serve`` on loopback (not part of the test suite; it takes minutes).

    python -m serve.loadtest [--jobs 50] [--clients 10] [--size 32] [--steps 10] [--max-queued 8]
    python -m serve.loadtest --compare 6 --size 128 --steps 40     # jobs/minute: service vs nst stylize
    python -m serve.loadtest --attack styles [--requests 8] [--styles 8] [--side 7000] [--root CHECKOUT]
    python -m serve.loadtest --attack headers [--root CHECKOUT]

``--attack styles`` queues REQUESTS jobs (behind a long one, so that they wait) of STYLES near-limit style
images each (SIDE x SIDE PNGs of a few hundred KB: the decoding bomb the pixel limit still lets through)
and reports the server's peak resident memory (VmHWM). ``--attack headers`` opens a connection, sends half
of a request's headers and times how long the server holds it (60 s at most). ``--root`` runs the server
of another checkout (to measure an older version the same way).

Starts a real server (``python -m serve``, one CPU thread per process unless OMP_NUM_THREADS says
otherwise) on a fresh state directory, then CLIENTS threads submit JOBS small jobs between them through
httpx. A job is either accepted (201) and must end ``done``, or refused with 429 (queue full) and is
counted as such: anything else, or an accepted job that never ends, is "lost". The server's resident
memory is sampled from /proc every half second. ``--compare N`` instead times N jobs of the same size
through the service (submitted together) against the same N jobs as separate ``nst stylize`` processes,
one after another, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, state: Path, *args: str, root: Path = ROOT):
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        command = [sys.executable, "-m", "serve", "--port", "0", "--state-dir", str(state), "--device", "cpu", *args]
        # cwd: `python -m` puts the working directory first on the path, before PYTHONPATH.
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, cwd=root)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        line = lines.get(timeout=180)
        self.url = line.split("listening on ", 1)[1].strip()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def options(args) -> dict:
    return {
        "content_sample": "tubingen.jpg",
        "style_sample": "starry_night.jpg",
        "size": str(args.size),
        "min_size": str(args.size),
        "steps": str(args.steps),
    }


def load(args) -> dict:
    import httpx

    with tempfile.TemporaryDirectory() as state:
        server = Server(Path(state), "--max-queued", str(args.max_queued))
        samples, stop = [], threading.Event()

        def sample():
            while not stop.is_set():
                samples.append((time.monotonic(), rss_mib(server.proc.pid)))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        outcomes: list[str] = []
        lock = threading.Lock()
        per_client = [args.jobs // args.clients + (i < args.jobs % args.clients) for i in range(args.clients)]

        def client(count: int):
            with httpx.Client(base_url=server.url, timeout=120) as http:
                for _ in range(count):
                    response = http.post("/jobs", data=options(args))
                    if response.status_code == 429:
                        outcome = "refused (429)"
                    elif response.status_code != 201:
                        outcome = f"lost: HTTP {response.status_code}"
                    else:
                        outcome = follow(http, response.json()["id"])
                    with lock:
                        outcomes.append(outcome)

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - started
        stop.set()
        sampler.join()
        server.stop()
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    rss = [r for _, r in samples]
    quarter = max(1, len(rss) // 4)
    return {
        "jobs": args.jobs,
        "clients": args.clients,
        "outcomes": counts,
        "lost": sum(v for k, v in counts.items() if k.startswith("lost")),
        "wall_s": round(wall, 1),
        "done_per_minute": round(counts.get("done", 0) / wall * 60, 1),
        "rss_mib": {
            "first": round(rss[0], 1),
            "first_quarter_max": round(max(rss[:quarter]), 1),
            "last_quarter_max": round(max(rss[-quarter:]), 1),
            "max": round(max(rss), 1),
            "last": round(rss[-1], 1),
            "samples": len(rss),
            # the largest sample in each tenth of the run: flat, or still growing at the end?
            "by_tenth": [
                round(max(rss[i * len(rss) // 10 : (i + 1) * len(rss) // 10] or [rss[-1]]), 1) for i in range(10)
            ],
        },
    }


def follow(http, job_id: str, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = http.get(f"/jobs/{job_id}").json()["state"]
        if state in ("done", "failed", "cancelled"):
            return state if state == "done" else f"lost: {state}"
        time.sleep(0.25)
    return "lost: never finished"


def compare(args) -> dict:
    import httpx

    n = args.compare
    with tempfile.TemporaryDirectory() as state:
        server = Server(Path(state), "--max-queued", str(n))
        with httpx.Client(base_url=server.url, timeout=120) as http:
            started = time.monotonic()
            ids = [http.post("/jobs", data=options(args)).json()["id"] for _ in range(n)]
            states = [follow(http, i) for i in ids]
            service = time.monotonic() - started
        server.stop()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        started = time.monotonic()
        for k in range(n):
            subprocess.run(
                [sys.executable, "-m", "cli", "stylize", str(EXAMPLES / "tubingen.jpg"),
                 str(EXAMPLES / "starry_night.jpg"), "-o", str(Path(state) / f"cli{k}.png"), "--device", "cpu",
                 "--size", str(args.size), "--min-size", str(args.size), "--steps", str(args.steps), "-q"],
                env=env, check=True,
            )  # fmt: skip
        cli = time.monotonic() - started
    return {
        "jobs": n,
        "size": args.size,
        "steps": args.steps,
        "service_states": states,
        "service_s": round(service, 1),
        "service_jobs_per_minute": round(n / service * 60, 2),
        "cli_s": round(cli, 1),
        "cli_jobs_per_minute": round(n / cli * 60, 2),
    }


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def near_limit_png(side: int) -> bytes:
    """A side x side RGB PNG of a smooth pattern: millions of pixels in a few hundred KB."""
    import io

    import numpy as np
    from PIL import Image

    ramp = np.arange(side, dtype=np.uint16)
    arr = np.empty((side, side, 3), dtype=np.uint8)
    arr[..., 0] = (ramp[None, :] // 32) % 256
    arr[..., 1] = (ramp[:, None] // 32) % 256
    arr[..., 2] = 128
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def attack_styles(args) -> dict:
    import httpx

    style = near_limit_png(args.side)
    small = {"content_sample": "tubingen.jpg", "size": "64", "min_size": "64"}
    with tempfile.TemporaryDirectory() as state:
        server = Server(Path(state) / "s", root=Path(args.root))
        base = peak_rss_mib(server.proc.pid)
        outcomes = []
        try:
            with httpx.Client(base_url=server.url, timeout=600) as http:
                # A long job first, so that the others wait in the queue with whatever they keep.
                blocker = http.post("/jobs", data={**small, "style_sample": "starry_night.jpg", "steps": "100000"})
                started = time.monotonic()

                def one(_):
                    files = [("style", (f"s{k}.png", style, "image/png")) for k in range(args.styles)]
                    try:
                        r = http.post("/jobs", data={**small, "steps": "50"}, files=files)
                        return f"{r.status_code}" + ("" if r.status_code == 201 else f" {r.json()['detail'][:80]}")
                    except httpx.HTTPError as exc:
                        return f"error {type(exc).__name__}"

                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(args.requests) as pool:
                    outcomes = list(pool.map(one, range(args.requests)))
                wall = time.monotonic() - started
                alive = server.proc.poll() is None
                peak = peak_rss_mib(server.proc.pid) if alive else float("nan")
                if blocker.status_code == 201:
                    http.delete(f"/jobs/{blocker.json()['id']}")
        finally:
            if server.proc.poll() is None:
                server.stop()
    return {
        "root": str(args.root),
        "requests": args.requests,
        "styles_per_request": args.styles,
        "style_png": f"{args.side}x{args.side}, {len(style) / 1024:.0f} KiB",
        "outcomes": outcomes,
        "server_alive": alive,
        "rss_at_start_mib": round(base, 1),
        "peak_rss_mib": round(peak, 1),
        "wall_s": round(wall, 1),
    }


def attack_headers(args) -> dict:
    import socket

    with tempfile.TemporaryDirectory() as state:
        server = Server(Path(state) / "s", root=Path(args.root))
        try:
            host, port = server.url.removeprefix("http://").rsplit(":", 1)
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: slow")  # and nothing more
            sock.settimeout(60)
            started = time.monotonic()
            try:
                closed = sock.recv(1024) == b""
            except (socket.timeout, TimeoutError):
                closed = False
            except ConnectionResetError:
                closed = True
            held = time.monotonic() - started
            sock.close()
        finally:
            server.stop()
    return {"root": str(args.root), "closed_by_server": closed, "held_s": round(held, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=50)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-queued", type=int, default=8)
    p.add_argument("--compare", type=int, metavar="N", help="time N jobs through the service vs nst stylize")
    p.add_argument("--attack", choices=("styles", "headers"), help="measure one of the hostile cases (see above)")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--styles", type=int, default=8)
    p.add_argument("--side", type=int, default=7000)
    p.add_argument("--root", default=str(ROOT), help="the checkout whose server runs (default: this one)")
    args = p.parse_args(argv)
    if args.attack:
        report = attack_styles(args) if args.attack == "styles" else attack_headers(args)
        print(json.dumps(report, indent=2))
        return 0
    report = compare(args) if args.compare else load(args)
    print(json.dumps(report, indent=2))
    return 0 if args.compare or report["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
