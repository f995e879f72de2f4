"""nst-engine: optimisation-based neural style transfer (Gatys et al.) on PyTorch.

from engine import Config, stylize
result = stylize("photo.jpg", ["painting.jpg"], Config(size=512))
result.save("out.png")
"""

from .api import Result, build_extractor, stylize, stylize_batch
from .config import Config
from .errors import UserError
from .optimize import Callback, StepInfo

__all__ = ["Callback", "Config", "Result", "StepInfo", "UserError", "build_extractor", "stylize", "stylize_batch"]
