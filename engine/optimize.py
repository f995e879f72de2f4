"""One scale of the optimisation: the image is the parameter.

``StepFunction`` is the unit of work every path shares: one call evaluates the
``Objective`` (the loss and its gradient with respect to the pixels) and moves
the pixels once. Faster or larger paths swap what runs around it, never the
maths: ``GraphedStep`` captures a ``StepFunction`` call as a CUDA graph and
replays it; compiled extractors (TorchScript) are just another ``extractor``;
``tiling.TiledObjective`` computes the same loss and gradient tile by tile.

``optimize_scale(ScaleProblem)`` runs one scale: the problem holds the start
image, the objective, the optimiser settings, how steps are reported
(``Reporting``) and checkpointed (``Checkpointing``), and, for a long-lived
``Engine``, the ``StepPool`` of captured graphs a later job of the same shape
replays.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F

from .control import Interrupted
from .errors import UserError, option

if TYPE_CHECKING:
    from .runtime import Runtime

LBFGS_HISTORY = 50  # memory: 2 * history * image numel floats (about 0.1 GB at 1024 px)
LBFGS_MAX_EVALS = 20  # function evaluations one L-BFGS step may spend in its line search
GRAPH_WARMUP = 3  # eager steps before capture: cuDNN autotuning and lazy workspaces happen here
# Without a per-step callback, losses stay on the device and are read this often: each read is
# a host-device sync that would otherwise stall the queue of kernels every step.
SYNC_EVERY = 16


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite: the run stops rather than write garbage."""


@dataclass(kw_only=True)
class StepInfo:
    """What a per-step callback receives.

    ``image`` is the current result (the moving average when ``ema_decay`` is on, else the live image
    being optimised): read it, don't write to it. It is built when first read, and only while the
    callback runs; it is None for a step reported after later steps had already run (see ``Callback``).
    """

    scale: int
    scales: int
    height: int
    width: int
    step: int
    steps: int
    total_step: int
    total_steps: int
    loss: float
    parts: dict[str, float]
    source: Optional[Callable[[], Optional[torch.Tensor]]] = field(default=None, repr=False)
    jobs: tuple[int, ...] = (0,)  # which of the run's jobs this (batched) step serves

    @property
    def image(self) -> Optional[torch.Tensor]:
        return None if self.source is None else self.source()


@dataclass(frozen=True)
class Callback:
    """A per-step callback that need not run live, so that the run does not wait for the device every step.

    ``fn(StepInfo)`` is still called once for every step, in order, but the losses are read from the
    device only once ``every`` steps are waiting or ``seconds`` have passed since the last read (so
    slow steps, a CPU's, are still reported one by one, and fast ones, a GPU's, in groups), and at
    each scale's end. ``info.image`` is there for the last step of each group and for every step
    ``image_due(total_step)`` names (a snapshot): the run reads the losses at those steps too. A
    plain function given as a callback is called live: after every step, each with its image.
    """

    fn: Callable[[StepInfo], None]
    _: KW_ONLY
    every: int = SYNC_EVERY
    seconds: float = 0.1
    image_due: Callable[[int], bool] = lambda total_step: False

    def __call__(self, info: StepInfo) -> None:
        self.fn(info)


class LossScale:
    """Dynamic loss scaling for fp16, kept entirely on the device so that a CUDA graph captures it.

    The losses are relative (divided by the target's norm and by H*W), so their gradients with
    respect to the VGG features are tiny (per-layer medians 4e-9 to 1e-7 at 192x256, smaller at
    larger sizes): at or below float16's smallest subnormal (6e-8), most flush to zero on the way
    back through the autocast region and the image stops following the style. The loss is
    multiplied by ``scale`` before the backward pass; the image's gradient (float32) is divided by
    it again and checked for infinities in one kernel. A step whose gradient overflowed is skipped
    by fused Adam (``found_inf``, which also leaves its step count alone) and the scale is halved;
    after ``GROWTH_INTERVAL`` clean steps it doubles. After a scale's first step (see ``settled``)
    no value is read on the host.
    """

    # The features' gradients (median ~5e-9, largest ~3e-5 at 192x256, both shrinking with the pixel count)
    # times this sit in float16's normal range, with room to spare below its largest value.
    INITIAL = 2.0**24
    GROWTH_INTERVAL = 100
    MAX_BACKOFFS = 40  # an overflowed evaluation is redone at most this often (down to 2^-16 of INITIAL)

    def __init__(self, device: torch.device):
        self.scale = torch.full((), self.INITIAL, device=device)
        self.found_inf = torch.zeros((), device=device)
        self._growth = torch.zeros((), dtype=torch.int32, device=device)
        # Until one step has run without overflow, an overflow is redone at once rather than skipped (a
        # host read, on the first step only: before any CUDA graph capture), so a scale set too high for
        # this image's gradients does not cost the run its first steps.
        self.settled = False

    def unscale(self, grad: torch.Tensor) -> None:
        """Divide a gradient computed through the scaled loss by the scale, and set ``found_inf`` if it overflowed."""
        self.found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_([grad], self.found_inf, self.scale.reciprocal())

    def update(self) -> None:
        torch._amp_update_scale_(self.scale, self._growth, self.found_inf, 2.0, 0.5, self.GROWTH_INTERVAL)

    def state_dict(self) -> dict:
        return {"scale": self.scale.detach().cpu().clone(), "growth": self._growth.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(state["scale"])
        self._growth.copy_(state["growth"])


class Objective:
    """The loss of one scale as a function of the image: ``objective(image) -> (total, parts)``.

    It leaves the gradient with respect to ``image`` in ``image.grad`` (added
    to what is there). ``autocast`` wraps the extractor only: the image and
    the losses stay float32. With ``scale`` (fp16's loss scale, a device
    scalar) the gradient left is that of ``scale * total``; the losses
    returned are never scaled.
    """

    def __init__(
        self, extractor: Callable, criterion: Callable, autocast: Callable[[], ContextManager] = contextlib.nullcontext
    ):
        self.extractor, self.criterion, self.autocast = extractor, criterion, autocast

    @property
    def capturable(self) -> bool:
        """One forward and backward of fixed shapes, which a CUDA graph can record, unless one of the
        criterion's style losses declares it cannot (``StyleLoss.uncapturable``: ot's fresh directions)."""
        modules = self.criterion.modules() if isinstance(self.criterion, torch.nn.Module) else ()
        return not any(getattr(module, "uncapturable", None) for module in modules)

    def __call__(self, image: torch.Tensor, scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        with self.autocast():
            features = self.extractor(image)
        total, parts = self.criterion(features, image)
        (total if scale is None else total * scale).backward()
        return total.detach(), {k: v.detach() for k, v in parts.items()}


class StepFunction:
    """Callable that performs one optimisation step and returns ``(total, parts)``.

    Adam: one evaluation of the objective, one update, then the pixels are
    clamped to [0, 1]. L-BFGS: one iteration with a strong-Wolfe line search;
    the image is left unclamped during the scale (clamping would break the
    curvature pairs) and clamped when the scale ends. The optimiser state
    stays float32 whatever the objective computes in. ``loss_scale`` (fp16):
    see ``LossScale``.
    """

    def __init__(
        self,
        image: torch.Tensor,
        objective: Callable,
        *,
        optimizer: str,
        lr: float,
        capturable: bool = False,
        loss_scale: Optional[LossScale] = None,
    ):
        self.image = image
        self.objective = objective
        self.kind = optimizer
        self.loss_scale = loss_scale
        if optimizer == "adam":
            # capturable keeps Adam's step count on the device, which CUDA graph replay needs.
            # Fused: one kernel for the whole update on CUDA, and the only Adam that honours found_inf.
            fused = image.is_cuda or loss_scale is not None or None
            self.optimizer = torch.optim.Adam([image], lr=lr, capturable=capturable, fused=fused)
            if loss_scale is not None:
                self.optimizer.found_inf = loss_scale.found_inf  # read by every fused step; updated in place
        else:
            self.optimizer = torch.optim.LBFGS(
                [image],
                lr=1.0,
                max_iter=1,
                max_eval=LBFGS_MAX_EVALS,
                history_size=LBFGS_HISTORY,
                line_search_fn="strong_wolfe",
            )
        self._memo: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]] = None

    def evaluate(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss at the current image, with its gradient left in ``image.grad``."""
        self.optimizer.zero_grad(set_to_none=False)
        if self.image.grad is None:  # the objective adds to it
            self.image.grad = torch.zeros_like(self.image)
        if self.loss_scale is None:
            return self.objective(self.image)
        total, parts = self.objective(self.image, self.loss_scale.scale)
        self.loss_scale.unscale(self.image.grad)
        return total, parts

    def __call__(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.kind == "adam":
            total, parts = self.evaluate()
            if self.loss_scale is not None and not self.loss_scale.settled:
                total, parts = self._redo_overflow(total, parts)
            self.optimizer.step()
            if self.loss_scale is not None:
                self.loss_scale.update()
            with torch.no_grad():
                self.image.clamp_(0, 1)
            return total, parts
        result = {}

        def closure():
            result["value"] = self._lbfgs_evaluate()
            return result["value"][0]

        self.optimizer.step(closure)
        return result["value"]

    def _lbfgs_evaluate(self):
        # torch's L-BFGS re-evaluates the point its line search just accepted at
        # the start of the next step() call; remembering the last point, its
        # loss and gradient saves that forward/backward pass (about 1/3 of the work).
        memo = self._memo
        if memo is not None and torch.equal(memo[0], self.image):
            self.image.grad = memo[1].clone()
            return memo[2], memo[3]
        total, parts = self.evaluate()
        if self.loss_scale is not None:
            # L-BFGS reads values on the host all the time: every overflow is redone, never skipped.
            total, parts = self._redo_overflow(total, parts)
            self.loss_scale.update()
        self._memo = (self.image.detach().clone(), self.image.grad.detach().clone(), total, parts)
        return total, parts

    def _redo_overflow(self, total, parts):
        """Evaluate again at half the scale while the gradient overflows; reads the flag on the host."""
        scale = self.loss_scale
        for _ in range(scale.MAX_BACKOFFS):
            if not scale.found_inf.item() or not torch.isfinite(total).item():  # a non-finite loss: the guard's
                break
            scale.update()  # halves it
            total, parts = self.evaluate()
        scale.settled = True
        return total, parts

    def finish(self) -> torch.Tensor:
        with torch.no_grad():
            self.image.clamp_(0, 1)
        self._memo = None
        return self.image.detach()


class GraphedStep:
    """A ``StepFunction`` (Adam) replayed as a CUDA graph.

    The first ``GRAPH_WARMUP`` calls run the step eagerly on a side stream
    (they are real steps, as the capture API requires warm-up there). The
    next call captures one whole step (forward, losses, backward, Adam
    update, clamp) and replays it, and every later call only replays: one
    launch per step instead of hundreds. The returned loss tensors are the
    graph's static outputs, overwritten by the next replay; callers copy them.
    Shapes are fixed, so a new scale needs a new ``GraphedStep``.
    """

    def __init__(self, step: StepFunction):
        if step.kind != "adam":
            raise ValueError("CUDA graphs capture Adam steps only")
        self.step = step
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.outputs = None
        self.stream = torch.cuda.Stream(step.image.device)

    def __call__(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.calls += 1
        if self.calls <= GRAPH_WARMUP:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self.step()
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.step()  # recorded, not run: the replay below runs it
        self.graph.replay()
        return self.outputs

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step.optimizer

    @property
    def loss_scale(self) -> Optional[LossScale]:
        return self.step.loss_scale

    def finish(self) -> torch.Tensor:
        # Dropping the graph and its static outputs frees the graph's private memory pool.
        self.graph = self.outputs = None
        return self.step.finish()


def make_step(image: torch.Tensor, objective: Callable, optimizer: str, lr: float, runtime) -> Callable:
    """The step for this scale: a ``StepFunction``, wrapped in a ``GraphedStep`` when the runtime says so.

    Tiled objectives are not captured: at the sizes that need tiles each kernel runs long enough that
    launch overhead, what graphs remove, no longer matters.
    """
    graphs = runtime is not None and runtime.cuda_graphs and optimizer == "adam" and objective.capturable
    scale = LossScale(image.device) if runtime is not None and runtime.precision == "fp16" else None
    step = StepFunction(image, objective, optimizer=optimizer, lr=lr, capturable=graphs, loss_scale=scale)
    return GraphedStep(step) if graphs else step


@dataclass
class Carry:
    """What one scale hands on to the next: Adam's state and the moving average, at the size it ended at.

    ``optimizer`` is Adam's ``state_dict`` (None with L-BFGS, which starts each scale with a fresh history:
    its curvature pairs are differences of images and gradients of the old scale's objective; resampled,
    they are not secant pairs of the new one, and nothing keeps ``s.y`` positive, which its update needs).
    ``average`` is the moving average before bias correction and ``average_steps`` the steps it has summed.
    """

    optimizer: Optional[dict] = None
    average: Optional[torch.Tensor] = None
    average_steps: int = 0
    steps: int = 0  # the steps the scale took (fewer than asked when a plateau stopped it)


def resample_state(carry: Carry, like: torch.Tensor) -> Carry:
    """``carry`` resampled to the size of ``like`` (the new scale's image), laid out like it.

    Adam's first moment and the average are resampled as the image is (antialiased bicubic, unclamped:
    they are signed or unnormalised); the second moment bilinearly, whose weights are non-negative, so it
    stays >= 0 (clamped as well, against rounding). The step count is kept: the moments are not empty,
    so Adam's bias correction must not start again. The per-pixel gradient of every loss here is
    proportional to 1 / (pixel count) (each is a mean over pixels), so the first moment is multiplied by
    the ratio of the pixel counts and the second by its square: the carried moments then have the scale
    the new gradients will have, and the first steps move the pixels as far as the last ones did.
    """
    size = tuple(like.shape[-2:])

    def resample(t: torch.Tensor, mode: str, gain: float = 1.0) -> torch.Tensor:
        if tuple(t.shape[-2:]) == size:
            out = t.to(like.dtype)
        else:
            out = F.interpolate(t.to(like.dtype), size=size, mode=mode, align_corners=False, antialias=True)
        return torch.empty_like(like).copy_(out.mul_(gain) if gain != 1.0 else out)

    optimizer = None
    if carry.optimizer is not None:
        optimizer = {"param_groups": carry.optimizer["param_groups"], "state": {}}
        for key, entry in carry.optimizer["state"].items():
            old = entry["exp_avg"]
            ratio = old.shape[-2] * old.shape[-1] / (size[0] * size[1])
            moved = dict(entry)
            moved["exp_avg"] = resample(old, "bicubic", ratio)
            moved["exp_avg_sq"] = resample(entry["exp_avg_sq"], "bilinear", ratio * ratio).clamp_min_(0)
            optimizer["state"][key] = moved
    average = None if carry.average is None else resample(carry.average, "bicubic")
    return Carry(optimizer, average, carry.average_steps)


class StepPool:
    """Captured CUDA-graph steps kept for a later scale of the same shape and settings (an Engine holds one).

    A captured graph reads and writes fixed tensors: the image, Adam's moments and step count, the
    loss's targets. A later job of the same shape borrows the step: its start image and targets are
    copied into those tensors and Adam's state is zeroed in place (what a fresh Adam starts from), so
    the graph replays from its first step without warm-up or capture. Only what a graph can take
    again is kept: Adam, untiled objectives whose loss holds all its tensors as buffers, not fp16
    (its loss scale settles on the host first). At most ``capacity`` graphs, the oldest dropped first.
    """

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self.captures = 0  # graphs captured and kept
        self.reuses = 0  # scales that replayed a kept graph
        self._steps: "OrderedDict[tuple, GraphedStep]" = OrderedDict()

    @staticmethod
    def key(problem: "ScaleProblem", image: torch.Tensor) -> Optional[tuple]:
        """What a kept graph must match to replay ``problem``; None when it cannot be kept at all."""
        objective = problem.objective
        criterion = getattr(objective, "criterion", None)
        runtime = problem.runtime
        if type(objective) is not Objective or not isinstance(criterion, torch.nn.Module):
            return None
        if runtime is None or not runtime.cuda_graphs or runtime.precision == "fp16" or problem.optimizer != "adam":
            return None
        for module in criterion.modules():  # a tensor that is not a buffer would not be copied in
            for name, value in vars(module).items():
                values = value if isinstance(value, (list, tuple)) else [value]
                if not name.startswith("_") and any(torch.is_tensor(v) for v in values):
                    return None
        buffers = tuple((name, tuple(t.shape), t.dtype) for name, t in criterion.state_dict().items())
        # Python numbers in the loss are baked into the graph's kernels: part of the key.
        weights = (
            tuple(getattr(criterion, "content_layer_weights", ())),
            tuple(getattr(criterion, "style_layer_weights", ())),
            tuple(sorted(getattr(criterion, "weights", {}).items())),
        )
        layout = (tuple(image.shape), image.stride(), image.dtype, str(image.device))
        return (layout, problem.lr, id(objective.extractor), buffers, weights)

    def lend(self, problem: "ScaleProblem", start: torch.Tensor) -> Optional["GraphedStep"]:
        """A kept step set to run ``problem`` from ``start``, or None (the caller makes a new one)."""
        key = self.key(problem, start)
        step = self._steps.pop(key, None) if key is not None else None
        if step is None:
            return None
        inner = step.step
        with torch.no_grad():
            inner.image.copy_(start)
            inner.objective.criterion.load_state_dict(problem.objective.criterion.state_dict())  # copies in place
            for state in inner.optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()
        self.reuses += 1
        return step

    def give_back(self, problem: "ScaleProblem", step: "GraphedStep") -> torch.Tensor:
        """Keep ``step`` for a later scale and return this scale's result (a copy of its image)."""
        key = self.key(problem, step.step.image)
        if key is None or step.graph is None:  # never captured (fewer steps than the warm-up)
            return step.finish()
        with torch.no_grad():
            result = step.step.image.detach().clamp(0, 1)
        if not getattr(step, "kept", False):
            step.kept = True
            self.captures += 1
        self._steps[key] = step
        self._steps.move_to_end(key)
        while len(self._steps) > self.capacity:
            self._steps.popitem(last=False)[1].finish()
        return result

    def clear(self) -> None:
        for step in self._steps.values():
            step.finish()
        self._steps.clear()


def _never(i: int) -> bool:
    return False


@dataclass(kw_only=True)
class Reporting:
    """How a scale's steps are reported.

    ``on_step(i, loss, parts, image)`` receives plain floats, and ``image``, a function that builds the
    current result (call it during ``on_step``), or None for a step reported late. Losses are read from
    the device once ``every`` steps (default: every step with ``on_step``, else ``SYNC_EVERY``) are
    waiting or ``seconds`` have passed since the last read, at every step ``due(i)`` names, and at the
    end; a NaN or infinite loss stops the run with ``NonFiniteLoss`` at that read.
    """

    on_step: Optional[Callable[[int, float, dict, Callable], None]] = None
    every: Optional[int] = None
    seconds: float = 0.0
    due: Callable[[int], bool] = _never


@dataclass(kw_only=True)
class Checkpointing:
    """Where a scale's state goes and where it comes from.

    ``save(state)`` receives the scale's complete state (step, image, optimiser state, average) after
    every step ``i`` for which ``due(i)``, and before ``Interrupted`` is raised when ``should_stop()``
    (the run's ``Control.poll``) turns true. ``resume`` is such a state: the scale goes on from there
    exactly as if it had not stopped.
    """

    save: Optional[Callable[[dict], None]] = None
    due: Callable[[int], bool] = _never
    should_stop: Callable[[], bool] = lambda: False
    resume: Optional[dict] = None


@dataclass(frozen=True, kw_only=True)
class Plateau:
    """When a scale's loss has flattened, so that its remaining steps would change little (``--plateau``).

    Checked every ``every`` steps, after at least ``window`` of them: the scale stops once its last
    ``window`` steps lowered the loss by less than ``tolerance`` of the loss ``window`` steps ago. A
    comparison over a window, not step to step, because Adam's steps jitter the loss; checked at fixed
    steps, not whenever the losses happen to be read, so that a resumed run stops where an uninterrupted
    one does. Processes sharing tiles all see the same (all-reduced) loss, so they all stop at the same step.
    """

    tolerance: float
    window: int = 20
    every: int = 5

    def due(self, i: int) -> bool:
        return i >= self.window and i % self.every == 0

    def flat(self, losses: Sequence[float]) -> bool:
        """``losses``: the scale's total loss at steps 1..i, in order (the check is at i = len(losses))."""
        if len(losses) <= self.window:
            return False
        before, now = losses[-1 - self.window], losses[-1]
        return before - now < self.tolerance * abs(before)


@dataclass(kw_only=True)
class ScaleProblem:
    """One scale's optimisation: the starting ``image`` (not modified), what to minimise, and how.

    ``after_step(i)`` runs after every step that did not stop, on the host, without reading the device:
    the run's ``Control.check``, which raises ``Stopped`` for a cancel or a time limit. ``steps_pool`` (CUDA
    graphs) lends a step captured by an earlier scale of the same shape and settings, and takes this one
    back at the end.
    """

    image: torch.Tensor
    objective: Callable
    steps: int
    optimizer: str = "adam"
    lr: float = 0.02
    ema_decay: float = 0.0
    runtime: Optional["Runtime"] = None  # None: eager steps, float32
    reporting: Reporting = field(default_factory=Reporting)
    checkpointing: Checkpointing = field(default_factory=Checkpointing)
    after_step: Callable[[int], None] = lambda i: None
    steps_pool: Optional["StepPool"] = None
    carry: Optional[Carry] = None  # what the previous scale returned: Adam's state and the average go on
    plateau: Optional[Plateau] = None  # stop before ``steps`` once the loss has flattened


def optimize_scale(problem: ScaleProblem) -> tuple[torch.Tensor, Carry]:
    """Run ``problem.steps`` steps from ``problem.image``; returns the result and the state to carry on.

    With ``problem.plateau`` the scale may stop earlier (``Carry.steps`` says where): its losses are then
    read at each of the plateau's checks.

    ``problem.carry`` is what the previous scale returned: Adam's moments and step count and the moving
    average go on from there, resampled to this scale (``resample_state``), instead of starting afresh.
    It is consumed: its tensors are dropped once resampled. A resumed scale (``Checkpointing.resume``)
    holds its carried state already.

    With ``ema_decay`` > 0 the result is the exponential moving average of
    the iterates (bias-corrected, as Adam corrects its moments), which
    smooths out the step-to-step jitter Adam leaves in the pixels.
    Reporting and checkpoints: see ``Reporting`` and ``Checkpointing``.
    """
    p, report, saving = problem, problem.reporting, problem.checkpointing
    resume, steps, ema_decay = saving.resume, problem.steps, problem.ema_decay
    start = 0 if resume is None else int(resume["step"])
    source = p.image if resume is None else resume["image"].to(p.image)
    carried = None
    if p.carry is not None and resume is None:
        # Resampled before a kept graph step is lent: the carry may hold another kept step's tensors.
        carried = resample_state(p.carry, source)
        p.carry.optimizer = p.carry.average = None  # the old scale's tensors are released now
    lent = p.steps_pool.lend(p, source) if p.steps_pool is not None and resume is None else None
    if lent is not None:
        step, param = lent, lent.step.image
    else:
        param = source.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        step = make_step(param, p.objective, p.optimizer, p.lr, p.runtime)
    every = report.every or (1 if report.on_step is not None else SYNC_EVERY)
    last_read = time.perf_counter()
    pending: list[tuple[int, torch.Tensor]] = []
    names: list[str] = []
    average = torch.zeros_like(param, requires_grad=False) if ema_decay else None
    summed = 0  # steps the average had summed before this scale began
    plateau = p.plateau
    losses: list[float] = []  # this scale's total losses, step by step, for the plateau's checks
    if resume is not None:
        losses = list(resume.get("losses", []))
        load_optimizer_state(step.optimizer, resume["optimizer"])
        if step.loss_scale is not None and resume.get("loss_scale") is not None:
            step.loss_scale.load_state_dict(resume["loss_scale"])
        if average is not None:
            average.copy_(resume["ema"])
        summed = int(resume.get("ema_steps", start)) - start
    elif carried is not None:
        if carried.optimizer is not None and p.optimizer == "adam":
            load_optimizer_state(step.optimizer, carried.optimizer, copy=False)
        if average is not None and carried.average is not None:
            average.copy_(carried.average)
            summed = carried.average_steps
        carried = None

    def current(i):
        # What a callback, a snapshot or an interrupt sees: the average when there is one.
        return param.detach() if average is None else (average / (1 - ema_decay ** (summed + i))).clamp(0, 1)

    last = steps
    for i in range(start + 1, steps + 1):
        total, parts = step()
        if average is not None:
            average.mul_(ema_decay).add_(param.detach(), alpha=1 - ema_decay)
        names = list(parts)
        # One small device tensor per step; the copy matters for graph replay, whose outputs are reused.
        pending.append((i, torch.stack([total, *parts.values()]).float()))
        stop = saving.should_stop()
        save = saving.save is not None and (stop or saving.due(i))
        late = report.seconds and time.perf_counter() - last_read >= report.seconds
        check = plateau is not None and plateau.due(i)
        if len(pending) >= every or late or i == steps or save or report.due(i) or check:
            image = _Lazy(current, i)
            losses.extend(_flush(pending, names, report.on_step, image))
            image.expire()
            pending, last_read = [], time.perf_counter()
        flat = check and i < steps and plateau.flat(losses)  # a check reads every pending loss first
        if save:
            saving.save(
                {
                    "step": i,
                    "image": param.detach().cpu().clone(),
                    "optimizer": _to_cpu(step.optimizer.state_dict()),
                    "ema": None if average is None else average.cpu().clone(),
                    "ema_steps": summed + i,
                    "loss_scale": None if step.loss_scale is None else step.loss_scale.state_dict(),
                    "losses": list(losses) if plateau is not None else [],
                }
            )
        if stop:
            raise Interrupted(current(i).detach().clone(), i)
        p.after_step(i)
        if flat:
            last = i
            break
    if p.steps_pool is not None and isinstance(step, GraphedStep):
        result = p.steps_pool.give_back(p, step)  # a copy: the step's image is reused by the next job
    else:
        result = step.finish()
    if average is not None and summed + last > 0:
        result = (average / (1 - ema_decay ** (summed + last))).clamp_(0, 1)
    adam = step.optimizer.state_dict() if p.optimizer == "adam" else None
    return result, Carry(adam, average, summed + last, steps=last)


# Param-group settings that belong to this run's device, not to the checkpoint's.
_DEVICE_FLAGS = ("capturable", "fused", "foreach")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, copy: bool = True) -> None:
    """Load a checkpoint's optimiser state, keeping this run's device settings.

    ``load_state_dict`` also brings back the saved param-group flags: a checkpoint written on the CPU
    would leave a CUDA run's Adam with ``capturable=False`` and its step count on the host, which CUDA
    graph replay refuses, and one written on CUDA would ask the CPU for a fused update. The flags are
    put back to this run's, and Adam's step count moves where they want it (the param's device when
    capturable or fused, else the host). ``state`` itself is not modified, unless ``copy`` is False
    (a state made for this call alone, such as a resampled one, whose tensors the optimiser may keep).

    State tensors the optimiser already has (a step captured in a CUDA graph, kept by a ``StepPool``,
    reads and writes those very tensors) are kept, and the loaded values copied into them.
    """
    ours = [{k: group[k] for k in _DEVICE_FLAGS if k in group} for group in optimizer.param_groups]
    before = {param: dict(entry) for param, entry in optimizer.state.items()}
    # A copy: load_state_dict keeps the very tensors it is given where they already fit, and the steps
    # would then change the caller's checkpoint in place (resuming it twice would not start from the same state).
    optimizer.load_state_dict(_to_cpu(state) if copy else state)
    for group, flags in zip(optimizer.param_groups, ours):
        group.update(flags)
        on_device = group.get("capturable") or group.get("fused")
        for param in group["params"]:
            entry = optimizer.state.get(param, {})
            if torch.is_tensor(entry.get("step")):
                entry["step"] = entry["step"].to(param.device if on_device else "cpu")
            for name, prior in before.get(param, {}).items():
                value = entry.get(name)
                if torch.is_tensor(prior) and torch.is_tensor(value) and prior.shape == value.shape:
                    with torch.no_grad():
                        prior.copy_(value)
                    entry[name] = prior


def _to_cpu(value):
    """An optimiser state dict with every tensor on the CPU (checkpoints load on any device)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class _Lazy:
    """``build(i)``, made on the first call and kept; None once expired (the run has moved on)."""

    def __init__(self, build, i):
        self.build, self.i, self.value, self.expired = build, i, None, False

    def __call__(self):
        if self.value is None and not self.expired:
            self.value = self.build(self.i)
        return self.value

    def expire(self):
        self.expired = True


def _flush(pending, names, on_step, image) -> list[float]:
    """Read the pending steps' losses (checked finite), report them; returns their totals in order."""
    values = torch.stack([v for _, v in pending]).cpu().tolist()  # the one host-device sync
    last = pending[-1][0]
    for (i, _), row in zip(pending, values):
        if not all(v == v and abs(v) != float("inf") for v in row):
            bad = "NaN" if any(v != v for v in row) else "infinite"
            raise NonFiniteLoss(
                f"the loss became {bad} at step {i} of this scale, so the run stopped and nothing was written; "
                f"try a lower {option('lr')}, or {option('precision')} fp32 or bf16 instead of fp16"
            )
        if on_step is not None:
            on_step(i, row[0], dict(zip(names, row[1:])), image if i == last else None)
    return [row[0] for row in values]
