"""Device, precision, layout and CUDA-graph decisions, made once from the config.

Everything below this boundary reads what it needs off its tensors (device,
dtype, memory format) or off the ``Runtime`` handed to it; nothing else looks
at the config or at the hardware.

Precision modes:

* ``fp32``: float32 everywhere; TF32 is switched *off* for cuDNN and cuBLAS
  (PyTorch enables it for cuDNN by default), so this is the honest baseline.
* ``tf32``: float32 tensors, TF32 tensor-core math in convolutions and matmuls.
* ``bf16`` / ``fp16``: the extractor runs under autocast; the image being
  optimised, the optimiser state, the Gram matrices and every loss stay
  float32 (the losses cast features up before reducing). fp16 also scales
  the loss (``optimize.LossScale``), or its tiny gradients flush to zero.

``auto`` picks ``tf32`` on CUDA; on the CPU, ``bf16`` with Adam where the CPU has AMX matrix units
(``cpu_has_amx``: there the default run in bf16 reached fp32's judged quality 2.6-2.7x sooner at
512-2048 px, docs/speed.md) and ``fp32`` otherwise. The layout is channels-last with Adam (torch's
L-BFGS needs contiguous tensors). On CUDA, bf16/fp16 are opt-in until they have been measured to
track fp32 on a GPU (see README).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import UserError, option
from .style_losses import AUTO, style_loss

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
SWITCHES = ("auto", "on", "off")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class Runtime:
    device: torch.device
    precision: str  # resolved: fp32, tf32, bf16 or fp16
    channels_last: bool
    cuda_graphs: bool

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return _AUTOCAST.get(self.precision)

    def autocast(self):
        """Autocast for the extractor in bf16/fp16 modes; a no-op otherwise.

        ``cache_enabled=False``: the weight-cast cache does not survive CUDA
        graph capture, and the weights are constants, so it saves nothing.
        """
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def layout(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` on this device, in this runtime's memory format (float32)."""
        image = image.to(self.device, torch.float32)
        if self.channels_last and image.dim() == 4:
            return image.contiguous(memory_format=torch.channels_last)
        return image.contiguous()

    def prepare(self, extractor: torch.nn.Module) -> torch.nn.Module:
        extractor = extractor.to(self.device)
        return extractor.to(memory_format=torch.channels_last) if self.channels_last else extractor

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option('device')} 'cuda' was asked for but no CUDA GPU is available; use cpu or auto")
    return torch.device(name)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX matrix tiles (Intel Xeon since Sapphire Rapids), which run bf16 matrix maths
    natively and fast. ``torch.cpu``'s probe is private; a torch without it answers no, and ``auto`` stays fp32."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def cpu_supports(precision: str) -> bool:
    """Whether this CPU has native bf16/fp16 math (else it is emulated, ~150x slower than float32)."""
    check = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}.get(precision)
    if check is None:
        return True
    fn = getattr(torch.ops.mkldnn, check, None)
    return bool(fn and fn())


def resolve_runtime(config, device: Optional[torch.device] = None) -> Runtime:
    """Turn the config's ``auto``s into decisions, check them, and set torch's global math flags.

    The flags (TF32, cuDNN autotuning) belong to the process, not to a run: two runs in one process
    that want different precisions on CUDA would switch them under each other's feet. A ``core.Core``
    (and so an ``Engine``) therefore sets them once, and a second one open on CUDA with another
    precision is refused (see ``Core.open``).
    """
    runtime = decide_runtime(config, device)
    set_flags(runtime)
    return runtime


def set_flags(runtime: Runtime) -> None:
    """Set torch's process-wide math flags for ``runtime`` (CUDA only): the one place they are set."""
    if runtime.device.type == "cuda":
        tf32 = runtime.precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True  # shapes are static within a scale


def decide_runtime(config, device: Optional[torch.device] = None) -> Runtime:
    """The decisions of ``resolve_runtime``, checked, without touching any process-wide flag."""
    device = device or resolve_device(config.device)
    cuda = device.type == "cuda"
    precision = config.precision
    if precision == "auto":
        # bf16 only where it was measured to win (AMX) and with Adam: L-BFGS's line search compares
        # losses at trial points, which bf16 features could make noisy; not measured, so kept out.
        cpu_bf16 = cpu_has_amx() and config.optimizer == "adam" and cpu_supports("bf16")
        precision = "tf32" if cuda else ("bf16" if cpu_bf16 else "fp32")
    if precision == "tf32" and not cuda:
        raise UserError(f"{option('precision')} 'tf32' needs a CUDA GPU; use fp32 on the CPU")
    if precision in _AUTOCAST and not cuda and not cpu_supports(precision):
        raise UserError(
            f"{option('precision')} {precision!r} is emulated on this CPU (about 150 times slower than fp32); "
            "use fp32, "
            "or a CUDA GPU for reduced precision"
        )
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"{option('precision')} 'bf16' is not supported by this GPU; use fp16 or tf32")
    # Channels-last on the CPU too: oneDNN's convolutions measured 0.99x-1.16x (median 1.09x) against NCHW
    # in `nst bench` here; on CUDA it is what tensor-core convolutions want.
    # torch's L-BFGS flattens the image with .view(-1), which a channels-last tensor does not allow.
    if config.memory_format == "channels_last" and config.optimizer != "adam":
        raise UserError(
            f"{option('memory_format')} 'channels_last' works with the adam optimizer only, not {config.optimizer!r}"
        )
    channels_last = config.memory_format == "channels_last" or (
        config.memory_format == "auto" and config.optimizer == "adam"
    )
    graphs = config.cuda_graphs
    if graphs == "on" and not cuda:
        raise UserError(f"{option('cuda_graphs')} 'on' needs a CUDA GPU; use auto or off")
    if graphs == "on" and config.optimizer != "adam":
        raise UserError(f"{option('cuda_graphs')} 'on' works with the adam optimizer only, not {config.optimizer!r}")
    # A loss that cannot be recorded (OT draws fresh random directions every step, which a replay would
    # freeze) says so in its class: named with graphs on, it is refused; otherwise its steps run uncaptured
    # (optimize.Objective.capturable), and --style-loss auto with graphs on picks one that can be captured.
    if graphs == "on" and config.style_loss != AUTO:
        uncapturable = style_loss(config.style_loss).uncapturable
        if uncapturable:
            raise UserError(
                f"{option('cuda_graphs')} 'on' cannot capture the {config.style_loss} style loss ({uncapturable})"
            )
    use_graphs = graphs == "on" or (graphs == "auto" and cuda and config.optimizer == "adam")
    return Runtime(device=device, precision=precision, channels_last=channels_last, cuda_graphs=use_graphs)
