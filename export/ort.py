"""A feature extractor backed by ONNX Runtime: an independent check on the exported graph.

Same call as the torch extractor: an RGB batch in [0, 1] in, ``{layer:
features}`` out, as torch tensors on the input's device. It runs the ONNX
file with an engine that shares no kernels with PyTorch, which is what makes
it a useful second opinion. It has no autograd, so it validates; it does not
drive the optimisation.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from engine.errors import UserError

from .onnx_export import INPUT_NAME, read_meta

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
# ORT's own log levels: 0 verbose ... 3 error, 4 fatal.
_ORT_LOG_ERROR = 3


def choose_providers(device: str = "auto") -> list[str]:
    """CUDA only when torch sees a GPU and this ORT build has the CUDA provider; else the CPU.

    Asking for CUDA on a machine without it makes ORT log errors at every
    session, so it is never asked for speculatively.
    """
    import onnxruntime as ort

    cuda_ok = torch.cuda.is_available() and CUDA_PROVIDER in ort.get_available_providers()
    if device == "cuda" and not cuda_ok:
        raise UserError(
            "device 'cuda' was asked for but ONNX Runtime cannot use a CUDA GPU here; use --device cpu or auto"
        )
    if device in ("auto", "cuda") and cuda_ok:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


class OrtExtractor:
    """``OrtExtractor(path)(image) -> {layer: features}`` via ``onnxruntime.InferenceSession``."""

    def __init__(self, path: os.PathLike, device: str = "auto", threads: Optional[int] = None):
        import onnxruntime as ort

        providers = choose_providers(device)
        if CUDA_PROVIDER in providers and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # use the CUDA/cuDNN libraries that torch's wheels brought
        options = ort.SessionOptions()
        options.log_severity_level = _ORT_LOG_ERROR
        if threads:
            options.intra_op_num_threads = threads
        self.meta = read_meta(path)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise UserError(f"ONNX Runtime could not load {str(path)!r} ({str(exc).splitlines()[0][:160]})") from None
        self.providers = self.session.get_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != [INPUT_NAME]:
            raise UserError(f"ONNX model {str(path)!r} takes inputs {inputs}; expected one named {INPUT_NAME!r}")

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        array = np.ascontiguousarray(image.detach().float().cpu().numpy())
        outputs = self.session.run(self.output_names, {INPUT_NAME: array})
        return {name: torch.from_numpy(out).to(image.device) for name, out in zip(self.output_names, outputs)}
