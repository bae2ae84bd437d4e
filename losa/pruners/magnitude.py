"""Magnitude pruning: score |W| (method.md §1). A pure rule: returns a mask, changes nothing."""

from __future__ import annotations

import torch

from ..patterns import Pattern
from ._select import select_mask


def magnitude_mask(weight: torch.Tensor, sparsity: float | None, pattern: Pattern = Pattern(), per: str = "matrix") -> torch.Tensor:
    """Mask keeping the largest |W|.

    Args:
        weight: (d_out, d_in) weight.
        sparsity: fraction pruned (implied by an N:M pattern).
        pattern: unstructured or N:M.
        per: ``"matrix"`` (the papers' magnitude baseline: one threshold per layer) or ``"row"``.

    Returns:
        (d_out, d_in) bool mask, True = kept.
    """
    return select_mask(weight.detach().abs().float(), sparsity, pattern, per=per)
