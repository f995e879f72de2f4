"""Exact tiling: the whole image's loss and gradient, computed tile by tile.

An untiled step keeps every VGG activation of the whole image alive for the
backward pass (about 2.6 KB per pixel for VGG19 to relu5_1), so memory, not
time, caps the print size. Here the image is cut into tiles, and each tile
runs through the network with a *halo* of context around it, so that every
feature of the tile's own region is exactly the untiled network's:

* the halo is at least the receptive-field radius of the deepest layer used
  (``Geometry.halo``), so the padding at a crop's edge never reaches an
  owned feature (whatever its mode: where a crop's edge is the image's own,
  it is padded as the untiled image is);
* tile edges and crop edges lie on multiples of the network's total stride
  (``Geometry.stride``), so every pooling window is the untiled network's;
* at a layer that has halved the image ``k`` times, a tile owns the features
  ``[y0 / 2^k, y1 / 2^k)`` of its own pixel rows ``[y0, y1)`` (to the end of
  the map for the last tile), so the tiles partition every feature map.

Each step makes two passes over the tiles (``TiledObjective``):

1. without gradients, the whole image's style statistics are summed from the
   tiles (Gram sums; mean and scatter for W2; masked sums for masked Grams);
2. each tile is run again with gradients and backpropagates a *surrogate*:
   for a style layer with statistic ``S`` and loss ``L(S)``, the surrogate is
   ``<dL/dS, S_tile>`` with ``dL/dS`` taken at pass 1's whole-image ``S``;
   its gradient with respect to the tile's own features is the whole-image
   loss gradient. Content and total variation are sums over pixels, so each
   tile's share is its own. The tiles' gradients add up to the untiled one.

Several processes can share one step (``TileShare``, implemented with
torch.distributed in ``scale/tiled.py``; engine/ never imports it): each
runs pass 1 and pass 2 over its own tiles only, the pass-1 sums are added
up across the processes before any loss is evaluated, and so are the image
gradient and the content and TV shares after pass 2. Every process then
holds the whole image's loss and gradient, and steps the same optimiser.

The cost is the extra forward of pass 1 plus the halo: about 1.5x an untiled
step (a backward without weight gradients costs about one forward) times the
crop-to-tile area ratio. Style targets at a large size (a style image scaled
with the output) are summed by the same pass 1, and content targets are put
together from their tiles. Sliced OT sorts all of a layer's projections at
once, so it is refused with tiles: each style loss declares its split form
(``StyleLoss.tiled``, a ``style_losses.TileTerm``) or why it has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Mapping, Optional, Protocol, Sequence

import torch

from .errors import UserError
from .losses import Moments, StyleTransferLoss, at_least_float32
from .vgg import truncated_names

Box = tuple[int, int, int, int]  # y0, y1, x0, x1


@dataclass(frozen=True)
class Geometry:
    """What tiling needs to know of the truncated network."""

    stride: int  # 2 ** pools: tile and crop edges are multiples of it
    halo: int  # input pixels of context around a tile's own region (a multiple of ``stride``)
    factors: Mapping[str, int]  # layer -> how many input pixels one of its features spans (2 ** pools before it)

    @classmethod
    def of(cls, model: str, layers: Sequence[str]) -> "Geometry":
        factor, margin, factors = 1, 0, {}
        for name in truncated_names(model, layers):
            if name.startswith("conv"):
                # A 3x3 convolution zero-padded at a crop's edge spoils one more feature inward.
                margin += factor
            elif name.startswith("pool"):
                # A 2x2 window is spoilt if either input is: the spoilt margin rounds up to whole windows.
                margin = math.ceil(margin / (2 * factor)) * 2 * factor
                factor *= 2
            factors[name] = factor
        halo = math.ceil(margin / factor) * factor
        return cls(factor, halo, factors)


@dataclass(frozen=True)
class Tile:
    own: Box  # the pixels this tile answers for, in image coordinates
    crop: Box  # own plus the halo, clipped to the image
    size: tuple[int, int]  # the whole image's (H, W)

    def crop_of(self, image: torch.Tensor) -> torch.Tensor:
        y0, y1, x0, x1 = self.crop
        return image[..., y0:y1, x0:x1]

    def in_crop(self, features: torch.Tensor, factor: int) -> torch.Tensor:
        """The tile's own features out of the crop's feature map at a layer of ``factor``."""
        rows, cols = self._own_range(factor, origin=True)
        return features[..., rows, cols]

    def in_image(self, factor: int) -> tuple[slice, slice]:
        """Where the tile's own features lie in the whole image's feature map at a layer of ``factor``."""
        return self._own_range(factor, origin=False)

    def own_in_crop(self) -> Box:
        y0, y1, x0, x1 = self.own
        return y0 - self.crop[0], y1 - self.crop[0], x0 - self.crop[2], x1 - self.crop[2]

    def _own_range(self, factor: int, origin: bool) -> tuple[slice, slice]:
        y0, y1, x0, x1 = self.own
        cy, cx = (self.crop[0], self.crop[2]) if origin else (0, 0)
        height, width = self.size
        # The last tile of a row or column owns the map to its end (pools round the image size down).
        rows = slice((y0 - cy) // factor, (y1 - cy) // factor if y1 < height else (height // factor) - cy // factor)
        cols = slice((x0 - cx) // factor, (x1 - cx) // factor if x1 < width else (width // factor) - cx // factor)
        return rows, cols


@dataclass(frozen=True, kw_only=True)
class TileGrid:
    height: int
    width: int
    tile: int  # the own size of a full tile, in pixels
    geometry: Geometry
    tiles: tuple[Tile, ...]

    @classmethod
    def plan(cls, height: int, width: int, tile: int, geometry: Geometry) -> "TileGrid":
        """Tiles of at most about ``tile`` pixels a side (rounded up to the stride), as even as the stride allows."""
        stride, halo = geometry.stride, geometry.halo
        tile = max(stride, math.ceil(tile / stride) * stride)
        tiles = []
        for y0, y1 in _cuts(height, tile, stride):
            for x0, x1 in _cuts(width, tile, stride):
                crop = (max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo))
                tiles.append(Tile((y0, y1, x0, x1), crop, (height, width)))
        return cls(height=height, width=width, tile=tile, geometry=geometry, tiles=tuple(tiles))

    def map_size(self, layer: str) -> tuple[int, int]:
        factor = self.geometry.factors[layer]
        return self.height // factor, self.width // factor


@dataclass(frozen=True)
class Tiling:
    """Tiles of ``tile`` pixels for a network of ``geometry``: any image gets its grid from it."""

    tile: int
    geometry: Geometry

    def grid(self, height: int, width: int) -> TileGrid:
        return TileGrid.plan(height, width, self.tile, self.geometry)


def _cuts(length: int, tile: int, stride: int) -> list[tuple[int, int]]:
    count = math.ceil(length / tile)
    step = math.ceil(math.ceil(length / count) / stride) * stride
    return [(a, min(a + step, length)) for a in range(0, length, step)]


class TileShare(Protocol):
    """This process's part in a tiled step that several processes compute together.

    ``mine(tiles)`` names (by index) the tiles this process computes: across
    the processes every tile exactly once. ``all_reduce(tensors)`` replaces
    each tensor, in place, by its sum over the processes, with the same
    result on every process (so their optimisers stay in step).
    ``any(flag)`` is true on every process when it is on one (a stop asked
    of one process stops them all after the same step). ``leader`` is true
    on the one process that writes files.
    """

    leader: bool

    def mine(self, tiles: Sequence[Tile]) -> Sequence[int]: ...

    def all_reduce(self, tensors: list[torch.Tensor]) -> None: ...

    def any(self, flag: bool) -> bool: ...


# ------------------------------------------------------------------------------------------ targets


@torch.no_grad()
def feature_maps(
    extractor: Callable,
    image: torch.Tensor,
    grid: TileGrid,
    layers: Sequence[str],
    autocast: Callable[[], ContextManager],
) -> dict[str, torch.Tensor]:
    """The whole image's feature maps of ``layers`` (float32), put together from the tiles' own regions."""
    maps: dict[str, torch.Tensor] = {}
    for tile in grid.tiles:
        with autocast():
            features = extractor(tile.crop_of(image))
        for name in layers:
            factor = grid.geometry.factors[name]
            own = at_least_float32(tile.in_crop(features[name], factor))
            if name not in maps:
                maps[name] = own.new_empty((image.shape[0], own.shape[1], *grid.map_size(name)))
            maps[name][(..., *tile.in_image(factor))] = own
    return maps


@torch.no_grad()
def feature_moments(
    extractor: Callable,
    image: torch.Tensor,
    grid: TileGrid,
    layers: Sequence[str],
    autocast: Callable[[], ContextManager],
) -> dict[str, Moments]:
    """The ``Moments`` of the whole image's feature vectors at ``layers``, summed from the tiles."""
    moments: dict[str, Moments] = {}
    for tile in grid.tiles:
        with autocast():
            features = extractor(tile.crop_of(image))
        for name in layers:
            part = Moments.of(tile.in_crop(features[name], grid.geometry.factors[name]))
            moments[name] = moments[name] + part if name in moments else part
    return moments


# ------------------------------------------------------------------------------------------ the objective


class TiledObjective:
    """The same loss and gradient as ``optimize.Objective``, computed over ``grid``'s tiles (two passes).

    With ``share`` this process computes only its own tiles and the sums are
    added up across the processes (see ``TileShare``): ``image.grad`` must
    then hold zeros on entry (``StepFunction.evaluate`` makes it so), as it
    is summed over the processes with the gradient.

    ``stats="lagged"``: one pass per step, no pass 1. Each tile's surrogate
    is taken at the previous call's whole-image sums (the image one Adam step
    ago) in which the tiles already run in this call, the tile itself
    included, have their new sums; so the lag is the part of the image not
    yet visited (none with a single tile). The first call runs exact to seed
    the sums, as does the first after a resume without them
    (``load_state_dict``). Only the gradient lags: the loss returned is the
    image's own, from this call's sums. The object lives for one scale
    (``core.scale_objective``), so the sums never cross a change of size.
    """

    capturable = False  # a Python loop over tiles with statistics in between; see optimize.make_step

    def __init__(
        self,
        extractor: Callable,
        criterion: StyleTransferLoss,
        grid: TileGrid,
        *,
        autocast: Callable[[], ContextManager],
        share: Optional[TileShare] = None,
        stats: str = "exact",
    ):
        modules = list(criterion.style.values())
        if getattr(criterion, "structure", None) is not None:
            modules.append(criterion.structure)
        for module in modules:  # each loss module says whether tiles can split it
            refusal = module.tile_refusal()
            if refusal is not None:
                raise UserError(refusal)
        if stats not in ("exact", "lagged"):
            raise ValueError(f"tile statistics must be exact or lagged, not {stats!r}")
        self.extractor, self.criterion, self.grid, self.autocast = extractor, criterion, grid, autocast
        self.share, self.stats = share, stats
        self.tiles = grid.tiles if share is None else tuple(grid.tiles[i] for i in share.mine(grid.tiles))
        # Lagged mode, from the previous call: the whole image's sums (``TileTerm.to_sums`` form, float64, over
        # every process) and this process's tiles' own, layer by layer; None until seeded.
        self.sums: Optional[dict[str, list[torch.Tensor]]] = None
        self.parts: Optional[list[dict[str, list[torch.Tensor]]]] = None

    def _new_terms(self) -> dict:
        return {name: self._term(name) for name in self.criterion.style}

    def _term(self, name: str):
        return self.criterion.style[name].tiled(self.grid.map_size(name))

    def __call__(self, image: torch.Tensor, scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        criterion, grid, factors = self.criterion, self.grid, self.grid.geometry.factors
        lagged = self.sums is not None
        dtype = at_least_float32(image).dtype
        if lagged:
            probes = self._new_terms()  # each layer's tile_part, and the shapes of a process's empty sums
            running = {name: [s.to(image.device) for s in sums] for name, sums in self.sums.items()}
            parts: list[dict] = []
        else:
            terms, seed = self._pass_one(image)
            style = sum(w * term.finish() for term, w in zip(terms.values(), criterion.style_layer_weights))
        content = tv = image.new_zeros(())
        extra: dict[str, torch.Tensor] = {}
        weights = criterion.weights
        layout = torch.channels_last if _is_channels_last(image) else torch.contiguous_format
        for index, tile in enumerate(self.tiles):  # pass 2: each tile's share of the gradient
            crop = tile.crop_of(image.detach()).clone(memory_format=layout).requires_grad_(True)
            with self.autocast():
                features = self.extractor(crop)
            own = {name: tile.in_crop(features[name], factors[name]) for name in features}
            tile_content = sum(
                (
                    w * loss.partial(own[name], tile.in_image(factors[name]))
                    for (name, loss), w in zip(criterion.content.items(), criterion.content_layer_weights)
                ),
                image.new_zeros(()),
            )
            if not lagged:
                tile_style = sum(
                    w * terms[name].surrogate(own[name], tile, factors[name])
                    for name, w in zip(terms, criterion.style_layer_weights)
                )
            else:  # the previous call's sums, this tile's and the tiles' before it replaced by their new ones
                part, kept, here = {}, {}, {}
                for name, probe in probes.items():
                    part[name], kept[name] = probe.tile_part(own[name], tile, factors[name])
                    old = self.parts[index][name]
                    running[name] = [r - o.to(r.device) + p for r, o, p in zip(running[name], old, part[name])]
                    here[name] = self._term(name).from_other_step(running[name], dtype)
                parts.append(part)
                tile_style = sum(
                    w * here[name].surrogate_from(kept[name], tile, factors[name])
                    for name, w in zip(here, criterion.style_layer_weights)
                )
            tile_tv = criterion.tv.partial(crop, tile.own_in_crop(), (grid.height, grid.width))
            surrogate = weights["content"] * tile_content + weights["style"] * tile_style + weights["tv"] * tile_tv
            # Extra image terms (StyleTransferLoss.extra) are per pixel like TV: each tile's share is its own.
            tile_extra = {
                name: term.partial(crop, tile.own_in_crop(), (grid.height, grid.width), (tile.crop[0], tile.crop[2]))
                for name, term in criterion.extra.items()
            }
            surrogate = surrogate + sum((weights[k] * v for k, v in tile_extra.items()), image.new_zeros(()))
            (surrogate if scale is None else surrogate * scale).backward()  # fp16's loss scale: see LossScale
            y0, y1, x0, x1 = tile.crop
            image.grad[..., y0:y1, x0:x1] += crop.grad
            content, tv = content + tile_content.detach(), tv + tile_tv.detach()
            extra = {k: extra.get(k, 0) + v.detach() for k, v in tile_extra.items()}
        extra = {k: extra.get(k, image.new_zeros(())) for k in criterion.extra}  # zeros for a process without tiles
        sums = {}
        if lagged:  # this call's sums, from the tiles' own (not from ``running``, which would carry rounding on)
            sums = {name: self._total(probe, [p[name] for p in parts], image) for name, probe in probes.items()}
        if self.share is not None:  # one message: the gradient, the shares and (lagged) the new sums
            self.share.all_reduce(
                [image.grad, content, tv, *extra.values(), *(t for layer in sums.values() for t in layer)]
            )
        if lagged:  # the image's own style loss, from the same sums the next call starts from
            self.parts = parts
            self.sums = sums
            terms = {name: self._term(name).from_other_step(sums[name], dtype) for name in sums}
            style = sum(w * term.value for term, w in zip(terms.values(), criterion.style_layer_weights))
        elif self.stats == "lagged":  # the exact first call seeds them with pass 1's
            self.sums = {name: term.to_sums() for name, term in terms.items()}
            self.parts = seed
        parts_out = {"content": content, "style": style, "tv": tv, **extra}
        total = sum(weights[k] * v for k, v in parts_out.items())
        return total, parts_out

    def _total(self, probe, parts: list[list[torch.Tensor]], image: torch.Tensor) -> list[torch.Tensor]:
        """The sum of this process's tiles' sums (zeros, of the right shapes, when it has none)."""
        if not parts:
            return probe.shared(image)
        total = [s.clone() for s in parts[0]]
        for part in parts[1:]:
            total = [t + s for t, s in zip(total, part)]
        return total

    def _pass_one(self, image: torch.Tensor) -> tuple[dict, Optional[list]]:
        """The whole image's style statistics, summed over the tiles without gradients (and the processes);
        in lagged mode also each tile's own sums, which the next call starts from."""
        factors = self.grid.geometry.factors
        terms = self._new_terms()
        seed = [] if self.stats == "lagged" else None
        with torch.no_grad():
            for tile in self.tiles:
                with self.autocast():
                    features = self.extractor(tile.crop_of(image))
                for name, term in terms.items():
                    term.add(tile.in_crop(features[name], factors[name]), tile, factors[name])
                if seed is not None:
                    seed.append(
                        {
                            name: term.tile_part(tile.in_crop(features[name], factors[name]), tile, factors[name])[0]
                            for name, term in terms.items()
                        }
                    )
            if self.share is not None:  # one message for every layer's sums
                sums = {name: term.shared(image) for name, term in terms.items()}
                self.share.all_reduce([t for parts in sums.values() for t in parts])
                for name, term in terms.items():
                    term.from_sums(sums[name])
        return terms, seed

    def state_dict(self) -> dict:
        """What a checkpoint keeps so that a resumed lagged run takes the same steps: the last call's sums
        (float64, on the CPU) and its tiles' own; empty in exact mode, before the first call, and when
        processes share the tiles (only the leader writes, and the others' tiles' sums are theirs: a shared
        run resumes with an exact step)."""
        if self.sums is None or self.share is not None:
            return {}
        cpu = lambda sums: [s.detach().cpu().clone() for s in sums]  # noqa: E731
        return {
            "tiles": [list(tile.own) for tile in self.tiles],
            "sums": {name: cpu(sums) for name, sums in self.sums.items()},
            "parts": [{name: cpu(sums) for name, sums in part.items()} for part in self.parts],
        }

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Go on from a checkpoint's ``state_dict()``. Without it (an exact-mode checkpoint, an older one, one
        with other tiles: ``tile`` may change on resume) the next call runs exact, as a scale's first does."""
        if self.stats != "lagged" or not state or self.share is not None:
            return
        if state.get("tiles") != [list(tile.own) for tile in self.tiles] or set(state["sums"]) != set(
            self.criterion.style
        ):
            return
        # On the CPU until the next call, which moves them to the image's device.
        self.sums = {name: list(sums) for name, sums in state["sums"].items()}
        self.parts = [{name: list(sums) for name, sums in part.items()} for part in state["parts"]]


def _is_channels_last(image: torch.Tensor) -> bool:
    return image.dim() == 4 and image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous()
