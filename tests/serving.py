"""Starting and stopping real ``nst serve`` processes for the tests (``python -m serve``, the same code as
``nst serve``), on a free loopback port, and following their jobs through httpx."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from helpers import ENV

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
START_SECONDS = 120  # torch's import and the VGG weights, on a loaded machine
# Small and single-scale (min_size = size), shallow layers: a job of a few seconds on the CPU.
SMALL = {"size": "48", "min_size": "48", "steps": "12"}
# The server's network: shallow layers (set per server, not per job: the Engine is built with them).
LAYERS = ("--content-layers", "relu2_2", "--style-layers", "relu1_1,relu2_1")


def command(state_dir: Path, *args: str, port: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "serve",
        "--port",
        str(port),
        "--state-dir",
        str(state_dir),
        "--device",
        "cpu",
        *LAYERS,
        *args,
    ]


def refused(state_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """Start a server that is expected to refuse to start; its exit, stdout and stderr."""
    return subprocess.run(command(state_dir, *args), env=ENV, capture_output=True, text=True, timeout=START_SECONDS)


class Server:
    def __init__(self, state_dir: Path, *args: str, env: dict | None = None, token: str | None = None, port: int = 0):
        self.state_dir = Path(state_dir)
        if token:
            args = (*args, "--token", token)
        self.proc = subprocess.Popen(
            command(state_dir, *args, port=port),
            env={**ENV, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr.append), daemon=True).start()
        self.url = self._address()
        self.client = httpx.Client(
            base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {token}"} if token else None
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    @staticmethod
    def _read(stream, put) -> None:
        for line in stream:
            put(line)

    def _address(self) -> str:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if not line and self.proc.poll() is not None:
                time.sleep(0.2)  # the rest of stderr
                raise RuntimeError(f"nst serve exited with {self.proc.returncode}: {''.join(self.stderr)}")
            if "listening on " in line:
                return line.split("listening on ", 1)[1].strip()
        self.kill()
        raise RuntimeError(f"nst serve did not start within {START_SECONDS} s: {''.join(self.stderr)}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> bool:
        """Send ``sig`` and wait; whether the server stopped cleanly (it says so, and nothing else went wrong).

        uvicorn re-raises the signal it stopped for, so a clean stop by SIGTERM exits with -SIGTERM."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        time.sleep(0.2)  # the last of stderr
        said = "".join(self.stderr)
        # No traceback, and no line per event stream a client dropped (asyncio's "socket.send() raised").
        return code in (0, -sig) and "stopped; " in said and "Traceback" not in said and "socket.send()" not in said

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    # Jobs --------------------------------------------------------------------------------------------------

    def submit(self, options: dict | None = None, files: list | None = None, samples: bool = True, **kwargs):
        data = {"content_sample": "tubingen.jpg", "style_sample": "starry_night.jpg"} if samples else {}
        data.update(SMALL, **(options or {}))
        return self.client.post("/jobs", data=data, files=files, **kwargs)

    def events(self, job_id: str, until=None):
        """The job's server-sent events, parsed, in order; ``until(event)`` true stops reading early."""
        out = []
        with self.client.stream("GET", f"/jobs/{job_id}/events", timeout=300) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    assert event["type"] == kind
                    out.append(event)
                    if event["type"] != "progress" or (until is not None and until(event)):
                        break
        return out

    def wait(self, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/jobs/{job_id}").json()
            if job["state"] in states:
                return job
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
