"""Pruning rules (method.md §1): pure functions of a weight, its calibration statistic, a sparsity and a pattern.

:data:`METHODS` maps a method name to a :class:`Rule` that the block-by-block driver (:mod:`losa.calibration`) calls
without branching on the name: ``rule.statistic`` says what to accumulate from the layer's inputs, ``rule.prune``
returns the new weight and its mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..patterns import Pattern
from .magnitude import magnitude_mask
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_mask

__all__ = ["METHODS", "Rule", "apply_mask", "get_rule", "magnitude_mask", "sparsegpt_prune", "wanda_mask"]


@dataclass(frozen=True)
class Rule:
    """A pruning rule as the driver sees it.

    ``statistic``: ``None``, ``"act_sq"`` (sum over tokens of x_j^2, shape (d_in,)) or ``"hessian"`` (2 X X^T / n).
    ``prune(weight, statistic, sparsity, pattern, info) -> (new_weight, mask)``; ``info`` collects diagnostics.
    ``masks_only``: the new weight is the old one where the mask keeps it, exactly 0 elsewhere (no weight update, as
    SparseGPT's is): a pruned state is then its input state plus the mask.
    """

    name: str
    statistic: str | None
    prune: Callable[[torch.Tensor, torch.Tensor | None, float, Pattern, dict], tuple[torch.Tensor, torch.Tensor]]
    masks_only: bool = True


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` where ``mask`` keeps it, +0 elsewhere: what a masking rule does (restoring a stored mask too)."""
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def _masked(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_mask(weight, mask), mask


METHODS: dict[str, Rule] = {
    "magnitude": Rule("magnitude", None, lambda w, s, sp, p, info: _masked(w, magnitude_mask(w, sp, p))),
    "wanda": Rule("wanda", "act_sq", lambda w, s, sp, p, info: _masked(w, wanda_mask(w, s, sp, p))),
    "sparsegpt": Rule("sparsegpt", "hessian", lambda w, s, sp, p, info: sparsegpt_prune(w, s, sp, p, stats=info),
                      masks_only=False),
}


def get_rule(method: str) -> Rule:
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]
