"""nst-engine: optimisation-based neural style transfer (Gatys et al.) on PyTorch.

from engine import Config, stylize
result = stylize("photo.jpg", ["painting.jpg"], Config(size=512))
result.save("out.png")

A script with many jobs keeps one ``Core`` (synchronous, ``engine.core``); a service keeps one ``Engine``
(a queue and a worker thread over a ``Core``) and submits ``Job``s to it (see ``engine.service``). A
``Control`` stops a run from outside (``engine.control``).
"""

from .api import Result, build_extractor, stylize, stylize_batch
from .config import Config
from .control import Control, Interrupted, Stopped
from .core import Core
from .errors import UserError
from .optimize import Callback, StepInfo
from .service import Engine, Job, JobCancelled, JobFailed, JobInterrupted, JobProgress, JobState, QueueFull

__all__ = [
    "Callback",
    "Config",
    "Control",
    "Core",
    "Engine",
    "Job",
    "JobCancelled",
    "JobFailed",
    "Interrupted",
    "JobInterrupted",
    "JobProgress",
    "JobState",
    "QueueFull",
    "Result",
    "StepInfo",
    "Stopped",
    "UserError",
    "build_extractor",
    "stylize",
    "stylize_batch",
]
