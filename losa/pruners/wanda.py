"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row (method.md §1). Pure rule."""

from __future__ import annotations

import torch

from ..patterns import Pattern
from ._select import select_mask


def wanda_mask(weight: torch.Tensor, act_sq: torch.Tensor, sparsity: float | None, pattern: Pattern = Pattern()) -> torch.Tensor:
    """Wanda's mask.

    Args:
        weight: (d_out, d_in) weight.
        act_sq: (d_in,) sum (or mean: a per-row constant does not change the ranking) over calibration tokens of x_j^2.
        sparsity: fraction pruned in every row (implied by an N:M pattern).
        pattern: unstructured or N:M.

    Returns:
        (d_out, d_in) bool mask, True = kept; every row keeps round((1 - s) * d_in) weights.
    """
    if act_sq.shape != (weight.shape[1],):
        raise ValueError(f"act_sq must have shape ({weight.shape[1]},), got {tuple(act_sq.shape)}")
    score = weight.detach().abs().float() * act_sq.to(weight.device).float().clamp_min(0).sqrt()[None, :]
    return select_mask(score, sparsity, pattern, per="row")
