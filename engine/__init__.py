"""nst-engine: optimisation-based neural style transfer (Gatys et al.) on PyTorch.

from engine import Config, stylize
result = stylize("photo.jpg", ["painting.jpg"], Config(size=512))
result.save("out.png")

A service keeps one ``Engine`` and submits ``Job``s to it (see ``engine.service``).
"""

from .api import Result, build_extractor, stylize, stylize_batch
from .config import Config
from .errors import UserError
from .optimize import Callback, StepInfo
from .service import Engine, Job, JobCancelled, JobFailed, JobInterrupted, JobState, Progress, QueueFull

__all__ = [
    "Callback",
    "Config",
    "Engine",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobInterrupted",
    "JobState",
    "Progress",
    "QueueFull",
    "Result",
    "StepInfo",
    "UserError",
    "build_extractor",
    "stylize",
    "stylize_batch",
]
