"""The FLOP count of one optimisation step, stated so that TFLOP/s figures can be checked.

Counted (a multiply-add is 2 FLOPs):

* every convolution that runs, forward: ``2 * C_in * C_out * 9 * H_l * W_l``;
* the same again for the backward pass, which computes the gradient with
  respect to each convolution's *input* only (the weights are frozen, so no
  weight gradients are computed);
* each style layer's Gram matrix, ``2 * C^2 * H_l * W_l`` forward (einsum
  computes the full C x C product) and twice that backward: ``F F^T`` has
  the same tensor on both sides, and autograd computes the gradient through
  each side with its own matmul.

Not counted: ReLU, pooling, the losses' element-wise work, the optimiser
update, and the target features (computed once per scale, not per step).
These are memory-bound and small next to the convolutions, so the figure is
a slight undercount of the work done, never an overcount. A test checks the
count against ``torch.utils.flop_counter.FlopCounterMode`` run on a real step.
"""

from __future__ import annotations

from engine.vgg import conv_shapes, truncated_names


def layer_sizes(model: str, layers, height: int, width: int) -> dict[str, tuple[int, int]]:
    """Spatial size of every layer that runs (pools halve, rounding down)."""
    sizes, h, w = {}, height, width
    for name in truncated_names(model, layers):
        if name.startswith("pool"):
            h, w = h // 2, w // 2
        sizes[name] = (h, w)
    return sizes


def step_flops(
    model: str, feature_layers, style_layers, height: int, width: int, batch: int = 1, style_loss: str = "gram"
) -> dict[str, float]:
    """``{"conv": ..., "gram": ..., "total": ...}`` FLOPs of one step on ``batch`` images.

    For the OT and W2 losses only the convolutions are counted (their own
    sorts and matrix roots are not), so their TFLOP/s is a lower bound.
    """
    sizes = layer_sizes(model, feature_layers, height, width)
    shapes = conv_shapes(model)
    conv = sum(
        2 * c_in * c_out * 9 * sizes[name][0] * sizes[name][1]
        for name, (c_out, c_in) in shapes.items()
        if name in sizes
    )
    gram = 0
    for name in style_layers if style_loss == "gram" else ():
        block = int(name[4:].split("_")[0]) if name.startswith(("relu", "conv")) else int(name[4:])
        channels = shapes[f"conv{block}_1"][0]
        gram += 2 * channels * channels * sizes[name][0] * sizes[name][1]
    conv, gram = 2 * conv * batch, 3 * gram * batch  # forward + backward
    return {"conv": float(conv), "gram": float(gram), "total": float(conv + gram)}
