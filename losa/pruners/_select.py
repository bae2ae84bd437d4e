"""Mask selection shared by the pruning rules: keep the highest scores per matrix, per row, or per N:M group.

Masks are bool tensors with True = kept. Ties are broken by position (stable sorts), so masks are deterministic, and
entries that are already zero score 0 and are pruned first, so masks are nested as sparsity grows (method.md §1).
"""

from __future__ import annotations

import torch

from ..patterns import Pattern


def kept_count(size: int, sparsity: float) -> int:
    """Number of weights kept out of ``size`` at ``sparsity``: round((1 - s) * size)."""
    return int(round((1.0 - sparsity) * size))


def _keep_top(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask keeping the ``keep`` highest entries of each row of a 2-D score (stable among ties)."""
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(-1, order[..., :keep], True)
    return mask


def select_mask(score: torch.Tensor, sparsity: float | None, pattern: Pattern, per: str = "row") -> torch.Tensor:
    """Keep the highest scores of a (d_out, d_in) score matrix.

    Args:
        score: (d_out, d_in) importance scores, higher = more important.
        sparsity: fraction pruned (ignored for N:M, which implies 1 - N/M; a disagreeing value raises).
        pattern: unstructured or N:M (N kept in each group of M consecutive inputs of a row).
        per: unstructured comparison group, ``"row"`` (Wanda) or ``"matrix"`` (magnitude, as in the papers' baseline).

    Returns:
        (d_out, d_in) bool mask, True = kept.
    """
    if score.ndim != 2:
        raise ValueError(f"score must be 2-D (d_out, d_in), got shape {tuple(score.shape)}")
    sparsity = pattern.resolve_sparsity(sparsity)
    d_out, d_in = score.shape
    if pattern.is_nm:
        pattern.check_shape(d_in)
        groups = score.reshape(d_out * d_in // pattern.m, pattern.m)  # (d_out * d_in/M, M)
        return _keep_top(groups, pattern.n).reshape(d_out, d_in)
    if per == "row":
        return _keep_top(score, kept_count(d_in, sparsity))
    if per == "matrix":
        return _keep_top(score.reshape(1, -1), kept_count(score.numel(), sparsity)).reshape(d_out, d_in)
    raise ValueError(f"per must be 'row' or 'matrix', got {per!r}")
