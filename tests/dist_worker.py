"""One process of tests/test_scale_tiled.py's torchrun group: ``torchrun ... dist_worker.py CONTENT STYLE OUTDIR``.

Every process runs the same stylize calls sharing the tiles (``scale.tiled.ProcessShare``) and saves its
images as ``rank{R}_{name}.pt``; rank 0 then runs the same calls alone, unshared, for the references.
"""

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_tiling import loss_and_grad, problem

from engine import Config, stylize
from engine.checkpoint import CheckpointPlan, load
from engine.control import Control, Interrupted
from engine.errors import UserError
from engine.tiling import Geometry, TiledObjective, Tiling
from scale.tiled import ProcessShare, init_process_group

SHALLOW = dict(style_layers=("relu1_1", "relu2_1", "relu3_1"), content_layers=("relu2_1",))  # stride 4, halo 12
RUNS = {
    # 48x36: 3 x 3 tiles of 16 px
    "gram": Config(device="cpu", size=48, min_size=48, steps=5, tile="16", **SHALLOW),
    # scales 17x13 (one tile: the second process has none), 24x18, 34x26, 48x36; w2's sums are not plain Grams
    "w2": Config(device="cpu", size=48, min_size=17, steps=2, tile="20", style_loss="w2", **SHALLOW),
    # Lagged statistics: the next step's sums travel with the gradient (and from a process with no tile)
    "gram_lagged": Config(device="cpu", size=48, min_size=48, steps=5, tile="16", tile_stats="lagged", **SHALLOW),
    "w2_lagged": Config(
        device="cpu", size=48, min_size=17, steps=3, tile="20", style_loss="w2", tile_stats="lagged", **SHALLOW
    ),
}


def main(content: str, style: str, outdir: str) -> None:
    init_process_group()
    share = ProcessShare()
    out = Path(outdir)
    rank = share.rank
    save = lambda name, image: torch.save(image, out / f"rank{rank}_{name}.pt")  # noqa: E731
    for name, config in RUNS.items():
        save(name, stylize(content, style, config, share=share).image)
    try:  # tile auto could leave a scale untiled, which every process would then compute whole
        stylize(content, style, Config(device="cpu", size=48, **SHALLOW), share=share)
    except UserError as exc:
        (out / f"rank{rank}_refused.txt").write_text(str(exc))

    # One evaluation in float64 (test_tiling's problems: two jobs, blended styles, 46x58 in 12 tiles): shared
    # and alone must agree to float64 rounding. Saved: the largest relative error of the loss, parts and gradient.
    for loss, masks in [("gram", False), ("w2", False)]:  # a masked Gram's sums travel as a Gram's do
        config, extractor, criterion, *_, image = problem(loss, masks=masks)
        grid = Tiling(16, Geometry.of(config.model, config.feature_layers)).grid(*image.shape[-2:])
        results = [
            loss_and_grad(TiledObjective(extractor, criterion, grid, autocast=contextlib.nullcontext, share=s), image)
            for s in (share, None)
        ]
        (total, parts, grad), (total1, parts1, grad1) = results
        errors = [abs(total / total1 - 1), *(abs(parts[k] / parts1[k] - 1) for k in parts)]
        errors.append((grad - grad1).abs().max() / grad1.abs().max())
        save(f"float64_{loss}", torch.stack(errors).max())
        print(f"rank {rank} float64 {loss}: {float(torch.stack(errors).max()):.2e}")

    # Stopped after step 3 of 5: rank 0 alone is asked (as a signal would reach one process first); every
    # process must stop after the same step, and only the leader writes its checkpoint.
    asked = {"steps": 0}

    def watch():
        asked["steps"] += 1
        if rank == 0 and asked["steps"] >= 3:
            control.interrupt()

    control = Control(watch=watch)
    path = out / f"rank{rank}.ckpt"
    plan = CheckpointPlan(str(path), every=0)
    try:
        stylize(content, style, RUNS["gram"], checkpoint=plan, control=control, share=share)
        raise AssertionError("the run was not interrupted")
    except Interrupted as stop:
        save("interrupted", torch.tensor(stop.step))
    dist.barrier()
    assert (out / "rank0.ckpt").is_file() and not (out / "rank1.ckpt").exists()
    state = load(out / "rank0.ckpt")
    dist.barrier()  # every process has read it before the leader's finished run deletes it
    resumed = stylize(content, style, RUNS["gram"], checkpoint=CheckpointPlan(str(path)), resume=state, share=share)
    save("resumed", resumed.image)
    dist.barrier()
    save("checkpoint_left", torch.tensor((out / "rank0.ckpt").exists()))
    dist.destroy_process_group()

    if rank == 0:
        for name, config in RUNS.items():
            torch.save(stylize(content, style, config).image, out / f"alone_{name}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
