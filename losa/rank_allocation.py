"""Sparsity-aware rank allocation (SRA, method.md §3): one LoRA rank per block from its reconstruction error.

Pure arithmetic on a list of errors: it must not run a model, read or write files, or import orchestration or
tracking code. The errors L_l themselves are measured by :mod:`losa.calibration` while pruning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


def allocate_ranks(
    errors: torch.Tensor | Sequence[float], mean_rank: int, r_min: int = 1, r_max: int = 16
) -> list[int]:
    """Ranks proportional to the blocks' reconstruction errors, summing to ``mean_rank * L`` (method.md §3).

    r_l = round(Omega * L_l / L_avg) (round half to even, as numpy's), clipped to [r_min, r_max]. The sum is then
    corrected to Omega * L exactly: while it is too large, take 1 from each block above r_min in order of increasing
    error (ties: earlier block first), pass after pass; while it is too small, give 1 to each block below r_max in
    order of decreasing error (ties: earlier block first). Both keep the ranks non-decreasing in the error. The
    official code makes a single such pass, so its sum can stay off the target when the correction exceeds the
    number of eligible blocks; here the passes repeat until the sum is exact.

    r_min must be >= 1: a block with rank 0 would have no adapter at all, which the masked LoRA does not model.
    If every error is 0 (nothing was pruned), every block gets ``mean_rank``.

    Args:
        errors: (L,) reconstruction errors L_l >= 0, one per block.
        mean_rank: Omega^t, the mean rank per block (see :func:`losa.schedule.mean_rank`).
        r_min: smallest rank (official: 1).
        r_max: largest rank (official: 16; the official LoRA is physically rank 8, see method.md §3).

    Returns:
        L ints in [r_min, r_max] summing to ``mean_rank * L``; a block with a higher error never gets a lower rank.

    Raises:
        ValueError: on empty, non-1-D, negative or non-finite errors, non-int arguments, r_min < 1, r_min > r_max, or
            a mean rank outside [r_min, r_max] (then no allocation can sum to mean_rank * L).
    """
    for name, value in (("mean_rank", mean_rank), ("r_min", r_min), ("r_max", r_max)):
        _check_int(name, value)
    if r_min < 1 or r_min > r_max:
        raise ValueError(f"need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")
    errs = torch.as_tensor(errors, dtype=torch.float64)
    if errs.ndim != 1 or errs.numel() == 0:
        raise ValueError(f"errors must be a non-empty 1-D sequence, got shape {tuple(errs.shape)}")
    errs = errs.tolist()
    if not all(math.isfinite(e) and e >= 0 for e in errs):
        raise ValueError(f"errors must be finite and >= 0, got {errs}")
    n_blocks = len(errs)
    target = mean_rank * n_blocks
    if not r_min <= mean_rank <= r_max:
        raise ValueError(
            f"mean_rank {mean_rank} x {n_blocks} blocks = {target} is outside [{r_min * n_blocks}, {r_max * n_blocks}] "
            f"(r_min={r_min}, r_max={r_max})"
        )
    total = sum(errs)
    if total == 0:
        return [mean_rank] * n_blocks
    # (L_l / sum L) * Omega * L == Omega * L_l / L_avg, in the official code's order of operations.
    ranks = [min(r_max, max(r_min, round(e / total * mean_rank * n_blocks))) for e in errs]
    excess = sum(ranks) - target
    ascending = sorted(range(n_blocks), key=lambda i: (errs[i], i))
    descending = sorted(range(n_blocks), key=lambda i: (-errs[i], i))
    while excess > 0:  # too many: lowest-error blocks above r_min give one each
        for i in ascending:
            if excess == 0:
                break
            if ranks[i] > r_min:
                ranks[i] -= 1
                excess -= 1
    while excess < 0:  # too few: highest-error blocks below r_max take one each
        for i in descending:
            if excess == 0:
                break
            if ranks[i] < r_max:
                ranks[i] += 1
                excess += 1
    return ranks
