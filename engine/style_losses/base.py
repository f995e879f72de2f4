"""What a style loss declares, and the registry that the rest of the engine reads instead of naming losses.

A style loss is one ``StyleLoss`` subclass in one module of this package, registered with ``@register``.
The class answers every question the engine, the command line, the HTTP page, the bench and the memory
model ask of a loss, so none of them names a loss:

* ``name`` and ``help``: the ``--style-loss`` value and its one-line description;
* ``needs``: what its targets are built from, a style image's ``"moments"`` (``losses.Moments``, which
  tiles sum exactly) or its whole ``"maps"``;
* ``build``: the loss module of one layer, from every job's style features and blend weights;
* ``tiled``: its split form for exact tiling (a ``TileTerm``, which also serves lagged tiling, see
  ``TileTerm.lagged_surrogate``); a loss without one may say why in ``untileable``;
* ``uncapturable``: None, or why a CUDA graph cannot record a step of it;
* ``generators``: the random state a checkpoint must keep for a run to resume bit for bit;
* ``state_bytes``: the memory its targets and per-step buffers add to a scale, beyond the network's;
* ``weight``, ``layer_weights`` and ``content_layers``: its own ``--style-weight``, per-layer weights and
  ``--content-layers``, used when the user gives none (each loss measures a different distance, so one number
  cannot suit them all; docs/losses.md).

Only ``name``, ``help``, ``build`` and ``forward`` are required; the defaults describe a loss built from
moments that tiles cannot split, that a CUDA graph can capture and that holds no random state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError, option
from ..losses import FeaturesOrMoments, at_least_float32
from ..vgg import channels as _channels

if TYPE_CHECKING:
    from ..tiling import Tile

# Per job, per style image of the job: its features at one layer (a map or Moments) and its blend weight.
PerJob = Sequence[Sequence[tuple[FeaturesOrMoments, float]]]


class StyleLoss(nn.Module):
    """One style layer's loss: ``loss(features (N, C, H, W)) -> scalar``, summed over the N jobs."""

    name: ClassVar[str]
    help: ClassVar[str]
    needs: ClassVar[str] = "moments"  # or "maps"
    untileable: ClassVar[Optional[str]] = None  # why tiles cannot split it (see ``tile_refusal``)
    uncapturable: ClassVar[Optional[str]] = None
    takes_masks: ClassVar[bool] = False  # whether it takes --style-masks (spatial control)
    # Its defaults for --style-weight and --style-layer-weights (a layer it does not name weighs 1).
    weight: ClassVar[float] = 4.0
    layer_weights: ClassVar[Mapping[str, float]] = {}
    # Its default for --content-layers.
    content_layers: ClassVar[tuple[str, ...]] = ("relu4_2",)

    @classmethod
    def default_layer_weights(cls, layers: Sequence[str]) -> tuple[float, ...]:
        """This loss's own weight for each of ``layers``."""
        return tuple(float(cls.layer_weights.get(name, 1.0)) for name in layers)

    @classmethod
    def build(
        cls, *, config, layer: str, per_job: PerJob, masks: Optional[torch.Tensor] = None
    ) -> "StyleLoss":  # pragma: no cover - every registered loss overrides it
        raise NotImplementedError

    def tiled(self, map_size: tuple[int, int]) -> "TileTerm":
        """This layer's loss split for exact tiling; a loss that cannot be split does not override it."""
        raise UserError(self.tile_refusal())

    @classmethod
    def tile_refusal(cls) -> Optional[str]:
        """None when tiles compute this loss exactly, else the sentence that says why they cannot."""
        if cls.tiled is not StyleLoss.tiled:
            return None
        return cls.untileable or (
            f"the {cls.name} style loss has no tiled form, so it cannot be split into tiles exactly; "
            "use tile off or checkpoint, or another style loss"
        )

    def generators(self) -> list[torch.Generator]:
        return []

    @classmethod
    def state_bytes(cls, config, *, pixels: int, style_pixels: Sequence[int], layer_bytes: dict[str, float]) -> float:
        """Bytes this loss's targets and per-step buffers hold in a scale of ``pixels`` output pixels (the
        batch's, together) whose style images have ``style_pixels`` pixels, beyond the network's activations.
        ``layer_bytes``: float32 bytes per input pixel of each layer's output (``memory.layer_bytes``).

        The default is a loss of moments: a C x C target and a C-vector per style layer (and its gradient).
        """
        return sum((_channels(n) ** 2 + _channels(n)) * 4 * 2 for n in config.style_layers)


class TileTerm:
    """One style layer's loss, split as exact tiling needs it: statistics summed over tiles, then a surrogate.

    ``add`` takes a tile's own features (pass 1); ``finish`` turns the sums into the whole image's
    statistics and returns the loss, keeping its gradient with respect to them; ``surrogate`` takes a
    tile's own features (pass 2, with gradients) and returns a scalar whose gradient is the whole-image
    loss gradient for those features. A subclass supplies the sums: ``accumulate``, ``whole`` (the
    statistics ``loss.loss_from_stats`` takes), ``empty``, and for processes that share a step
    ``shapes``, ``to_sums`` and ``from_sums`` (float64 sums that add up across processes).

    Lagged tiling (``--tile-stats lagged``, one pass per step) finishes terms from sums of other steps: a
    tile's surrogate is taken at the previous step's whole-image sums in which the tiles this step has
    already run (itself included) have their new sums. ``tile_part`` gives a tile's sums in ``to_sums``
    form (they add and subtract over tiles as over processes); ``from_other_step`` finishes a new term from
    such sums, and must reach the same statistics as the term they came from (a checkpoint carries them
    over a resume this way); ``surrogate_from`` is ``surrogate`` given what ``tile_part`` kept of the
    features. A new loss needs nothing beyond the methods above; the Gram overrides ``tile_part`` and
    ``surrogate_from`` to compute its scatter matrix once for both.
    """

    def __init__(self, loss, map_size: tuple[int, int]):
        self.loss, self.map_size, self.pixels = loss, map_size, map_size[0] * map_size[1]
        self.grads: tuple[torch.Tensor, ...] = ()
        self.value: Optional[torch.Tensor] = None  # the loss, once finished by ``from_other_step``
        self.dtype = torch.float32  # float64 when the features are (the tests' references)

    def add(self, features: torch.Tensor, tile: "Tile", factor: int) -> None:
        self.dtype = at_least_float32(features).dtype
        self.accumulate(features, tile, factor)

    def shared(self, like: torch.Tensor) -> list[torch.Tensor]:
        """This process's float64 sums in a form that adds up across processes (zeros if it had no tile)."""
        if self.empty():
            self.dtype = at_least_float32(like).dtype
            return [like.new_zeros(shape, dtype=torch.float64) for shape in self.shapes(like.shape[0])]
        return self.to_sums()

    def finish(self) -> torch.Tensor:
        # The sums are float64; the loss is evaluated in the features' precision, as untiled.
        stats = tuple(s.detach().to(self.dtype).requires_grad_(True) for s in self.whole())
        with torch.enable_grad():
            value = self.loss.loss_from_stats(*stats)
            self.grads = torch.autograd.grad(value, stats)
        return value.detach()

    def from_other_step(self, sums: list[torch.Tensor], dtype: torch.dtype) -> "TileTerm":
        """This (new) term finished from ``to_sums()`` of another step's term (a checkpoint's): returns self."""
        self.dtype = dtype
        self.from_sums([s.to(torch.float64) for s in sums])
        self.value = self.finish()
        return self

    def tile_part(self, features: torch.Tensor, tile: "Tile", factor: int) -> tuple[list[torch.Tensor], object]:
        """A tile's own sums in ``to_sums`` form (float64, detached), and what ``surrogate_from`` needs of the
        features (by default the features themselves)."""
        part = self.loss.tiled(self.map_size)
        part.add(features.detach(), tile, factor)
        return part.to_sums(), features

    def surrogate_from(self, kept, tile: "Tile", factor: int) -> torch.Tensor:
        """``surrogate`` from what ``tile_part`` kept of a tile's features."""
        return self.surrogate(kept, tile, factor)

    def accumulate(self, features: torch.Tensor, tile: "Tile", factor: int) -> None:
        raise NotImplementedError

    def whole(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def empty(self) -> bool:
        raise NotImplementedError

    def shapes(self, batch: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def to_sums(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def from_sums(self, sums: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def surrogate(self, features: torch.Tensor, tile: "Tile", factor: int) -> torch.Tensor:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ the registry

_REGISTRY: dict[str, type[StyleLoss]] = {}


def register(cls: type[StyleLoss]) -> type[StyleLoss]:
    """Class decorator: make ``cls`` a ``--style-loss`` choice under ``cls.name``."""
    for attribute in ("name", "help"):
        if not isinstance(getattr(cls, attribute, None), str):
            raise TypeError(f"style loss {cls.__qualname__} must declare a string {attribute!r}")
    if cls.needs not in ("moments", "maps"):
        raise TypeError(f"style loss {cls.name!r} needs 'moments' or 'maps', not {cls.needs!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"a style loss named {cls.name!r} is registered already ({_REGISTRY[cls.name].__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a registered loss (a test's toy loss, say)."""
    _REGISTRY.pop(name, None)


def style_loss(name: str) -> type[StyleLoss]:
    """The registered class for ``--style-loss name``; a ``UserError`` naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UserError(f"{option('style_loss')} must be one of {', '.join(_REGISTRY)}, not {name!r}") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


class Names:
    """The registered names as a live collection: ``Config``'s choices and argparse's follow later registrations.

    ``extra``: choices that are not losses (``auto``), listed first.
    """

    def __init__(self, extra: Sequence[str] = ()):
        self.extra = tuple(extra)

    def __iter__(self) -> Iterator[str]:
        return iter(self.extra + tuple(_REGISTRY))

    def __contains__(self, name: object) -> bool:
        return name in self.extra or name in _REGISTRY

    def __len__(self) -> int:
        return len(self.extra) + len(_REGISTRY)

    def __repr__(self) -> str:
        return repr(tuple(self))


def check_tileable(name: str) -> None:
    """A ``UserError`` with the loss's own reason when tiles cannot compute it exactly."""
    reason = style_loss(name).tile_refusal()
    if reason is not None:
        raise UserError(reason)
