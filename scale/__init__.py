"""Beyond one process: one image shared by several processes (``scale.tiled``, torch.distributed) and many
jobs over a Ray cluster (``scale.ray``). Builds on engine/; engine never imports this package by name."""
