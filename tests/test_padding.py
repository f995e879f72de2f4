"""``padding``: how the first convolution extends the image past its border, eager and exported.

The reference is the plain definition: the normalised image padded by ``F.pad`` in the mode, then an
unpadded convolution; every later convolution zero-padded. float64, so any difference is a bug.
"""

import pytest
import torch
import torch.nn.functional as F

from engine import Config, UserError
from engine.api import build_extractor
from export import artifact, onnx_export, torchscript
from export.ort import OrtExtractor
from export.validate import TOLERANCE, validate

LAYERS = dict(content_layers=("relu1_2",), style_layers=("relu1_1", "relu2_1"), device="cpu")
MODES = ("zeros", "replicate", "reflect")


def picture(h, w, seed=0, dtype=torch.float32):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference(extractor, x, mode):
    """relu1_1, relu1_2 and relu2_1 of ``x`` by hand: ``F.pad`` in ``mode`` before conv1_1, zeros after."""
    body = extractor.body
    pad = "constant" if mode == "zeros" else mode
    y = F.relu(F.conv2d(F.pad(extractor.normalize(x), (1, 1, 1, 1), mode=pad), body.conv1_1.weight, body.conv1_1.bias))
    out = {"relu1_1": y}
    y = F.relu(F.conv2d(y, body.conv1_2.weight, body.conv1_2.bias, padding=1))
    out["relu1_2"] = y
    y = F.max_pool2d(y, 2)
    out["relu2_1"] = F.relu(F.conv2d(y, body.conv2_1.weight, body.conv2_1.bias, padding=1))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_padding_modes_equal_f_pad_then_conv_in_float64(mode):
    extractor = build_extractor(Config(padding=mode, **LAYERS)).double()
    x = picture(21, 34, dtype=torch.float64)
    got, want = extractor(x), reference(extractor, x, mode)
    assert list(got) == ["relu1_1", "relu1_2", "relu2_1"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-9)


def test_padding_changes_the_border_only():
    x = picture(24, 32, seed=1)
    features = {m: build_extractor(Config(padding=m, **LAYERS))(x)["relu1_2"] for m in MODES}
    for mode in ("replicate", "reflect"):
        # Two 3x3 convolutions: the padding reaches 2 px in from the border, and no further.
        torch.testing.assert_close(features[mode][..., 2:-2, 2:-2], features["zeros"][..., 2:-2, 2:-2])
        assert not torch.allclose(features[mode][..., 0, :], features["zeros"][..., 0, :])
    assert not torch.allclose(features["replicate"][..., 0, :], features["reflect"][..., 0, :])


def test_unknown_padding_is_one_sentence():
    with pytest.raises(UserError, match=r"^padding must be one of zeros, replicate, reflect, not 'circular'$"):
        Config(padding="circular")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replicate", "reflect"])
def test_exported_graphs_carry_the_padding(mode, tmp_path):
    """TorchScript and ONNX Runtime give eager's features at the border too, and say which padding they have."""
    eager = build_extractor(Config(padding=mode, **LAYERS))
    meta = artifact.describe(eager)
    assert meta["padding"] == mode
    zeros = artifact.describe(build_extractor(Config(**LAYERS)))
    assert zeros["padding"] == "zeros" and artifact.cache_key(zeros) != artifact.cache_key(meta)
    x = picture(29, 37, seed=2)
    want = eager(x)
    traced = torchscript.trace(eager)
    path = onnx_export.export(eager, tmp_path / "e.onnx")
    assert onnx_export.read_meta(path)["padding"] == mode
    got_ort = OrtExtractor(path, device="cpu")(x)
    for name, value in want.items():
        torch.testing.assert_close(traced(x)[name], value, rtol=1e-5, atol=1e-6)
        assert ((got_ort[name] - value).abs().max() / value.abs().max()).item() < TOLERANCE["cpu"], name
    # validate: the artifact's description gives the padding; an artifact of another padding fails the check.
    report = validate([x[0]], Config(padding=mode, **LAYERS), sizes=["37"], onnx_path=path, repeats=1)
    assert report.passed, report.format()
    described = validate([x[0]], sizes=["37"], onnx_path=path, repeats=1, backends=["onnxruntime"])
    assert described.passed, described.format()  # no config given: the padding is read from the file
    other = validate([x[0]], Config(**LAYERS), sizes=["37"], onnx_path=path, repeats=1, backends=["onnxruntime"])
    assert not other.passed
    assert any(f"padding {mode!r} instead of 'zeros'" in note for note in other.notes)
