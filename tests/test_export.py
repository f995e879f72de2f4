"""TorchScript and ONNX artifacts against the eager extractor: features, gradients, cache, embedding, validation.

A VGG19 cut after relu3_1 keeps each export to a second or two; the graph code is the same for every depth.
Tolerances (float32, CPU): TorchScript runs the same ATen kernels as eager, so its features and gradients
must agree to rounding (rtol 1e-5, atol 1e-6 of values of order 1..1e3); ONNX Runtime has kernels of its
own, so it is held to the validator's bound, 1e-4 of each layer's largest value (measured: about 1e-6).
"""

import hashlib
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import one_error_line, run_together
from PIL import Image

from engine import Config, UserError, stylize
from engine.api import build_extractor
from export import artifact, onnx_export, torchscript
from export.ort import OrtExtractor, choose_providers
from export.validate import TOLERANCE, validate

SMALL = dict(content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1", "relu3_1"), device="cpu")
ORT_TOL = TOLERANCE["cpu"]


@pytest.fixture(scope="module")
def eager():
    return build_extractor(Config(**SMALL))


@pytest.fixture(scope="module")
def traced(eager):
    return torchscript.trace(eager)


@pytest.fixture(scope="module")
def onnx_file(eager, tmp_path_factory):
    return onnx_export.export(eager, tmp_path_factory.mktemp("onnx") / "small.onnx")


def picture(h, w, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def layer_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


# --------------------------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("shape", [(40, 56), (37, 29)], ids=["40x56", "37x29-odd"])
def test_torchscript_features_and_input_gradients_equal_eager(eager, traced, shape):
    x = picture(*shape).requires_grad_(True)
    want = eager(x)
    got = traced(x)
    assert list(got) == list(eager.output_names) == ["relu1_1", "relu2_1", "relu2_2", "relu3_1"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    # A loss that weighs every layer differently, so a gradient routed through the wrong layer shows.
    weights = torch.linspace(1, 2, len(want))
    (g_want,) = torch.autograd.grad(sum(w * v.square().mean() for w, v in zip(weights, want.values())), x)
    (g_got,) = torch.autograd.grad(sum(w * v.square().mean() for w, v in zip(weights, got.values())), x)
    assert g_want.abs().max() > 0
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6 * g_want.abs().max().item())


@pytest.mark.slow
def test_optimisation_on_torchscript_ends_where_eager_does():
    content = picture(48, 40, seed=1)[0]
    style = picture(40, 40, seed=2)[0]
    runs = {}
    for backend in ("eager", "torchscript"):
        config = Config(**SMALL, size=48, min_size=32, steps=6, backend=backend)
        runs[backend] = stylize(content, style, config)
    assert runs["eager"].history[-1]["loss"] < runs["eager"].history[0]["loss"]
    torch.testing.assert_close(runs["torchscript"].image, runs["eager"].image, rtol=0, atol=1e-5)
    loss = [[h["loss"] for h in r.history] for r in runs.values()]
    np.testing.assert_allclose(loss[1], loss[0], rtol=1e-5)


def test_torchscript_calls_do_not_warn(eager, tmp_path):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        module = torchscript.cached(eager, tmp_path)  # trace, freeze, save
        torchscript.cached(eager, tmp_path)  # load
        module(picture(32, 32))
    assert [str(w.message) for w in seen] == []
    # The filter is scoped: torch's own deprecation warning still reaches code outside it.
    with pytest.warns(FutureWarning, match="deprecated"):
        torch.jit.load(str(next(tmp_path.glob("*.pt"))))


# --------------------------------------------------------------------------------------------- cache


def test_cache_reuses_rebuilds_on_new_key_and_on_damage(eager, tmp_path, monkeypatch):
    calls = []
    real_trace = torchscript.trace
    monkeypatch.setattr(torchscript, "trace", lambda ex: calls.append(ex) or real_trace(ex))
    x = picture(32, 40)
    want = eager(x)

    torchscript.cached(eager, tmp_path)
    (entry,) = tmp_path.glob("*.pt")
    assert len(calls) == 1 and (tmp_path / (entry.name + ".sha256")).is_file()
    hit = torchscript.cached(eager, tmp_path)
    assert len(calls) == 1  # loaded, not rebuilt
    torch.testing.assert_close(hit(x)["relu3_1"], want["relu3_1"], rtol=1e-5, atol=1e-6)

    # A changed key (avg pooling) is a new entry; the old one stays for its own key.
    avg = build_extractor(Config(**SMALL, pooling="avg"))
    torchscript.cached(avg, tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.pt"))) == 2

    # Truncated file: detected by its digest, rebuilt, and the rebuilt entry is whole again.
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    rebuilt = torchscript.cached(eager, tmp_path)
    assert len(calls) == 3
    assert (tmp_path / (entry.name + ".sha256")).read_text() == hashlib.sha256(entry.read_bytes()).hexdigest()
    torch.testing.assert_close(rebuilt(x)["relu3_1"], want["relu3_1"], rtol=1e-5, atol=1e-6)

    # Stale description with a matching digest (e.g. written by another torch version): not trusted.
    stale = dict(artifact.describe(eager), torch="0.0.0")
    torchscript.save(real_trace(eager), entry, stale, overwrite=True)
    (tmp_path / (entry.name + ".sha256")).write_text(hashlib.sha256(entry.read_bytes()).hexdigest())
    torchscript.cached(eager, tmp_path)
    assert len(calls) == 4
    assert torchscript.load(entry)[1] == artifact.describe(eager)


def test_cache_that_cannot_be_written_only_warns(eager, tmp_path, monkeypatch):
    from engine.errors import UserError

    def full_disk(path, write, overwrite, what="output"):
        raise UserError(f"could not write {what} {str(path)!r} (No space left on device)")

    monkeypatch.setattr(torchscript, "write_atomically", full_disk)
    with pytest.warns(UserWarning, match="could not store the TorchScript cache"):
        module = torchscript.cached(eager, tmp_path)
    x = picture(32, 40)
    torch.testing.assert_close(module(x)["relu3_1"], eager(x)["relu3_1"], rtol=1e-5, atol=1e-6)


def test_cache_key_covers_weights_layers_and_dtype(eager):
    base = artifact.cache_key(artifact.describe(eager))
    other_layers = build_extractor(Config(**{**SMALL, "style_layers": ("relu1_1", "relu2_1")}))
    assert artifact.cache_key(artifact.describe(other_layers)) != base
    perturbed = build_extractor(Config(**SMALL))
    with torch.no_grad():
        perturbed.body.conv1_1.bias[0] += 1e-3
    assert artifact.cache_key(artifact.describe(perturbed)) != base
    assert artifact.cache_key(artifact.describe(build_extractor(Config(**SMALL)).double())) != base


# --------------------------------------------------------------------------------------------- embedding

EMBED = """
import json, sys, torch
module = torch.jit.load(sys.argv[1])
out = module(torch.load(sys.argv[2]))
print(json.dumps({"names": list(out), "shapes": [list(v.shape) for v in out.values()],
                  "project": sorted(m for m in sys.modules if m.split(".")[0] in ("engine", "export"))}))
torch.save(out, sys.argv[3])
"""


def test_artifact_loads_with_plain_torch_in_another_process(eager, tmp_path):
    path = torchscript.export(eager, tmp_path / "vgg.pt")
    x = picture(45, 61)
    torch.save(x, tmp_path / "x.pt")
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}  # no PYTHONPATH: the project is not importable
    r = subprocess.run(
        [sys.executable, "-c", EMBED, str(path), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["names"] == ["relu1_1", "relu2_1", "relu2_2", "relu3_1"] and info["project"] == []
    assert info["shapes"][-1] == [1, 256, 11, 15]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, want in eager(x).items():
        torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-6)
    meta = torchscript.load(path)[1]
    assert meta["outputs"] == info["names"] and meta["model"] == "vgg19" and meta["dtype"] == "float32"


# --------------------------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("shape", [(64, 64), (45, 67)], ids=["64x64", "45x67-odd"])
def test_onnxruntime_features_equal_eager(eager, onnx_file, shape):
    runner = OrtExtractor(onnx_file, device="cpu")
    assert runner.providers == ["CPUExecutionProvider"]
    x = picture(*shape, seed=3)
    got, want = runner(x), eager(x)
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape
        assert layer_error(got[name], want[name]) < ORT_TOL, name


def test_onnx_file_is_checked_named_and_described(eager, onnx_file):
    import onnx

    onnx.checker.check_model(str(onnx_file), full_check=True)
    model = onnx.load(str(onnx_file))
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == list(eager.output_names)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert onnx_export.read_meta(onnx_file) == artifact.describe(eager)


def test_onnx_external_data_and_batches(eager, tmp_path):
    path = onnx_export.export(eager, tmp_path / "ext.onnx", external_data=True)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["ext.onnx", "ext.onnx.data"]  # no staging folder or .part left behind
    assert (tmp_path / "ext.onnx.data").stat().st_size > path.stat().st_size
    x = torch.cat([picture(33, 48, seed=4), picture(33, 48, seed=5)])
    got, want = OrtExtractor(path, device="cpu")(x), eager(x)
    assert got["relu3_1"].shape[0] == 2
    assert max(layer_error(got[n], want[n]) for n in want) < ORT_TOL


def test_cuda_provider_is_asked_for_only_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(Exception, match="cannot use a CUDA GPU"):
        choose_providers("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_validate_on_cuda(tmp_path):
    report = validate([picture(96, 128)[0]], Config(**{**SMALL, "device": "cuda"}), sizes=["96x128"])
    assert report.passed, report.format()
    assert any("CUDAExecutionProvider" in n for n in report.notes)


# --------------------------------------------------------------------------------------------- validate


def test_validate_passes_and_reports_every_layer(eager, onnx_file):
    images = [picture(50, 70, seed=6)[0], picture(64, 48, seed=7)[0]]
    report = validate(images, Config(**SMALL), sizes=["64", "29x37"], onnx_path=onnx_file, repeats=1)
    assert report.passed, report.format()
    # 2 images x 2 sizes x 2 backends x 4 layers
    assert len(report.checks) == 32
    assert {(c.height, c.width) for c in report.checks} == {(46, 64), (64, 48), (37, 29)}
    assert all(set(t) == {"eager", "torchscript", "onnxruntime"} for t in report.times.values())
    text = report.format()
    assert "PASS: all 32 layer errors within tolerance" in text and "relu3_1" in text


@pytest.fixture(scope="module")
def perturbed_runs(eager, onnx_file, tmp_path_factory):
    """``nst validate`` on good artifacts and on artifacts with one weight nudged by 1 %."""
    import onnx
    from onnx import numpy_helper

    folder = tmp_path_factory.mktemp("perturbed")
    Image.fromarray((np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)).save(folder / "pic.png")
    good_ts = torchscript.export(eager, folder / "good.pt")
    bad = build_extractor(Config(**SMALL))
    with torch.no_grad():
        bad.body.conv2_1.weight.mul_(1.01)
    # Saved with the honest extractor's description: the numbers, not the label, must give it away.
    torchscript.save(torchscript.trace(bad), folder / "bad.pt", artifact.describe(eager))
    model = onnx.load(str(onnx_file))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest: conv3_1's weight
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.01), init.name))
    onnx.save(model, str(folder / "bad.onnx"))
    layers = ["--content-layers", "relu2_2", "--style-layers", "relu1_1,relu2_1,relu3_1", "--device", "cpu"]
    common = ["validate", "pic.png", "--sizes", "40x52", "--repeats", "1", *layers]
    return run_together(
        {
            "good": ([*common, "--torchscript", good_ts, "--onnx", onnx_file], folder),
            "bad torchscript": ([*common, "--torchscript", "bad.pt", "--backends", "torchscript"], folder),
            "bad onnx": ([*common, "--onnx", "bad.onnx", "--backends", "onnxruntime"], folder),
            "missing layer": (
                [
                    *common[:6],
                    "--style-layers",
                    "relu1_1,relu4_1",
                    "--torchscript",
                    "good.pt",
                    "--backends",
                    "torchscript",
                ],
                folder,
            ),
            # No layer flags: the model, pooling and layers come from the artifacts' own descriptions.
            "described": ([*common[:6], "--device", "cpu", "--torchscript", good_ts, "--onnx", onnx_file], folder),
            "size too small": ([*common[:2], "--sizes", "2", *layers, "--onnx", onnx_file], folder),
        },
        env={"NST_CACHE_DIR": str(folder / "cache")},
    )


@pytest.mark.slow
def test_validate_cli_passes_on_good_artifacts(perturbed_runs):
    r = perturbed_runs["good"]
    assert r.returncode == 0, r.stderr
    assert "PASS: all 8 layer errors within tolerance" in r.stdout and r.stderr == ""


@pytest.mark.slow
@pytest.mark.parametrize("case,layer", [("bad torchscript", "relu2_1"), ("bad onnx", "relu3_1")])
def test_validate_cli_fails_on_perturbed_artifact(perturbed_runs, case, layer):
    r = perturbed_runs[case]
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    fail = r.stdout.strip().splitlines()[-1]
    assert fail.startswith("FAIL:") and layer in r.stdout, r.stdout
    # Layers before the nudged weight still agree; the nudged one and those after it do not.
    rows = {line.split()[2]: line for line in r.stdout.splitlines() if line.startswith("pic.png")}
    assert not rows["relu1_1"].rstrip().endswith("!")
    assert rows[layer].rstrip().endswith("!")


@pytest.mark.slow
def test_validate_cli_reads_the_artifacts_description(perturbed_runs):
    r = perturbed_runs["described"]
    assert r.returncode == 0, r.stderr
    assert "PASS: all 8 layer errors within tolerance" in r.stdout and "relu3_1" in r.stdout
    assert " 40x52 " in r.stdout  # --sizes 40x52 is width x height, and the table prints it the same way


@pytest.mark.slow
def test_validate_cli_checks_sizes_before_any_work(perturbed_runs):
    r = perturbed_runs["size too small"]
    assert r.returncode == 2 and r.stdout == ""
    assert (
        "pic.png at size 2 would be 2x2 px, but the chosen layers (down to relu3_1) need at least 4 px on "
        "each side; use larger --sizes or shallower layers"
    ) in one_error_line(r)


def test_validate_api_checks_sizes_in_python_words(onnx_file):
    with pytest.raises(UserError, match=r"image 1 at size 3 would be 3x3 px, .* use larger sizes or shallower layers"):
        validate([picture(30, 30)[0]], Config(**SMALL), sizes=["3"], onnx_path=onnx_file)
    with pytest.raises(UserError, match=r"above the 100 px limit \(max_pixels\)"):
        validate([picture(30, 30)[0]], Config(**SMALL, max_pixels=100), sizes=["30x30"], onnx_path=onnx_file)


@pytest.mark.slow
def test_validate_cli_refuses_artifact_without_a_layer(perturbed_runs):
    r = perturbed_runs["missing layer"]
    assert r.returncode == 2
    assert "has no output 'relu4_1'" in one_error_line(r)


# --------------------------------------------------------------------------------------------- nst export


@pytest.fixture(scope="module")
def export_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export_cli")
    (folder / "taken.pt").write_bytes(b"the user's file")
    tiny = ["--content-layers", "relu1_2", "--style-layers", "relu1_1", "--device", "cpu"]
    results = run_together(
        {
            "onnx": (["export", "out.onnx", *tiny], folder),
            "torchscript": (["export", "out.ts", *tiny], folder),
            "taken": (["export", "taken.pt", *tiny], folder),
            "unknown extension": (["export", "out.txt", *tiny], folder),
            "external data for torchscript": (["export", "other.pt", "--external-data", *tiny], folder),
            "help": (["validate", "--help"], folder),
            "format against extension": (["export", "x.onnx", "--format", "torchscript", *tiny], folder),
        }
    )
    return results, folder


@pytest.mark.slow
def test_export_cli_writes_both_formats(export_runs):
    results, folder = export_runs
    for case, fmt, name in (("onnx", "onnx", "out.onnx"), ("torchscript", "torchscript", "out.ts")):
        r = results[case]
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"wrote {name} ({fmt}, vgg19, outputs relu1_1, relu1_2)"), r.stdout
    x = picture(20, 24)
    want = build_extractor(Config(content_layers=("relu1_2",), style_layers=("relu1_1",), device="cpu"))(x)
    got_ts = torchscript.load(folder / "out.ts")[0](x)
    got_ort = OrtExtractor(folder / "out.onnx", device="cpu")(x)
    for name in want:
        torch.testing.assert_close(got_ts[name], want[name], rtol=1e-5, atol=1e-6)
        assert layer_error(got_ort[name], want[name]) < ORT_TOL


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,message",
    [
        ("taken", "artifact 'taken.pt' already exists; pass --overwrite to replace it"),
        ("unknown extension", "cannot tell the format of 'out.txt' from its extension"),
        ("external data for torchscript", "--external-data applies to ONNX files only"),
        (
            "format against extension",
            "--format torchscript does not match the extension of 'x.onnx' (onnx); name the file x.pt",
        ),
    ],
)
def test_export_cli_errors(export_runs, case, message):
    results, folder = export_runs
    r = results[case]
    assert r.returncode == 2 and message in one_error_line(r)
    assert (folder / "taken.pt").read_bytes() == b"the user's file"
    assert not list(folder.glob(".*"))  # no temporary file or staging folder left behind


def test_validate_help_lists_its_options(export_runs):
    r = export_runs[0]["help"]
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for option in ("--sizes", "--backends", "--torchscript", "--onnx", "--tolerance", "--style-layers", "--weights"):
        assert option in text
    assert "--steps" not in text  # only the settings that define the extractor
