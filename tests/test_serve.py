"""``nst serve``: a real uvicorn process on a free loopback port, jobs through httpx, restarts by signal.

One module-wide server answers most tests (max one queued job, a 1 MiB upload limit); the token, restart
and kill tests start their own. Everything runs 48 px single-scale jobs on the CPU with one thread, which
is deterministic, so "the same image" is checked as identical 16-bit pixels.
"""

from __future__ import annotations

import contextlib
import io
import signal
import sqlite3
import struct
import subprocess
import sys
import zlib

import httpx
import numpy as np
import pytest
from helpers import ENV, one_error_line
from PIL import Image
from serving import SMALL, Server

from engine import Config, UserError
from engine import checkpoint as ckpt

pytest.importorskip("fastapi")
TOKEN = "s3cret-token"
LONGER = {"steps": "100"}  # the restart test's job: stopped within its first steps, long before its end


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("state"), "--max-queued", "1", "--max-upload-mb", "1", token=TOKEN)
    yield s
    assert s.stop(), "".join(s.stderr)


@pytest.fixture(scope="module")
def reference(server):
    """A 16-bit result of the restart tests' job, run without interruption."""
    job = server.submit(LONGER).json()
    assert server.wait(job["id"])["state"] == "done"
    return pixels(server.client.get(f"/jobs/{job['id']}/result", params={"bits": "16"}).content)


def pixels(png: bytes) -> np.ndarray:
    import png as pypng  # Pillow reads 16-bit RGB as 8-bit; pypng does not

    width, height, rows, info = pypng.Reader(bytes=png).asDirect()
    assert info["bitdepth"] == 16
    return np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, 3)


def png_bytes(h=40, w=48, seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb() -> bytes:
    """A valid PNG header declaring 40000 x 40000 px, with a few bytes of data: decoding would take 4.8 GB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def state_files(server: Server) -> tuple[set, list]:
    """The files under the state directory (but the database's own) and the rows of the job table."""
    files = {str(p.relative_to(server.state_dir)) for p in server.state_dir.rglob("*") if "sqlite3" not in p.name}
    with contextlib.closing(sqlite3.connect(server.state_dir / "jobs.sqlite3")) as db:
        return files, db.execute("SELECT id, state FROM jobs ORDER BY seq").fetchall()


def test_job_over_http_events_in_order_and_results(server):
    created = server.client.post("/jobs", data=SMALL, files=[("style", ("mine.png", png_bytes(), "image/png"))])
    assert created.status_code == 422 and created.json()["detail"].startswith("send exactly one content image")
    files = [
        ("content", ("photo.png", png_bytes(40, 48, 1), "image/png")),
        ("style", ("art.png", png_bytes(), "image/png")),
    ]
    created = server.submit(files=files, samples=False)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["state"] in ("queued", "running") and job["inputs"] == {"content": "photo.png", "styles": ["art.png"]}
    assert len(job["id"]) == 22  # 128 random bits

    events = server.events(job["id"])
    progress, final = events[:-1], events[-1]
    assert final["type"] == "done" and all(e["type"] == "progress" for e in progress)
    steps = [e["step"] for e in progress]
    assert steps == sorted(set(steps)) and steps[-1] == progress[-1]["total_steps"] == 12
    assert all(e["loss"] > 0 and set(e["parts"]) >= {"content", "style", "tv"} for e in progress)

    status = server.client.get(f"/jobs/{job['id']}").json()
    assert status["state"] == "done" and status["progress"]["step"] == 12 and len(status["curve"]) == len(steps)
    eight = server.client.get(f"/jobs/{job['id']}/result")
    assert eight.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(eight.content)).size == (48, 40)
    sixteen = pixels(server.client.get(f"/jobs/{job['id']}/result", params={"bits": "16"}).content)
    as_eight = np.asarray(Image.open(io.BytesIO(eight.content)).convert("RGB"))
    assert np.abs(np.rint(sixteen / 257.0) - as_eight).max() <= 1
    preview = server.client.get(f"/jobs/{job['id']}/preview")
    assert preview.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(preview.content)).size == (48, 40)
    # Asking again replays the whole stream.
    assert [e["type"] for e in server.events(job["id"])][-1] == "done"
    assert server.client.get(f"/jobs/{job['id']}/result", params={"bits": "7"}).json() == {
        "detail": "bits must be 8 or 16, not '7'"
    }
    assert server.client.get("/jobs/NoSuchJobAtAllxxxxxxx/result").status_code == 404


def truncated_png() -> bytes:
    return png_bytes(64, 64)[:300]


@pytest.mark.parametrize(
    "form, files, status, words",
    [
        ({"style_weight": "-1"}, None, 422, None),  # Config's own sentence, checked below
        ({"style_loss": "cubist"}, None, 422, None),
        ({"size": "big"}, None, 422, "size must be a whole number, not 'big'"),
        ({"init": "/etc/passwd"}, None, 422, "init must be one of content, noise, gray over HTTP"),
        ({"weights": "/etc/passwd"}, None, 422, "weights is chosen by the server"),
        ({"colour": "red"}, None, 422, "unknown option 'colour'"),
        ({"size": "4096"}, None, 422, "size 4096 makes the output 4096x3072 = 12.6 Mpx, above this server's 4.2 Mpx"),
        ({}, [("content", ("t.png", truncated_png(), "image/png"))], 422, "could not be decoded"),
        ({}, [("content", ("notes.png", b"hello, not a picture", "image/png"))], 422, "not an image"),
        ({}, [("content", ("bomb.png", bomb(), "image/png"))], 422, "refusing to decode it"),
        ({}, [("content", ("huge.png", b"\0" * (2 << 20), "image/png"))], 413, "1 MiB upload limit"),
        ({"content_sample": "../../etc/passwd"}, None, 422, "no sample named"),
    ],
    ids=[
        "weight",
        "loss",
        "type",
        "init-path",
        "weights-path",
        "unknown",
        "pixels",
        "truncated",
        "not-image",
        "bomb",
        "huge",
        "sample-path",
    ],
)
def test_bad_requests_get_one_sentence_and_leave_nothing(server, form, files, status, words):
    before = state_files(server)
    data = dict(SMALL, style_sample="starry_night.jpg", **form)
    if not files and "content_sample" not in form:
        data["content_sample"] = "tubingen.jpg"
    response = server.client.post("/jobs", data=data, files=files)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert "\n" not in detail and detail.count(". ") == 0, detail
    if words is None:  # the sentence Config says (in a caller's words, as the CLI prints it)
        name, value = next(iter(form.items()))
        with pytest.raises(UserError) as expected:
            Config(**{name: float(value) if name == "style_weight" else value})
        assert detail == str(expected.value)
    else:
        assert words in detail, detail
    assert state_files(server) == before


def test_queue_limit_answers_429_and_cancel_stops_jobs(server):
    long = {"steps": "3000"}
    first = server.submit(long).json()
    server.wait(first["id"], states=("running",))
    server.events(first["id"], until=lambda event: True)  # its first step is done
    preview = server.client.get(f"/jobs/{first['id']}/preview")  # the image as it is now
    assert preview.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(preview.content)).size == (48, 36)
    second = server.submit(long)
    assert second.status_code == 201
    third = server.submit(long)
    assert third.status_code == 429 and "queue is full" in third.json()["detail"]
    for job in (second.json(), first):
        assert server.client.delete(f"/jobs/{job['id']}").status_code == 200
    assert server.events(first["id"])[-1]["type"] == "cancelled"
    assert server.wait(second.json()["id"])["state"] == "cancelled"
    result = server.client.get(f"/jobs/{first['id']}/result")
    assert result.status_code == 409 and result.json()["detail"].endswith("has no result: it is cancelled")


def test_token_is_required_everywhere_but_health(server):
    bare = httpx.Client(base_url=server.url, timeout=30)
    assert bare.get("/health").json() == {"status": "ok", "token_required": True}
    assert bare.get("/").status_code == 200  # the page itself holds nothing; it asks for the token
    for method, path in [("GET", "/jobs/x"), ("POST", "/jobs"), ("GET", "/samples"), ("GET", "/openapi.json")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = bare.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path)
            assert response.json()["detail"].startswith("this server needs its token")
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert bare.get("/jobs/x", headers=good).status_code == 404
    assert bare.get("/samples", headers=good).json() == {"samples": ["starry_night.jpg", "tubingen.jpg"]}
    paths = bare.get("/openapi.json", headers=good).json()["paths"]  # what FastAPI's page at /docs shows
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/events", "/jobs/{job_id}/result"} <= set(paths)
    assert "multipart/form-data" in paths["/jobs"]["post"]["requestBody"]["content"]
    assert bare.get("/docs", headers=good).status_code == 200


def test_binding_beyond_loopback_needs_a_token(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--host", "0.0.0.0", "--state-dir", str(tmp_path / "s")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "binding to '0.0.0.0' lets other machines in: give a --token" in one_error_line(result)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_restarts_lose_nothing(tmp_path, reference):
    """SIGTERM: the running job checkpoints, the queued one stays queued. Restarted, the server resumes them;
    it is then killed (SIGKILL) mid-job, which loses at most one checkpoint interval. Started a third time,
    it finishes both jobs, each pixel-identical to an uninterrupted run."""
    state, every = tmp_path / "state", 4
    first = Server(state, "--checkpoint-every", str(every))
    running = first.submit(LONGER).json()["id"]
    queued = first.submit(LONGER).json()["id"]
    seen = first.events(running, until=lambda e: e["step"] >= 3)
    assert first.stop(signal.SIGTERM), "".join(first.stderr)
    stopped = ckpt.load(state / "jobs" / running / "checkpoint.pt")
    assert len(stopped["history"]) >= seen[-1]["step"]  # written on stopping, not only every few steps
    assert not (state / "jobs" / queued / "checkpoint.pt").exists()  # never started

    second = Server(state, "--checkpoint-every", str(every))
    assert second.wait(running)["state"] == "done"
    seen = second.events(queued, until=lambda e: e["step"] >= every + 2)
    second.stop(signal.SIGKILL)
    killed = ckpt.load(state / "jobs" / queued / "checkpoint.pt")
    assert len(killed["history"]) >= seen[-1]["step"] - every

    third = Server(state)
    try:
        for job in (running, queued):
            assert third.wait(job)["state"] == "done"
            image = pixels(third.client.get(f"/jobs/{job}/result", params={"bits": "16"}).content)
            assert np.array_equal(image, reference)  # pixel-identical to the uninterrupted run
            assert third.client.get(f"/jobs/{job}").json()["resumed"] == 1
            assert not (state / "jobs" / job / "checkpoint.pt").exists()
    finally:
        assert third.stop(), "".join(third.stderr)
