"""Checkpoints: the complete state of a run, so that it can stop and go on to the same result.

A checkpoint holds the scale and step reached, the image, the optimiser
state, the moving average, the random generators of the loss, the history so
far, the whole ``Config``, SHA-256 digests of the decoded inputs, and what the
command line needs to finish the job (paths, output options). It contains
only tensors, numbers, strings, lists and dicts, is written atomically, and
is read with ``torch.load(weights_only=True)``: loading one never runs code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import Config
from .errors import UserError
from .files import write_atomically
from .images import digest

# 2: Adam's state and the average carry across scales, and Config has `padding`: a version-1 run would
# not go on as it began.
FORMAT = "nst-checkpoint-2"


@dataclass
class CheckpointPlan:
    """Where and how often a run writes checkpoints, and what the CLI wants kept in them.

    A run writes one every ``every`` steps, and when its ``Control`` is interrupted (``engine.control``).
    """

    path: str
    every: int = 0  # steps; 0: only when interrupted
    extra: dict = field(default_factory=dict)


def discard(*paths: Optional[str]) -> None:
    """Delete the checkpoints of a job that is done (each path once; missing ones and None are skipped)."""
    for path in dict.fromkeys(p for p in paths if p):
        if os.path.isfile(path):
            os.unlink(path)


def config_state(config: Config) -> dict:
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(Config)}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def config_from_state(state: dict) -> Config:
    """The config a checkpoint's saved settings describe (a setting it predates: as its run behaved)."""
    known = {f.name: f for f in dataclasses.fields(Config)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in {**ADDED_SINCE, **state}.items() if k in known}
    return Config(**values)


def save(path: os.PathLike, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    write_atomically(path, lambda fh: fh.write(buffer.getbuffer()), overwrite=True, what="checkpoint")


def load(path: os.PathLike) -> dict:
    """Read a checkpoint; anything that is not a whole, valid one is a ``UserError``."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {os.fspath(path)!r} does not exist or is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle refused by weights_only, not a torch file at all
        raise UserError(
            f"checkpoint {os.fspath(path)!r} is damaged or not a checkpoint ({type(exc).__name__}); "
            "it cannot be resumed"
        ) from None
    required = ("scale", "step", "image", "optimizer", "config", "inputs", "history")
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in required):
        raise UserError(f"checkpoint {os.fspath(path)!r} is not an nst-engine checkpoint of this version")
    state["path"] = os.fspath(path)  # where it came from: a finished job deletes it
    return state


# Settings a run may change when it goes on: where it runs (see ``restore_generators`` for what that changes),
# and how it fits in memory (``tile``, ``memory_budget``: a run stopped for lack of memory can go on in
# smaller tiles).
PORTABLE = ("device", "tile", "memory_budget")
ADDED_SINCE = {"tile_stats": "exact", "schedule": "sqrt2", "plateau": 0.0, "detail": 0.0, "structure_weight": 0.0}


def check_compatible(state: dict, config: Config, inputs: dict, path: os.PathLike) -> None:
    """Refuse a checkpoint made with other settings or other input images."""
    # Settings that came after format 2: a checkpoint without one was written by a run that behaved as this value
    # does (the setting's default when it was added; a default changed since does not apply to it).
    saved = {**ADDED_SINCE, **state["config"]}
    ours = config_state(config)
    differences = [
        f"{k} {saved.get(k)!r} in the checkpoint, {v!r} now"
        for k, v in ours.items()
        if saved.get(k) != v and k not in PORTABLE
    ]
    if differences:
        raise UserError(
            f"checkpoint {os.fspath(path)!r} was made with other settings ({differences[0]}); "
            "resume with the same settings, or start afresh"
        )
    for name, value in inputs.items():
        if state["inputs"].get(name) != value:
            raise UserError(
                f"checkpoint {os.fspath(path)!r} was made from another {name.replace('_', ' ')}; "
                "resume with the same images, or start afresh"
            )


def restore_generators(generators: list[torch.Generator], state: dict) -> None:
    """Put the loss's random generators back where the checkpoint left them.

    A generator's state only fits a generator of the same device type (the CPU's is 5056 bytes, CUDA's
    16), and a stream drawn on one device cannot be continued on the other. A checkpoint resumed on
    another device type therefore reseeds each generator, deterministically, from its own seed and
    the scale and step reached: the same checkpoint resumed twice draws the same directions, but
    not those an uninterrupted run on the first device would have drawn.
    """
    saved = state.get("generators", [])
    for generator, saved_state in zip(generators, saved):
        same = state.get("generator_device", generator.device.type) == generator.device.type
        if same and saved_state.numel() == generator.get_state().numel():
            generator.set_state(saved_state)
        else:
            generator.manual_seed(_reseed(generator.initial_seed(), state["scale"], state["step"]))


def _reseed(seed: int, scale: int, step: int) -> int:
    text = f"nst-reseed:{seed}:{scale}:{step}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1  # below 2**63


def input_digests(content: torch.Tensor, styles: list[torch.Tensor], masks: Optional[torch.Tensor]) -> dict:
    out = {"content image": digest(content)}
    for i, style in enumerate(styles):
        out[f"style image {i + 1}"] = digest(style)
    if masks is not None:
        out["style masks"] = digest(masks)
    return out
