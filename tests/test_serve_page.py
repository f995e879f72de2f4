"""The page of ``nst serve`` in a real browser: headless Debian chromium driven by Playwright.

Playwright's own browser download does not work here; ``.ci/run`` installs Debian's ``chromium``.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import Server

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_page_stylises_the_samples_with_a_live_preview(tmp_path):
    server = Server(tmp_path / "state")
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 700}, accept_downloads=True)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('content-sample').options.length > 1")
            assert page.input_value("#content-sample") == "tubingen.jpg"
            assert page.input_value("#style-sample") == "starry_night.jpg"
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
            browser.close()
        assert not errors, errors
        pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.float32)
        assert pixels.std() > 20  # not a blank page
        preview = np.asarray(result.convert("RGB"), dtype=np.float32)
        assert preview.std() > 10  # a picture, not a flat colour
    finally:
        assert server.stop(), "".join(server.stderr)
