"""What an exported extractor is, written down: its metadata and its cache key.

Every artifact (TorchScript or ONNX) carries a small JSON description of the
graph it holds. The description names everything that changes the graph, so
its hash is the cache key: a different weight file, layer set, pooling, padding,
dtype, device or torch version gives a different key and a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

# Bumped whenever the way artifacts are built changes, so old cache entries are not reused.
FORMAT_VERSION = 1
INPUT_DOC = "image: float32 (N, 3, H, W), RGB in [0, 1]; preprocessing is inside the graph"


def describe(extractor: torch.nn.Module) -> dict:
    """The metadata of ``extractor`` (a ``engine.vgg.VGGFeatures``)."""
    param = next(extractor.parameters())
    return {
        "format": FORMAT_VERSION,
        "model": extractor.model_name,
        "pooling": extractor.pooling,
        "padding": extractor.padding,
        "outputs": list(extractor.output_names),
        "weights_sha256": weights_digest(extractor),
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": param.device.type,
        "memory_format": "channels_last" if _channels_last(extractor) else "contiguous",
        "torch": torch.__version__,
        "input": INPUT_DOC,
    }


def _channels_last(module: torch.nn.Module) -> bool:
    weight = next(p for p in module.parameters() if p.dim() == 4)
    return not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def cache_key(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes, bytes).

    Hashes the tensors themselves rather than the file they came from, so the
    key is right whatever the source (bundled, hub cache, a user's file).
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _described(meta: dict, key: str):
    # Descriptions written before padding was a setting were all of zero-padded graphs.
    return meta.get(key, "zeros" if key == "padding" and meta else None)


def default_cache_dir() -> Path:
    """``$NST_CACHE_DIR``, else ``$XDG_CACHE_HOME/nst-engine``, else ``~/.cache/nst-engine``."""
    if os.environ.get("NST_CACHE_DIR"):
        return Path(os.environ["NST_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nst-engine"


def mismatches(found: dict, wanted: dict, keys=("model", "pooling", "padding", "weights_sha256", "dtype")) -> list[str]:
    """Human-readable differences between two descriptions, for error messages."""
    out = []
    for key in keys:
        if _described(found, key) != _described(wanted, key):
            out.append(f"{key} {_described(found, key)!r} instead of {_described(wanted, key)!r}")
    missing = [name for name in wanted.get("outputs", []) if name not in found.get("outputs", [])]
    if missing:
        out.append(f"no output {missing[0]!r}")
    return out
