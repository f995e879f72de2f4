"""The style losses, one module each, and their registry (see ``base``).

``--style-loss NAME`` picks the registered class of that name; importing this package registers the
built-in ones (``gram``, ``ot``, ``w2``). A new loss is one module here (or anywhere: a test or a
plug-in) with one ``StyleLoss`` subclass decorated with ``@register``.

``--style-loss auto`` (the default) is not a loss but a rule: the first of ``AUTO_STYLE_LOSSES`` that can run
the job (``memory.resolve_style_loss``), each at its own weights.
"""

from .base import Names, StyleLoss, TileTerm, check_tileable, names, register, style_loss, unregister
from .gram import GramStyleLoss, MaskedGramStyleLoss
from .ot import SlicedOTStyleLoss, sliced_ot, sorted_values
from .w2 import GaussianW2StyleLoss, default_sqrtm_method, sqrtm_eigh, trace_sqrtm

AUTO = "auto"
# ot first: at its own weights it copies no object of the painting into the photo where gram (equal layers)
# copies moons and smears faces, and it is closer to the photo on every pair measured (docs/losses.md). gram
# where ot cannot run: tiles (ot sorts the whole image), style masks, a captured CUDA graph, or a budget only
# tiles fit.
AUTO_STYLE_LOSSES = ("ot", "gram")

__all__ = [
    "AUTO",
    "AUTO_STYLE_LOSSES",
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
    "sorted_values",
    "sqrtm_eigh",
    "style_loss",
    "trace_sqrtm",
    "unregister",
]
