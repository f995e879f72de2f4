"""One image over several processes: ``torchrun --nproc-per-node N -m scale.tiled stylize ... --tile T``.

Each step of an exactly tiled run (``engine.tiling.TiledObjective``) is a
loop over tiles whose only coupling is through sums: pass 1 adds up every
tile's style statistics, pass 2 adds up every tile's share of the image
gradient. So the tiles of each step are divided among the processes
(``ProcessShare.mine``, balanced by crop area), each process sums its own,
and the sums are all-reduced: the pass-1 statistics (per style layer a
``C x C`` matrix per image, and the mean for W2) before the losses are
evaluated, the image gradient and the content and TV shares after pass 2.
Every process then holds the same loss and gradient and steps the same
Adam (or L-BFGS) on its own copy of the image; the images stay identical
because an all-reduce gives every process the same bits. The leader
(rank 0) shows progress and writes the output, snapshots and checkpoints.

Targets (content features, style statistics) are computed by every process
once per scale: the cost of one pass 1, not shared.

Backends: gloo for CPU tensors, NCCL for CUDA tensors (each process uses
the GPU of its ``LOCAL_RANK``). The command line is ``nst stylize`` and
``nst resume``'s, with ``--tile`` required; checkpoints are ordinary ones
(``nst resume`` goes on from them in one process, or under torchrun with
any number of processes).
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from engine.tiling import Tile

# Small tensors (the pass-1 sums, the loss parts) travel in one message per dtype; tensors above this many
# elements (the image gradient) are reduced in place, without a copy of the image.
COALESCE_BELOW = 1 << 20
# How long a process waits for the others at a collective before failing: a step of a very large image
# on a slow device, not a hang, should fit in it.
TIMEOUT = datetime.timedelta(minutes=60)


class ProcessShare:
    """``engine.tiling.TileShare`` over the default torch.distributed process group."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.leader = self.rank == 0

    def mine(self, tiles: Sequence[Tile]) -> list[int]:
        return assign(tiles, self.world)[self.rank]

    def all_reduce(self, tensors: list[torch.Tensor]) -> None:
        small: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            if t.numel() >= COALESCE_BELOW:
                _reduce_in_place(t)
            else:
                small.setdefault((t.dtype, t.device), []).append(t)
        for group in small.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def any(self, flag: bool) -> bool:
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)  # a CPU tensor: gloo, whatever the device
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def _reduce_in_place(t: torch.Tensor) -> None:
    if t.is_contiguous():
        dist.all_reduce(t)
        return
    dense = t.contiguous()  # e.g. a channels-last gradient: the collectives want a plain dense layout
    dist.all_reduce(dense)
    t.copy_(dense)


def assign(tiles: Sequence[Tile], processes: int) -> list[list[int]]:
    """Tile indices per process: largest crop first to the least loaded process (crop area is the work).

    Deterministic, so that every process computes the same assignment without talking. A process may get
    no tile (a small early scale): it still takes part in every reduction, with zeros.
    """
    load = [0] * processes
    mine: list[list[int]] = [[] for _ in range(processes)]
    area = lambda t: (t.crop[1] - t.crop[0]) * (t.crop[3] - t.crop[2])  # noqa: E731
    for index in sorted(range(len(tiles)), key=lambda i: (-area(tiles[i]), i)):
        target = min(range(processes), key=lambda p: (load[p], p))
        mine[target].append(index)
        load[target] += area(tiles[index])
    return [sorted(m) for m in mine]


def init_process_group() -> None:
    """Join the group torchrun describes in the environment: gloo for CPU tensors, NCCL for CUDA ones."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from cli.main import EXIT_USER_ERROR, build_parser
    from cli.stylize import prepare_resume, prepare_stylize, run_file_job
    from engine.errors import UserError, cli_wording

    argv = list(sys.argv[1:] if argv is None else argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print(
            "nst: error: scale.tiled runs under torchrun, e.g. torchrun --standalone --nproc-per-node 2 "
            "-m scale.tiled stylize CONTENT STYLE -o OUTPUT --tile 512",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    parser = build_parser()
    parser.prog = "torchrun ... -m scale.tiled"
    prepare = {"stylize": prepare_stylize, "resume": prepare_resume}
    init_process_group()
    share = ProcessShare()
    try:
        with cli_wording():
            args = parser.parse_args(argv)
            if args.command not in prepare:
                raise UserError(f"scale.tiled runs stylize or resume, not {args.command}")
            job, config, resume = prepare[args.command](args)
            return run_file_job(job, config, resume=resume, quiet=args.quiet, share=share)
    except UserError as exc:
        # Every process checks the same inputs and usually fails alike: the leader says so, the others name
        # themselves (a failure of one process alone, such as its device running out of memory, is still told).
        print(f"nst: error: {exc}" if share.leader else f"nst: error (rank {share.rank}): {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
