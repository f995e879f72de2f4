"""The extractor as an ONNX graph, for ONNX Runtime and other consumers.

The graph takes ``image`` (N, 3, H, W), float RGB in [0, 1], with batch,
height and width dynamic, and has one output per requested layer, named
after the layer (``relu1_1``, ...), in forward order. Preprocessing is inside.
The description from ``artifact.describe`` is stored in the model's
``metadata_props`` under ``nst_meta``.

Export goes through torch's dynamo exporter (``torch.onnx.export(...,
dynamo=True)``); weights are kept inside the single ``.onnx`` file unless
``external_data`` is asked for (or the model would pass protobuf's 2 GB
limit), in which case they go to ``NAME.onnx.data`` beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from engine.errors import UserError
from engine.files import check_writable, publish
from engine.sizes import min_side

from .artifact import describe

META_KEY = "nst_meta"
INPUT_NAME = "image"


def export(extractor: torch.nn.Module, path: os.PathLike, overwrite: bool = False, external_data: bool = False) -> Path:
    """Export ``extractor`` to ``path``, check it with ``onnx.checker`` and return the path."""
    path = check_writable(path, overwrite, what="artifact")
    param = next(extractor.parameters())
    side = max(2, min_side(extractor.model_name, extractor.layers))
    example = torch.rand(1, 3, 2 * side, 2 * side, generator=torch.Generator().manual_seed(0)).to(param)
    dims = {
        0: torch.export.Dim("batch", min=1, max=4096),
        # Every pool must have at least one pixel to halve.
        2: torch.export.Dim("height", min=side, max=1 << 16),
        3: torch.export.Dim("width", min=side, max=1 << 16),
    }
    with warnings.catch_warnings():
        # The exporter warns about its own internals (e.g. specialising the batch dimension); not ours to act on.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            extractor.eval(),
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(extractor.output_names),
            dynamic_shapes={"x": dims},
            verbose=False,
        )
    program.model.metadata_props[META_KEY] = json.dumps(describe(extractor), sort_keys=True)
    # Saved whole into a private folder beside the destination, checked, then renamed into place,
    # so neither a half-written model nor a model without its data file is ever under the user's name.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        staged = staging / path.name
        program.save(staged, external_data=external_data or None)
        check(staged)
        # Data files first: the .onnx must never be visible without them.
        for item in sorted(staging.iterdir(), key=lambda p: p == staged):
            target = path.parent / item.name
            if item != staged:
                check_writable(target, overwrite, what="artifact data file")
            publish(str(item), target, overwrite, what="artifact")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def check(path: os.PathLike) -> None:
    """``onnx.checker`` on the file (by path, so external data and >2 GB models work)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise UserError(f"ONNX model {str(path)!r} failed onnx.checker: {str(exc).splitlines()[0][:160]}") from None


def read_meta(path: os.PathLike) -> dict:
    """The description stored in an ONNX file (empty if it has none), without loading the weights."""
    import onnx

    if not Path(path).is_file():
        raise UserError(f"ONNX model {str(path)!r} does not exist or is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UserError(f"ONNX model {str(path)!r} could not be read ({type(exc).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props.get(META_KEY, "{}"))
