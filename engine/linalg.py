"""Small linear algebra shared by the colour transfer and the W2 loss."""

from __future__ import annotations

import torch


def sym_power(m: torch.Tensor, p: float, floor: float = 0.0) -> torch.Tensor:
    """``m ** p`` of a symmetric positive semi-definite matrix by ``eigh``, eigenvalues clamped at ``floor``."""
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp_min(floor) ** p) @ vectors.T
