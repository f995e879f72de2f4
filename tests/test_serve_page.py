"""The page of ``nst serve`` in a real browser: headless Debian chromium driven by Playwright.

Playwright's own browser download does not work here; ``.ci/run`` installs Debian's ``chromium``.
"""

from __future__ import annotations

import io
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import Server

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"),
]
READY = "document.getElementById('job-form').dataset.ready === '1'"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("state"), "--checkpoint-every", "2")
    yield s
    assert s.stop(), "".join(s.stderr)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 700}, accept_downloads=True)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    context.close()
    assert not page.errors, page.errors


def test_page_stylises_the_samples_with_a_live_preview(server, page, tmp_path):
    page.goto(server.url + "/")
    page.wait_for_function(READY)
    assert page.input_value("#content-sample") == "tubingen.jpg"
    assert page.input_value("#style-sample") == "starry_night.jpg"
    # No broken-image box before the first preview: the image is hidden until it has one.
    assert not page.is_visible("#preview") and page.is_visible("#no-preview")
    page.fill("#size", "64")
    page.fill("#steps", "40")
    page.click("#start")
    page.wait_for_function("document.getElementById('progress').value === 100", timeout=180_000)
    # The preview changed while the job ran (on progress events), not only at the end.
    assert int(page.get_attribute("#preview", "data-live-updates")) >= 2
    page.wait_for_selector("#download:not(.hidden)")
    assert page.text_content("#progress-text") == "100%"
    assert page.text_content("#status").startswith("done")
    assert page.eval_on_selector("#curve-line", "e => e.getAttribute('points').split(' ').length") >= 2
    with page.expect_download() as download:
        page.click("#download")
    saved = tmp_path / "download.png"
    download.value.save_as(saved)
    result = Image.open(saved)
    assert result.format == "PNG" and max(result.size) == 64
    page.wait_for_function("document.getElementById('preview').naturalWidth === 64")
    shot = page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20  # not a blank page
    assert np.asarray(result.convert("RGB"), dtype=np.float32).std() > 10  # a picture, not a flat colour

    # A later error clears the finished job's status and Download link (they belonged to another job).
    page.fill("#size", "99999")
    page.click("#start")
    page.wait_for_function("document.getElementById('error').textContent.includes('size')")
    assert page.is_hidden("#download") and page.text_content("#status") == "idle"
    assert not page.is_disabled("#start") and page.is_disabled("#cancel")


def test_the_form_is_built_from_the_options_endpoint(server, page):
    html = (Path(__file__).resolve().parents[1] / "serve" / "static" / "index.html").read_text()
    assert "<option" not in html  # no hard-coded choices: they come from GET /options
    served = {o["name"]: o for o in server.client.get("/options").json()["options"]}
    page.goto(server.url + "/")
    page.wait_for_function(READY)
    shown = page.eval_on_selector("#style-loss", "e => [...e.options].map(o => o.value)")
    assert shown == served["style_loss"]["choices"]
    assert page.input_value("#style-loss") == served["style_loss"]["default"]
    for name in served:  # every option has its input, with the field's help as its tooltip
        assert page.get_attribute(f"#{name.replace('_', '-')}", "title") == served[name]["help"]


def test_an_unknown_job_id_leaves_nothing_stuck(server, page):
    page.goto(server.url + "/#NoSuchJobAtAllxxxxxxx")
    page.wait_for_function("document.getElementById('error').textContent.includes('no job with id')")
    assert not page.is_disabled("#start") and page.is_disabled("#cancel")
    assert page.text_content("#status") == "idle" and page.evaluate("location.hash") == ""


def test_a_reload_shows_the_followed_jobs_settings(server, page):
    job = server.submit({"size": "56", "min_size": "56", "steps": "5", "style_weight": "7"}).json()["id"]
    server.wait(job)
    page.goto(server.url + f"/#{job}")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
    assert page.input_value("#size") == "56" and page.input_value("#steps") == "5"
    assert page.input_value("#style-weight") == "7"
    assert not page.is_disabled("#start") and page.is_disabled("#cancel")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_page_survives_a_server_restart(tmp_path, page):
    """The server is killed while the page follows a job: Start is free again and the page says it lost the
    server; when the server is back (same port), the page follows the job again, its curve from step 1."""
    port, state = free_port(), tmp_path / "state"
    first = Server(state, "--checkpoint-every", "2", port=port)
    page.goto(first.url + "/")
    page.wait_for_function(READY)
    page.fill("#size", "48")
    page.click("#more > summary")  # the other options
    page.fill("#min-size", "48")
    page.fill("#steps", "400")
    page.click("#start")
    page.wait_for_function("Number(document.getElementById('curve').dataset.points) >= 6", timeout=120_000)
    first.stop(signal.SIGKILL)
    page.wait_for_function("document.getElementById('status').textContent === 'connection lost; retrying'")
    assert not page.is_disabled("#start")
    second = Server(state, "--checkpoint-every", "2", port=port)
    try:
        page.wait_for_function("document.getElementById('status').textContent.startsWith('scale')", timeout=120_000)
        assert page.get_attribute("#curve", "data-first-step") == "1"  # replayed from the start, not the resume
        assert page.is_disabled("#start") and not page.is_disabled("#cancel")
        page.click("#cancel")
        page.wait_for_function("document.getElementById('status').textContent === 'cancelled'")
    finally:
        assert second.stop(), "".join(second.stderr)
