"""Many jobs on Ray (scale/ray.py): a real local cluster of 2 CPUs (one per module), 2 single-threaded workers.

The reference is a plain folder run (``nst stylize FOLDER ...``, one process, one thread): the Ray run
batches the jobs the same way, so every output must be the same file, byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ENV, ROOT, TIMEOUT, one_error_line, sha
from PIL import Image

ray = pytest.importorskip("ray")

from engine import Config  # noqa: E402
from scale.ray import WORKER_NAME, JobFailed, stylize_on_ray  # noqa: E402

STYLE = ROOT / "examples" / "starry_night.jpg"
# Two sizes (four 64x48, two 48x48) in batches of two: three batches for two workers.
SETTINGS = dict(size=48, min_size=48, steps=3, batch_size=2, style_layers=("relu1_1", "relu2_1"))
FLAGS = ["-s", "48", "--min-size", "48", "-n", "3", "--batch-size", "2", "--style-layers", "relu1_1,relu2_1"]
FLAGS += ["--content-layers", "relu2_1", "--device", "cpu", "-q"]

pytestmark = pytest.mark.slow


def nst(*args, cwd):
    # The worktree's own entry points (nst.runners) are those of the python running the tests. A local Ray
    # cluster takes a token (Ray >= 2.59), which a second driver sends when told to, from ~/.ray/auth_token.
    code = "import sys; from cli.main import main; sys.exit(main())"
    env = {**ENV, "HOME": os.path.expanduser("~"), "RAY_AUTH_MODE": "token"}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    (root / "in").mkdir()
    photo, painting = Image.open(ROOT / "examples" / "tubingen.jpg"), Image.open(STYLE)
    crops = [(photo, (0, 0, 400, 300)), (photo, (100, 50, 500, 350)), (painting, (0, 0, 400, 300))]
    crops += [(painting, (200, 100, 600, 400)), (photo, (0, 0, 300, 300)), (painting, (0, 0, 300, 300))]
    for i, (image, box) in enumerate(crops):
        image.crop(box).resize((64, 48) if i < 4 else (48, 48)).save(root / "in" / f"img{i}.png")
    done = nst("stylize", "in", STYLE, "-o", "plain", *FLAGS, cwd=root)
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def cluster():
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield context.address_info["address"]
    ray.shutdown()


def test_a_folder_on_ray_gives_the_plain_runs_images_and_a_rerun_skips_them(folder, cluster):
    done = nst("stylize", "in", STYLE, "-o", "onray", *FLAGS, "--ray", cluster, cwd=folder)
    assert done.returncode == 0, done.stderr
    assert "wrote 6 images to onray" in done.stdout
    assert {p.name: sha(p) for p in (folder / "onray").iterdir()} == {
        p.name: sha(p) for p in (folder / "plain").iterdir()
    }
    again = nst("stylize", "in", STYLE, "-o", "onray", *FLAGS, "--ray", cluster, cwd=folder)
    assert again.returncode == 0 and "skipping 6 images whose result is already in onray" in again.stderr


def test_a_killed_worker_has_its_jobs_done_by_another(folder, cluster):
    killed = []

    def kill_a_worker(index, outcome):
        if not killed:  # after the first result: one worker busy, the other about to get the next batch
            name = sorted(n for n in ray.util.list_named_actors() if n.startswith(WORKER_NAME))[0]
            ray.kill(ray.get_actor(name))
            killed.append(name)

    contents = sorted((folder / "in").iterdir())
    config = Config(device="cpu", content_layers=("relu2_1",), **SETTINGS)
    outcomes = stylize_on_ray([(c, STYLE) for c in contents], config, on_result=kill_a_worker)
    assert killed
    for content, outcome in zip(contents, outcomes):
        pixels = np.rint(outcome.image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert np.array_equal(pixels, np.asarray(Image.open(folder / "plain" / content.name))), content.name


def test_a_bad_image_fails_alone_with_its_sentence(folder, cluster):
    (folder / "bad").mkdir()
    for p in sorted((folder / "in").iterdir())[:5]:
        (folder / "bad" / p.name).write_bytes(p.read_bytes())
    (folder / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    done = nst("stylize", "bad", STYLE, "-o", "out", *FLAGS, "--ray", cluster, cwd=folder)
    assert done.returncode == 1
    assert "nst: broken.png: content image 'bad/broken.png' could not be read as an image" in done.stderr
    assert "wrote 5 images to out" in done.stdout and "1 image failed" in done.stdout
    assert sorted(p.name for p in (folder / "out").iterdir()) == [f"img{i}.png" for i in range(5)]


def test_the_api_reports_a_bad_job_as_job_failed(cluster, tmp_path):
    missing = tmp_path / "missing.png"
    (outcome,) = stylize_on_ray([(missing, STYLE)], Config(device="cpu", **SETTINGS))
    assert outcome == JobFailed(0, f"content image {str(missing)!r} does not exist")


def test_ray_takes_a_folder_not_one_image(tmp_path):
    done = nst("stylize", ROOT / "examples" / "tubingen.jpg", STYLE, "-o", "one.png", "--ray", cwd=tmp_path)
    assert done.returncode == 2
    assert one_error_line(done) == (
        "nst: error: --ray runs the jobs of a folder of contents; give a folder, or drop --ray for one image"
    )
