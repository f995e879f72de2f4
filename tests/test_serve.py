"""``nst serve``: a real uvicorn process on a free loopback port, jobs through httpx, restarts by signal.

One module-wide server answers most tests (max one queued job, a 1 MiB upload limit); the token, restart
and kill tests start their own. Everything runs 48 px single-scale jobs on the CPU with one thread, which
is deterministic, so "the same image" is checked as identical 16-bit pixels.
"""

from __future__ import annotations

import contextlib
import io
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace

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
RSS_BOUND_MIB = 1600  # the near-limit-styles attack: 1252 MiB measured (the server starts at ~900)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(
        tmp_path_factory.mktemp("state"),
        "--max-queued",
        "1",
        "--max-upload-mb",
        "1",
        "--memory-budget",
        "4",  # GiB, whatever the machine has: the refusals below do not depend on it
        token=TOKEN,
    )
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
    # Asking again replays the whole stream; with Last-Event-ID, the events after that one.
    assert [e["type"] for e in server.events(job["id"])][-1] == "done"
    with server.client.stream("GET", f"/jobs/{job['id']}/events", headers={"Last-Event-ID": "9"}) as response:
        ids = [int(line[4:]) for line in response.iter_lines() if line.startswith("id: ")]
    assert ids == list(range(10, len(events)))
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
        ({"init": "/etc/passwd"}, None, 422, "init must be one of content, palette, noise, gray over HTTP"),
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
    # A queued job is cancelled at once, and the answer says so (not "queued").
    assert server.client.delete(f"/jobs/{second.json()['id']}").json()["state"] == "cancelled"
    assert server.client.delete(f"/jobs/{first['id']}").status_code == 200
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
        [sys.executable, "-m", "cli", "serve", "--host", "0.0.0.0", "--state-dir", str(tmp_path / "s")],
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
            # The event stream replays the steps before the restart (from the checkpoint), then the rest.
            steps = [e["step"] for e in third.events(job)[:-1]]
            assert steps[0] == 1 and steps[-1] == 100 and steps == sorted(set(steps)), steps
            assert not (state / "jobs" / job / "checkpoint.pt").exists()
    finally:
        assert third.stop(), "".join(third.stderr)


# The service under a hostile user -------------------------------------------------------------------------
# Each test below is one of the defects found by attacking the server as a client (or an operator's
# mistake) would; every answer is checked to be one JSON sentence without a server path.


def sentence(response) -> str:
    """The error of ``response``: JSON ``{"detail": one sentence}`` with no absolute path of the server's."""
    assert response.headers["content-type"] == "application/json", response.text
    detail = response.json()["detail"]
    assert "\n" not in detail and "/tmp" not in detail and "/work" not in detail, detail
    return detail


def test_every_error_is_one_json_sentence(server):
    post = server.client.post
    # A JSON body is told about multipart, not about a missing content image.
    assert "multipart/form-data" in sentence(r := post("/jobs", json={"size": 64})) and r.status_code == 415
    garbage = post("/jobs", content=b"--x\r\nnot a part", headers={"content-type": "multipart/form-data; boundary=x"})
    assert garbage.status_code == 400 and "not valid multipart/form-data" in sentence(garbage)
    tiny = png_bytes(8, 8)
    ten = [("content", ("c.png", tiny, "image/png"))] + [("style", (f"{i}.png", tiny, "image/png")) for i in range(9)]
    many = post("/jobs", data=SMALL, files=ten)
    assert (
        many.status_code == 400 and sentence(many) == "send at most 9 files: one content image and up to 8 style images"
    )
    nine = {**SMALL, "content_sample": "tubingen.jpg", "style_sample": ["starry_night.jpg"] * 9}
    assert "send at most 8 style images, not 9" in sentence(post("/jobs", data=nine))
    assert sentence(server.client.get("/no/such/page")).startswith("there is nothing at '/no/such/page'")
    assert sentence(server.client.put("/jobs/x")).startswith("PUT is not allowed")
    # Malformed HTTP: answered by the protocol layer, in the same format.
    with socket.create_connection(server.address) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400") and b'{"detail": "the request is not valid HTTP/1.1"}' in answer


def _read_all(sock) -> bytes:
    sock.settimeout(30)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "form, words",
    [
        ({"ot_projections": "400000", "style_loss": "ot"}, "ot_projections"),  # the 11.5 GB case, at 48 px
        ({"steps": "10000000"}, "million pixel-steps"),
    ],
    ids=["projections", "steps-x-pixels"],
)
def test_options_that_scale_memory_or_time_are_bounded(server, form, words):
    before = state_files(server)
    data = {**SMALL, "content_sample": "tubingen.jpg", "style_sample": "starry_night.jpg", **form}
    response = server.client.post("/jobs", data=data)
    assert response.status_code == 422, response.text
    detail = sentence(response)
    assert words in detail, detail
    assert state_files(server) == before


def test_options_endpoint_comes_from_config(server):
    from dataclasses import fields

    from serve.uploads import CLIENT_OPTIONS

    served = server.client.get("/options").json()
    by_name = {o["name"]: o for o in served["options"]}
    assert list(by_name) == list(CLIENT_OPTIONS)
    for f in fields(Config):
        if f.name in by_name:
            assert by_name[f.name]["help"] == f.metadata["help"]
            assert by_name[f.name]["default"] == (list(f.default) if isinstance(f.default, tuple) else f.default)
            if "choices" in f.metadata and f.name != "init":
                assert by_name[f.name]["choices"] == list(f.metadata["choices"])
    assert by_name["init"]["choices"] == ["content", "palette", "noise", "gray"]  # no server files over HTTP
    assert by_name["size"]["type"] == "integer" and by_name["style_blend_weights"]["type"] == "numbers"
    assert served["limits"]["max_styles"] == 8


def test_a_result_gone_from_disk_is_410_not_a_reset(server):
    job = server.submit().json()
    assert server.wait(job["id"])["state"] == "done"
    folder = server.state_dir / "jobs" / job["id"]
    for name in ("result.png", "result16.png"):
        (folder / name).unlink()
    for path in (f"/jobs/{job['id']}/result", f"/jobs/{job['id']}/preview"):
        response = server.client.get(path)
        assert response.status_code == 410
        assert sentence(response) == f"job {job['id']} is done but its result is no longer on the server's disk"


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A server with a memory budget of one small job and a half of another (by the engine's model), a 2 s header
    and body timeout and 12 connections at most."""
    from engine.job_memory import job_memory
    from engine.runtime import decide_runtime

    # The server counts with its engine's runtime (bf16 activations, half the bytes, on a CPU with AMX): so must this.
    runtime = decide_runtime(STRICT_CONFIG)
    one = job_memory(STRICT_CONFIG, (36, 48), [(30, 48)], runtime)
    # One job, and half of a second one's images: one runs at a time, so a second held job adds its images.
    budget = (one.total + one.held / 2) / 2**30
    # Eight styles at 4x the output's size are over it alone: refused in one sentence, not queued.
    assert job_memory(replace(STRICT_CONFIG, style_scale=4.0), (36, 48), [(30, 48)] * 8, runtime).total > 2**30 * budget
    s = Server(
        tmp_path_factory.mktemp("strict"),
        "--memory-budget",
        f"{budget:.9f}",
        "--header-timeout",
        "2",
        "--max-connections",
        "12",
        "--body-timeout",
        "2",
    )
    yield s
    assert s.stop(), "".join(s.stderr)


STRICT_CONFIG = Config(
    content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1"), size=48, min_size=48, device="cpu"
)


def test_memory_budget_is_shared_by_held_jobs(strict):
    eight = strict.submit({"style_sample": ["starry_night.jpg"] * 8, "style_scale": "4"})
    assert eight.status_code == 422 and "memory budget; ask for a smaller size, fewer or smaller styles" in sentence(
        eight
    )
    first = strict.submit({"steps": "3000"})
    assert first.status_code == 201, first.text
    second = strict.submit({"steps": "3000"})
    assert second.status_code == 429 and second.headers["retry-after"] == "10"
    assert "memory budget" in sentence(second) and "try again later" in sentence(second)
    strict.client.delete(f"/jobs/{first.json()['id']}")
    assert strict.wait(first.json()["id"])["state"] == "cancelled"
    third = strict.submit({"steps": "3000"})  # the budget is free again
    assert third.status_code == 201, third.text
    strict.client.delete(f"/jobs/{third.json()['id']}")
    assert strict.wait(third.json()["id"])["state"] == "cancelled"


def test_slow_headers_are_closed_and_connections_capped(strict):
    started = time.monotonic()
    with socket.create_connection(strict.address) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: slow")  # and never the end of the headers
        assert _read_all(sock) == b""  # closed by the server, without an answer
    held = time.monotonic() - started
    assert 1.5 < held < 10, held  # --header-timeout 2 (10 s by default)
    # More connections than the cap: the extra ones get a JSON 503 at once; the held ones expire.
    socks = [socket.create_connection(strict.address) for _ in range(16)]
    try:
        time.sleep(0.5)
        answers = []
        for sock in socks:
            sock.setblocking(False)
            try:
                answers.append(sock.recv(65536))
            except BlockingIOError:
                answers.append(None)  # held (until the header timeout)
        refused = [a for a in answers if a]
        assert 4 <= len(refused) <= 5, answers  # 12 open at most, the test's own client among them
        assert all(a.startswith(b"HTTP/1.1 503") and b"too many open connections" in a for a in refused)
    finally:
        for sock in socks:
            sock.close()
    time.sleep(2.5)
    assert strict.client.get("/health").json()["status"] == "ok"


def test_a_stalled_body_is_refused_with_408(strict):
    started = time.monotonic()
    with socket.create_connection(strict.address) as sock:
        sock.sendall(
            b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n"  # and then nothing
        )
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"the request body stalled (no data for 2 s" in answer
    assert time.monotonic() - started < 10


def test_a_locked_job_table_is_503_and_progress_waits_in_memory(server):
    """Another process holds the table's write lock: a POST gets 503 (after sqlite's 5 s busy wait), the
    running job goes on, /health says degraded; released, everything is written."""
    job = server.submit({"steps": "3000"}).json()["id"]
    server.events(job, until=lambda e: e["step"] >= 1)
    with contextlib.closing(sqlite3.connect(server.state_dir / "jobs.sqlite3", isolation_level=None)) as db:
        db.execute("BEGIN EXCLUSIVE")
        locked = server.submit()
        assert locked.status_code == 503 and locked.headers["retry-after"] == "10"
        assert sentence(locked) == "the server's job table is locked by another process; try again later"
        assert server.client.get("/health").json()["status"] == "degraded"
        steps = server.client.get(f"/jobs/{job}").json()["progress"]["step"]
        db.execute("ROLLBACK")
    assert server.events(job, until=lambda e: e["step"] > steps + 1)[-1]["step"] > steps + 1  # it went on
    server.client.delete(f"/jobs/{job}")
    assert server.wait(job)["state"] == "cancelled"
    assert server.client.get("/health").json()["status"] == "ok"
    with contextlib.closing(sqlite3.connect(server.state_dir / "jobs.sqlite3")) as db:
        assert db.execute("SELECT state FROM jobs WHERE id = ?", (job,)).fetchone() == ("cancelled",)


def test_out_of_memory_before_the_first_step_says_so():
    """The sentence of a job that ran out of memory before its first step (it said "scale 1 of 0")."""
    from types import SimpleNamespace

    import torch

    from engine.service import JobProgress, _sentence

    job = SimpleNamespace(progress=JobProgress(total_steps=3))
    sentence = _sentence(torch.OutOfMemoryError("CUDA out of memory"), job)
    assert sentence.startswith("ran out of memory before its first step") and "of 0" not in sentence


def test_the_state_dir_is_the_servers_alone(tmp_path):
    """Refusals to start are one sentence and exit 2, and nothing in the folder is touched."""
    from helpers import tree
    from serving import refused

    # The repro: a folder with other content and no marker (as --state-dir ~ would be).
    foreign = tmp_path / "foreign"
    (foreign / "jobs" / "keep").mkdir(parents=True)
    (foreign / "incoming").mkdir()
    (foreign / "jobs" / "keep" / "a").write_text("mine")
    (foreign / "incoming" / "b").write_text("mine too")
    # A marked state dir whose table was emptied (0 bytes) beside job folders; one whose table is damaged.
    emptied = tmp_path / "emptied"
    (emptied / "jobs" / "Aaaaaaaaaaaaaaaaaaaaaa").mkdir(parents=True)
    (emptied / "jobs" / "Aaaaaaaaaaaaaaaaaaaaaa" / "result.png").write_bytes(b"a result")
    (emptied / ".nst-serve").write_text('{"format": 1}')
    (emptied / "jobs.sqlite3").write_bytes(b"")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / ".nst-serve").write_text('{"format": 1}')
    (damaged / "jobs.sqlite3").write_bytes(b"SQLite format 3\0" + b"\x13" * 4000)
    expected = {
        foreign: "holds other files (incoming, jobs) and no .nst-serve marker",
        emptied: "is empty but",
        damaged: "cannot be read",
    }
    for folder, words in expected.items():
        before = tree(folder)
        result = refused(folder)
        assert result.returncode == 2, result.stderr
        line = one_error_line(result)
        assert words in line and "nothing was deleted" in line or folder is foreign, line
        assert tree(folder) == before


def test_one_jobs_bad_files_fail_that_job_only(tmp_path):
    """Start-up with a queued job whose image is gone, a row whose options are not JSON, and one whose
    checkpoint is a directory: those three fail in one sentence each; the fourth runs; the server starts."""
    state = tmp_path / "state"
    first = Server(state, "--max-queued", "8")
    blocker = first.submit({"steps": "3000"}).json()["id"]
    ids = [first.submit().json()["id"] for _ in range(4)]
    first.client.delete(f"/jobs/{blocker}")
    assert first.stop(), "".join(first.stderr)
    jobs = state / "jobs"
    (jobs / ids[0] / "content.npy").unlink()
    with contextlib.closing(sqlite3.connect(state / "jobs.sqlite3")) as db:
        db.execute("UPDATE jobs SET options = 'not json' WHERE id = ?", (ids[1],))
        db.commit()
    (jobs / ids[2] / "checkpoint.pt").unlink(missing_ok=True)
    (jobs / ids[2] / "checkpoint.pt").mkdir()
    second = Server(state)
    try:
        errors = {i: second.wait(i) for i in ids}
        assert errors[ids[0]]["error"].startswith("its images could not be read back")
        assert errors[ids[1]]["error"] == "its stored options are not what the server wrote"
        assert errors[ids[2]]["error"] == "its checkpoint could not be read; it cannot be resumed"
        assert [errors[i]["state"] for i in ids] == ["failed", "failed", "failed", "done"]
        assert second.client.get("/health").json()["status"] == "ok"
    finally:
        assert second.stop(), "".join(second.stderr)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs of its own (root only: CI runs as root); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({made.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk) -> None:
    """Take every free byte of ``disk`` (a file of ours beside the state dir)."""
    with open(disk / "filler", "ab", buffering=0) as fh:
        for size in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass


def test_a_full_disk_fails_one_job_and_the_server_recovers(small_disk):
    s = Server(small_disk / "state", "--checkpoint-every", "2")
    try:
        fill(small_disk)
        refused_post = s.submit()
        assert (
            refused_post.status_code == 507 and sentence(refused_post) == "the server's disk is full; try again later"
        )
        (small_disk / "filler").unlink()
        job = s.submit({"steps": "400"}).json()["id"]
        s.events(job, until=lambda e: e["step"] >= 1)
        fill(small_disk)  # the next checkpoint (every 2 steps) cannot be written
        events = s.events(job)
        assert events[-1]["type"] == "failed" and events[-1]["error"].endswith("the server's disk is full")
        assert s.client.get(f"/jobs/{job}").json()["state"] == "failed"  # from memory while the table is full
        assert s.client.delete(f"/jobs/{job}").json()["state"] == "failed"
        (small_disk / "filler").unlink()
        assert s.client.get("/health").json()["status"] == "ok"  # the table caught up
        with contextlib.closing(sqlite3.connect(small_disk / "state" / "jobs.sqlite3")) as db:
            assert db.execute("SELECT state FROM jobs WHERE id = ?", (job,)).fetchone() == ("failed",)
        again = s.submit()
        assert again.status_code == 201 and s.wait(again.json()["id"])["state"] == "done"
    finally:
        assert s.stop(), "".join(s.stderr)


@pytest.mark.slow
def test_near_limit_styles_keep_the_server_small(tmp_path):
    """8 requests of 8 style images of 7000 x 7000 px (49 Mpx, under the 50 Mpx limit; ~200 KB each as PNG),
    queued behind a long job: each image is decoded one at a time and shrunk at once to the job's style size.
    Before this, one request of 2 such styles peaked at 5071 MiB (each style kept whole as float32)."""
    from serve.loadtest import near_limit_png, peak_rss_mib

    style = near_limit_png(7000)
    s = Server(tmp_path / "state", "--max-queued", "16")
    try:
        blocker = s.submit({"steps": "100000"}).json()["id"]
        files = [("style", (f"s{k}.png", style, "image/png")) for k in range(8)]
        data = {**SMALL, "content_sample": "tubingen.jpg"}
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: s.client.post("/jobs", data=data, files=files, timeout=600), range(8)))
        assert [a.status_code for a in answers] == [201] * 8, [a.text for a in answers]
        peak = peak_rss_mib(s.proc.pid)
        assert peak < RSS_BOUND_MIB, peak
        s.client.delete(f"/jobs/{blocker}")
    finally:
        assert s.stop(), "".join(s.stderr)
