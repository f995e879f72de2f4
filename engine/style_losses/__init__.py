"""The style losses, one module each, and their registry (see ``base``).

``--style-loss NAME`` picks the registered class of that name; importing this package registers the
built-in ones (``gram``, ``ot``, ``w2``). A new loss is one module here (or anywhere: a test or a
plug-in) with one ``StyleLoss`` subclass decorated with ``@register``.
"""

from .base import Names, StyleLoss, TileTerm, check_tileable, names, register, style_loss, unregister
from .gram import GramStyleLoss, MaskedGramStyleLoss
from .ot import SlicedOTStyleLoss, sliced_ot
from .w2 import GaussianW2StyleLoss, default_sqrtm_method, sqrtm_eigh, trace_sqrtm

__all__ = [
    "GaussianW2StyleLoss",
    "GramStyleLoss",
    "MaskedGramStyleLoss",
    "Names",
    "SlicedOTStyleLoss",
    "StyleLoss",
    "TileTerm",
    "check_tileable",
    "default_sqrtm_method",
    "names",
    "register",
    "sliced_ot",
    "sqrtm_eigh",
    "style_loss",
    "trace_sqrtm",
    "unregister",
]
