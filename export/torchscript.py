"""The extractor as a frozen TorchScript graph, for the loop and for embedding.

``trace`` records the extractor (preprocessing included) once, with a small
example input, and freezes it: parameters become constants and the graph is
optimised, while autograd with respect to the input stays intact, which the
optimisation loop needs. (``torch.jit.optimize_for_inference`` would drop
that, so it is not used.) The traced graph is shape-generic: convolutions and
pools have no size baked in, so one artifact serves every image size.

Artifacts are saved with their description (``artifact.describe``) as an
extra file ``nst_meta.json``; plain ``torch.jit.load`` reads them without
this project. ``cached`` keeps one per description in the cache directory and
checks a SHA-256 sidecar before trusting a file.

torch 2.14 deprecates torch.jit and warns (FutureWarning) on every call. The
warnings are silenced only around our own calls (``quiet_jit``): they speak
to people writing torch.jit code, not to people running this engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Optional

import torch

from engine.errors import UserError
from engine.files import write_atomically
from engine.sizes import min_side

from .artifact import cache_key, default_cache_dir, describe

META_FILE = "nst_meta.json"


@contextlib.contextmanager
def quiet_jit():
    """Silence torch's deprecation warnings for torch.jit, and nothing else, inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def trace(extractor: torch.nn.Module) -> torch.jit.ScriptModule:
    """Trace and freeze ``extractor`` on its own device and dtype."""
    param = next(extractor.parameters())
    # The smallest input every pool can halve; the graph does not depend on it.
    side = 2 * min_side(extractor.model_name, extractor.layers)
    example = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)).to(param)
    with quiet_jit(), torch.no_grad():
        traced = torch.jit.trace(extractor.eval(), example, strict=False, check_trace=False)
        return torch.jit.freeze(traced)


def _serialize(module: torch.jit.ScriptModule, meta: dict) -> bytes:
    buffer = io.BytesIO()
    with quiet_jit():
        torch.jit.save(module, buffer, _extra_files={META_FILE: json.dumps(meta, sort_keys=True)})
    return buffer.getvalue()


def _deserialize(data: bytes, device: Optional[torch.device], origin) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {META_FILE: ""}
    try:
        with quiet_jit():
            module = torch.jit.load(io.BytesIO(data), map_location=device, _extra_files=extra)
        meta = json.loads(extra[META_FILE] or "{}")
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise UserError(f"TorchScript artifact {str(origin)!r} could not be loaded ({first})") from None
    return module, meta


def save(module: torch.jit.ScriptModule, path: os.PathLike, meta: dict, overwrite: bool = False) -> Path:
    """Write ``module`` with its description, atomically."""
    data = _serialize(module, meta)
    return write_atomically(path, lambda fh: fh.write(data), overwrite, what="artifact")


def load(path: os.PathLike, device: Optional[torch.device] = None) -> tuple[torch.jit.ScriptModule, dict]:
    """Load an artifact and its description; a damaged file raises ``UserError``."""
    if not Path(path).is_file():
        raise UserError(f"TorchScript artifact {str(path)!r} does not exist or is not a file")
    return _deserialize(Path(path).read_bytes(), device, path)


def export(extractor: torch.nn.Module, path: os.PathLike, overwrite: bool = False) -> Path:
    """Trace ``extractor`` and write it to ``path`` (for ``nst export``)."""
    return save(trace(extractor), path, describe(extractor), overwrite=overwrite)


def cached(extractor: torch.nn.Module, cache_dir: Optional[os.PathLike] = None) -> torch.jit.ScriptModule:
    """The frozen graph of ``extractor``, from the cache when a valid entry exists, else built and stored.

    An entry is used only if its SHA-256 sidecar matches the file and its
    stored description matches ``extractor``'s; anything else (a truncated
    or edited file, a missing sidecar, a stale description) is rebuilt.
    """
    meta = describe(extractor)
    key = cache_key(meta)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "torchscript"
    path = folder / f"{meta['model']}-{key[:24]}.pt"
    sidecar = path.with_name(path.name + ".sha256")
    device = next(extractor.parameters()).device
    if path.is_file() and sidecar.is_file():
        try:
            data = path.read_bytes()  # read once: hashed, then loaded from memory
            if sidecar.read_text().strip() == hashlib.sha256(data).hexdigest():
                module, stored = _deserialize(data, device, path)
                if stored == meta:
                    return module
        except (UserError, OSError):
            pass  # unreadable: rebuilt below
    module = trace(extractor)
    data = _serialize(module, meta)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda fh: fh.write(data), overwrite=True, what="cache entry")
        write_atomically(
            sidecar, lambda fh: fh.write(hashlib.sha256(data).hexdigest().encode()), overwrite=True, what="cache entry"
        )
    except (OSError, UserError) as exc:  # write_atomically reports write failures as UserError
        # A read-only or full cache must not stop a run: the graph is in memory already.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        warnings.warn(f"could not store the TorchScript cache in {folder} ({reason})", stacklevel=2)
    return module
