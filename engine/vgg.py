"""The truncated VGG feature extractor.

Layers are addressed by their usual names (``conv1_1``, ``relu4_2``,
``pool3``). The layer list of each architecture is in the same order as
torchvision's ``vgg*.features``, so a layer's position is also its index
there; ``weights.py`` relies on that to read torchvision state dicts.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import UserError

# Convolutions per block; channels per block are the same for both models.
BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
CHANNELS = (64, 128, 256, 512, 512)


def channels(layer: str) -> int:
    """Channels of a layer's output: "relu3_1", "conv3_2", "pool3": the fifth character is the block."""
    return CHANNELS[int(layer[4]) - 1]


MODELS = tuple(BLOCKS)
POOLINGS = ("max", "avg")
PADDINGS = ("zeros", "replicate", "reflect")
# The convolutions ``padding`` applies to; every other one pads with zeros. Only the first sees pixels:
# there a zero is the training set's mean colour (see ``Normalize``), a frame of it around the image is an
# edge the first filters answer, and the style loss then paints against it. Deeper convolutions see ReLU
# features, whose zero is "nothing here", the neutral value to pad with.
PADDED_CONVS = ("conv1_1",)


def layer_names(model: str) -> tuple[str, ...]:
    """All layer names of ``model`` in forward order (conv, relu, ..., pool)."""
    names = []
    for b, n_convs in enumerate(BLOCKS[model], start=1):
        for k in range(1, n_convs + 1):
            names += [f"conv{b}_{k}", f"relu{b}_{k}"]
        names.append(f"pool{b}")
    return tuple(names)


def conv_shapes(model: str) -> "OrderedDict[str, tuple[int, int]]":
    """(out_channels, in_channels) of every convolution of ``model``, in order."""
    shapes: OrderedDict[str, tuple[int, int]] = OrderedDict()
    c_in = 3
    for b, n_convs in enumerate(BLOCKS[model], start=1):
        for k in range(1, n_convs + 1):
            shapes[f"conv{b}_{k}"] = (CHANNELS[b - 1], c_in)
            c_in = CHANNELS[b - 1]
    return shapes


def check_layers(model: str, layers: Iterable[str]) -> None:
    known = layer_names(model)
    for name in layers:
        if name not in known:
            raise UserError(
                f"unknown layer {name!r} for {model}; known layers are "
                f"conv/relu{{block}}_{{k}} and pool{{block}}, from {known[0]} to {known[-1]}"
            )


def truncated_names(model: str, layers: Iterable[str]) -> tuple[str, ...]:
    """The layers that must run to produce ``layers``: up to the deepest one."""
    layers = list(layers)
    check_layers(model, layers)
    names = layer_names(model)
    if not layers:
        raise UserError("no feature layers were requested; name at least one content or style layer")
    deepest = max(names.index(name) for name in layers)
    return names[: deepest + 1]


def downsampling(model: str, layers: Iterable[str]) -> int:
    """How many times the truncated network halves the image (pools that run)."""
    return sum(name.startswith("pool") for name in truncated_names(model, layers))


class Normalize(nn.Module):
    """Maps RGB in [0, 1] to what the weights were trained on.

    ``y[c] = x[perm[c]] * scale / std[c] - mean[c] / std[c]``: covers both the
    Caffe convention (BGR, 0..255, mean subtracted) and torchvision's ImageNet
    mean/std. Kept as its own layer (not folded into conv1_1) because the
    padding of conv1_1 is defined in the normalised space (zeros: the mean colour).
    """

    def __init__(self, *, perm: tuple[int, int, int], scale: float, mean, std):
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32)
        self.perm = tuple(perm)
        # A device buffer, not a Python list: indexing with a list copies it from host memory
        # at every call, which a CUDA graph cannot capture.
        self.register_buffer("perm_index", torch.tensor(perm, dtype=torch.long), persistent=False)
        self.register_buffer("mul", (scale / std_t).view(1, 3, 1, 1))
        self.register_buffer("add", (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm != (0, 1, 2):
            x = x.index_select(1, self.perm_index)
        return torch.addcmul(self.add, x, self.mul)


class VGGFeatures(nn.Module):
    """A VGG cut after its deepest requested layer; returns ``{name: features}``.

    Parameters are frozen: the optimisation needs gradients with respect to
    the input image only. ``padding`` is how the convolutions of
    ``PADDED_CONVS`` extend the image past its border (zeros, replicate, reflect).
    """

    def __init__(
        self,
        *,
        model: str,
        convs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        normalize: Normalize,
        layers: Iterable[str],
        pooling: str = "max",
        padding: str = "zeros",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"unknown pooling {pooling!r}; allowed: {', '.join(POOLINGS)}")
        if padding not in PADDINGS:
            raise UserError(f"unknown padding {padding!r}; allowed: {', '.join(PADDINGS)}")
        self.layers = tuple(dict.fromkeys(layers))
        self.model_name = model
        self.pooling = pooling
        self.padding = padding
        self.normalize = normalize
        body = OrderedDict()
        for name in truncated_names(model, self.layers):
            if name.startswith("conv"):
                weight, bias = convs[name]
                mode = padding if name in PADDED_CONVS else "zeros"
                conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1, padding_mode=mode)
                with torch.no_grad():
                    conv.weight.copy_(weight)
                    conv.bias.copy_(bias)
                body[name] = conv
            elif name.startswith("relu"):
                # Not in place: a requested conv output must survive its ReLU.
                body[name] = nn.ReLU(inplace=False)
            elif pooling == "max":
                body[name] = nn.MaxPool2d(2, 2)
            else:
                body[name] = nn.AvgPool2d(2, 2)
        self.body = nn.Sequential(body)
        self.requires_grad_(False)
        self.eval()

    @property
    def output_names(self) -> tuple[str, ...]:
        """The requested layers in the order ``forward`` returns them (forward order)."""
        return tuple(name for name in self.body._modules if name in self.layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.normalize(x)
        out: dict[str, torch.Tensor] = {}
        for name, module in self.body.named_children():
            x = module(x)
            if name in self.layers:
                out[name] = x
        return out


def blocks_of(names: Iterable[str]) -> list[list[str]]:
    """Layer names split into blocks, each ending at a pool (the last one may not)."""
    blocks, current = [], []
    for name in names:
        current.append(name)
        if name.startswith("pool"):
            blocks.append(current)
            current = []
    return blocks + ([current] if current else [])


def recomputed_blocks(model: str, layers: Iterable[str]) -> int:
    """How many leading blocks ``BlockCheckpointed`` recomputes: the fewest whose recomputation sets the peak.

    A block's activations per input pixel (``channels / 4^k`` values per layer after ``k`` pools, a max-pool's
    int64 indices as two) halve from block to block while the work to recompute it stays about the same, so
    the first blocks hold most of the memory and cost a small share of the forward pass (blocks 1-2 of VGG19
    to ``relu5_1``: 70% of the activations, 26% of the multiply-adds). The backward pass recomputes the
    largest checkpointed block, so that block sets the peak; the later blocks' activations, kept whole, add
    nothing to it once they sum to no more than that block's (they are freed before its recomputation).
    """
    layers = list(layers)
    sizes = []
    for block in blocks_of(truncated_names(model, layers)):
        values = 0.0
        for name in block:
            per_pixel = channels(name) / 4 ** downsampling_before(model, name)
            values += per_pixel * (3 if name.startswith("pool") else 1) / (4 if name.startswith("pool") else 1)
        sizes.append(values)
    for count in range(1, len(sizes) + 1):
        if sum(sizes[count:]) <= max(sizes[:count]):
            return count
    return len(sizes)


def downsampling_before(model: str, name: str) -> int:
    """Pools that run before layer ``name`` (a pool's own input is counted at the size before it)."""
    names = layer_names(model)
    return sum(n.startswith("pool") for n in names[: names.index(name)])


class BlockCheckpointed(nn.Module):
    """A ``VGGFeatures`` whose first blocks (pool to pool) run under activation checkpointing.

    The same features and gradients; the backward pass keeps only a
    checkpointed block's input and the outputs the losses read, and
    recomputes one block's activations at a time. Only the first ``blocks``
    blocks are checkpointed (``recomputed_blocks``: those whose activations
    set the peak), so the second forward pass costs about a quarter of a
    forward with the default layers instead of a whole one.
    """

    def __init__(self, extractor: VGGFeatures, blocks: Optional[int] = None):
        super().__init__()
        self.extractor = extractor
        modules = dict(extractor.body.named_children())
        self.blocks = [[(name, modules[name]) for name in block] for block in blocks_of(modules)]
        self.recomputed = recomputed_blocks(extractor.model_name, extractor.layers) if blocks is None else blocks

    def _block(self, x: torch.Tensor, index: int) -> tuple[torch.Tensor, ...]:
        kept = []
        for name, module in self.blocks[index]:
            x = module(x)
            if name in self.extractor.layers:
                kept.append(x)
        return (x, *kept)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.extractor.normalize(x)
        out: dict[str, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            if index < self.recomputed:
                x, *kept = checkpoint(self._block, x, index, use_reentrant=False)
            else:
                x, *kept = self._block(x, index)
            out.update(zip([name for name, _ in block if name in self.extractor.layers], kept))
        return out
