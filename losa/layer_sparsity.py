"""Layer-wise sparsity rates from representation similarity (LSR, method.md §2), and mixed N:M per block (§1).

Pure arithmetic on tensors and lists: hidden states (or their Gram matrices) in, CKA, importance and per-block rates
out. It must not run a model, read or write files, or import orchestration or tracking code.

Pipeline (method.md §2): block inputs X_l -> :func:`linear_cka` -> :func:`layer_importance` (I_l = exp(-beta S_hat_l))
-> :func:`allocate_layer_sparsity` with the band half-width from :func:`delta_for` (rates s_l), or :func:`mixed_nm`
(one N:M pattern per block). Ties are always broken the same way: between blocks of equal importance the earlier
block counts as the more important one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .patterns import Pattern
from .schedule import (DEFAULT_DELTA_BANDS, OFFICIAL_DELTA_BANDS, DeltaBands, delta_for,  # noqa: F401 - re-exported
                       official_delta)

_GRAM_CHUNK_ELEMENTS = 1 << 24  # float64 elements per feature chunk in gram() (128 MiB)


# ----------------------------------------------------------------------------------------------------------------------
# Similarity: linear CKA
# ----------------------------------------------------------------------------------------------------------------------


def gram(x: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram matrix K = X X^T of one block's representation (method.md §2).

    The (n, ...) input is flattened to (n, p) and multiplied in float64, chunk by chunk over the p features on the
    input's device, so no float64 copy of the whole input and no p x p matrix is ever formed. Callers that cannot hold
    every block's hidden states at once can keep only these n x n Grams and pass them to :func:`cka_from_grams`.

    Args:
        x: (n, ...) representation of n examples, e.g. (n, S, d) hidden states of n sequences.

    Returns:
        (n, n) float64 Gram matrix on the CPU.
    """
    if x.ndim < 1:
        raise ValueError("a representation needs a leading example dimension, got a 0-d tensor")
    flat = x.reshape(x.shape[0], -1)  # (n, p)
    n, p = flat.shape
    k = torch.zeros(n, n, dtype=torch.float64, device=flat.device)
    step = max(1, _GRAM_CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, p, step):
        chunk = flat[:, start : start + step].to(torch.float64)  # (n, <=step)
        k += chunk @ chunk.T
    return k.cpu()


def _centre(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/n, computed by subtracting row and column means."""
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()


def cka_from_grams(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """Linear CKA between every pair of blocks, given their (n, n) Gram matrices (method.md §2).

    CKA(l, j) = <K~_l, K~_j>_F / (||K~_l||_F ||K~_j||_F) with K~ = H K H (the biased, normalised HSIC).

    Args:
        grams: L symmetric (n, n) Gram matrices, one per block, all with the same n >= 2.

    Returns:
        (L, L) float64 CPU tensor, symmetric, with values in [0, 1] and ones on the diagonal (up to rounding).

    Raises:
        ValueError: no Grams, n < 2, differing n, non-finite values, or a block whose centred Gram is zero
            (all n examples have the same representation: CKA is undefined).
    """
    if len(grams) == 0:
        raise ValueError("need at least one block")
    shapes = {tuple(g.shape) for g in grams}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or len(set(next(iter(shapes)))) != 1:
        raise ValueError(f"all Grams must be (n, n) with one n (the same examples for all blocks), got {sorted(shapes)}")
    n = grams[0].shape[0]
    if n < 2:
        raise ValueError(f"CKA needs at least 2 examples, got n={n}")
    centred = torch.stack([_centre(g.detach().to("cpu", torch.float64)) for g in grams]).reshape(len(grams), -1)
    if not torch.isfinite(centred).all():
        raise ValueError("representations contain non-finite values")
    inner = centred @ centred.T  # (L, L) Frobenius inner products
    norms = inner.diagonal().sqrt()
    dead = (norms == 0).nonzero().flatten().tolist()
    if dead:
        raise ValueError(f"blocks {dead} give the same representation for all {n} examples: CKA is undefined")
    return inner / (norms[:, None] * norms[None, :])


def linear_cka(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Linear CKA between the representations of every pair of blocks (method.md §2).

    Each ``features[l]`` is flattened to (n, p_l); p may differ between blocks but the n examples must be the same.
    Only n x n matrices are formed (see :func:`gram`); the similarity is invariant to orthogonal transforms and
    isotropic scaling of each representation.

    Args:
        features: L tensors of shape (n, ...), e.g. (n, S, d) inputs of block l on n calibration sequences.

    Returns:
        (L, L) float64 CPU tensor of CKA values (see :func:`cka_from_grams`).

    Raises:
        ValueError: on an empty list, n < 2, differing n, or a degenerate (constant) representation.
    """
    if len(features) == 0:
        raise ValueError("need at least one block")
    ns = [f.shape[0] if f.ndim else None for f in features]
    if len(set(ns)) != 1:
        raise ValueError(f"every block needs the same number of examples n, got {ns}")
    if ns[0] is None or ns[0] < 2:
        raise ValueError(f"CKA needs at least 2 examples, got n={ns[0]}")
    return cka_from_grams([gram(f) for f in features])


def layer_importance(cka: torch.Tensor, beta: float) -> torch.Tensor:
    """Block importance from redundancy: I_l = exp(-beta * S_hat_l) (method.md §2).

    S_l = sum_{j != l} CKA(l, j) is how similar block l is to all others; S_hat_l = S_l / sum_k S_k. A block that
    resembles the others is redundant and gets a lower importance, hence a higher sparsity. When every off-diagonal
    similarity is zero (or L == 1), all blocks are equally redundant and all get exp(-beta / L).

    Args:
        cka: (L, L) similarity matrix, e.g. from :func:`linear_cka`.
        beta: temperature >= 0 (official: 1 with Wanda, 100 with SparseGPT); 0 gives all ones.

    Returns:
        (L,) float64 tensor of importances in (0, 1].
    """
    if cka.ndim != 2 or cka.shape[0] != cka.shape[1] or cka.shape[0] == 0:
        raise ValueError(f"cka must be a non-empty square (L, L) matrix, got shape {tuple(cka.shape)}")
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be finite and >= 0, got {beta}")
    c = cka.detach().to("cpu", torch.float64)
    if not torch.isfinite(c).all():
        raise ValueError("cka contains non-finite values")
    n_blocks = c.shape[0]
    redundancy = c.sum(dim=1) - c.diagonal()  # S_l
    total = redundancy.sum()
    if total > 0:
        share = redundancy / total  # S_hat_l
    else:
        share = torch.full((n_blocks,), 1.0 / n_blocks, dtype=torch.float64)
    return torch.exp(-beta * share)


# ----------------------------------------------------------------------------------------------------------------------
# Rates: the band table and the linear program
# ----------------------------------------------------------------------------------------------------------------------


def _as_importance(importance: torch.Tensor | Sequence[float]) -> list[float]:
    imp = torch.as_tensor(importance, dtype=torch.float64)
    if imp.ndim != 1 or imp.numel() == 0:
        raise ValueError(f"importance must be a non-empty 1-D sequence, got shape {tuple(imp.shape)}")
    if not torch.isfinite(imp).all():
        raise ValueError("importance contains non-finite values")
    return imp.tolist()


def _least_important_first(imp: list[float]) -> list[int]:
    """Block indices by increasing importance; among equals the later block comes first (counts as less important)."""
    return sorted(range(len(imp)), key=lambda i: (imp[i], -i))


def allocate_layer_sparsity(importance: torch.Tensor | Sequence[float], target: float, delta: float,
                            floor: Sequence[float] | None = None) -> list[float]:
    """Per-block sparsity: the exact optimum of the LSR linear program (method.md §2).

    minimise sum_l s_l I_l  subject to  mean(s) = target,  target - delta <= s_l <= target + delta.

    Start every block at the lower bound; the L * delta still needed to reach the mean goes, 2 * delta at a time, to
    the least important blocks first. The optimum is therefore: the floor(L/2) least important blocks at
    target + delta, the median block at target when L is odd, the rest at target - delta. This is optimal because
    moving sparsity from a more to a less important block never raises the objective; among blocks of equal
    importance the later one takes the higher rate.

    The official code solves the same program with scipy's SLSQP started from the infeasible point s = 1 and default
    tolerances: it lands on (or within ~1e-6 of) this vertex, but may split the mass differently between blocks of
    (nearly) equal importance, and may end slightly off the bounds or the mean; it then clips negative rates to 0.

    Args:
        importance: (L,) importances I_l (higher = more important), e.g. from :func:`layer_importance`.
        target: mean sparsity Theta^t in [0, 1).
        delta: band half-width >= 0 (see :func:`delta_for`).
        floor: optional per-block lower bounds added to the program (s_l >= floor_l). DSA passes the sparsity each
            block already has: pruned weights stay pruned (masks are nested), so a rate below it could not be met.
            The same fill, started from max(target - delta, floor_l), is still the exact optimum.

    Returns:
        L rates with mean equal to ``target`` (up to float rounding), each in [target - delta, target + delta], and
        never lower for a less important block than for a more important one.

    Raises:
        ValueError: on empty or non-finite importance, or when [target - delta, target + delta] is not inside [0, 1).
    """
    imp = _as_importance(importance)
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"delta must be finite and >= 0, got {delta}")
    if not (math.isfinite(target) and target - delta >= 0.0 and target + delta < 1.0):
        raise ValueError(f"rate band [{target} - {delta}, {target} + {delta}] must lie in [0, 1); see delta_for()")
    n_blocks = len(imp)
    lower = [target - delta] * n_blocks
    if floor is not None:
        if len(floor) != n_blocks:
            raise ValueError(f"floor has {len(floor)} values for {n_blocks} blocks")
        lower = [max(lo, float(f)) for lo, f in zip(lower, floor)]
        if any(lo > target + delta + 1e-12 for lo in lower) or sum(lower) > n_blocks * target + 1e-9:
            raise ValueError(f"floor {list(floor)} leaves no rates with mean {target} within +-{delta}")
    rates = list(lower)
    budget = n_blocks * target - sum(lower)  # what the mean still needs, given least important blocks first
    for i in _least_important_first(imp):
        if budget <= 0:
            break
        give = min(target + delta - rates[i], budget)
        rates[i] += give
        budget -= give
    return rates


# ----------------------------------------------------------------------------------------------------------------------
# Mixed N:M: one pattern per block
# ----------------------------------------------------------------------------------------------------------------------


def mixed_nm(
    importance: torch.Tensor | Sequence[float],
    target_sparsity: float,
    m: int,
    n_min: int = 1,
    n_max: int | None = None,
    spread: int = 1,
) -> list[Pattern]:
    """One N:M pattern per block (M fixed), more important blocks keeping more weights (method.md §1, Mixed N:M).

    The integer counterpart of :func:`allocate_layer_sparsity`: the N (weights kept per group of M) sum to
    L * M * (1 - target_sparsity) exactly, so the mean sparsity is the target. Every N lies in the band of integers
    within ``spread`` of the mean N_bar = M * (1 - target_sparsity), widened to floor(N_bar) and ceil(N_bar) if needed,
    and clipped to [n_min, n_max]. All blocks start at the band's bottom and the remaining units go to the most
    important blocks first, each up to the band's top (at most one block ends in between).

    ``spread=0`` is the most uniform assignment (every block at N_bar when it is an integer, else floor/ceil). The
    default ``spread=1`` lets blocks move by one: for a mixed 2:8 target of 75% the more important half gets 3:8 and
    the less important half 1:8. Wider spreads move further, as wider deltas do for unstructured rates.

    Args:
        importance: (L,) block importances (higher = more important).
        target_sparsity: mean pruned fraction; L * M * (1 - target_sparsity) must be an integer.
        m: group size M >= 2.
        n_min: smallest N allowed (>= 1).
        n_max: largest N allowed (<= M - 1; default M - 1).
        spread: band half-width in units of N (>= 0).

    Returns:
        L patterns ``Pattern.nm(N_l, m)``.

    Raises:
        ValueError: on bad arguments, a target whose kept total is not an integer (the achievable targets are
            1 - k / (L * M) for integer k), or a mean N outside [n_min, n_max].
    """
    imp = _as_importance(importance)
    n_blocks = len(imp)
    n_max = m - 1 if n_max is None else n_max
    for name, value in (("m", m), ("n_min", n_min), ("n_max", n_max), ("spread", spread)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if m < 2 or not 1 <= n_min <= n_max <= m - 1:
        raise ValueError(f"need M >= 2 and 1 <= n_min <= n_max <= M - 1, got M={m}, n_min={n_min}, n_max={n_max}")
    if spread < 0:
        raise ValueError(f"spread must be >= 0, got {spread}")
    if not (math.isfinite(target_sparsity) and 0.0 <= target_sparsity < 1.0):
        raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
    units = n_blocks * m * (1.0 - target_sparsity)  # total weights kept per group-row, summed over blocks
    total = round(units)
    if abs(units - total) > 1e-9 * max(1.0, units):
        step = 1.0 / (n_blocks * m)
        lo_t, hi_t = 1.0 - math.ceil(units) * step, 1.0 - math.floor(units) * step
        raise ValueError(
            f"target sparsity {target_sparsity} is not reachable with {n_blocks} blocks of M={m}: the mean sparsity is "
            f"1 - k/(L*M) for an integer k, a multiple of 1/{n_blocks * m} = {step:.6g} (nearest: {lo_t:.6g}, {hi_t:.6g})"
        )
    if not n_blocks * n_min <= total <= n_blocks * n_max:
        raise ValueError(
            f"mean N = {total / n_blocks:.4g} (target {target_sparsity}, M={m}) is outside [n_min, n_max] = [{n_min}, {n_max}]"
        )
    floor_n, ceil_n = total // n_blocks, -(-total // n_blocks)
    lo = max(n_min, min(floor_n, -(-(total - spread * n_blocks) // n_blocks)))  # ceil(N_bar - spread), or floor
    hi = min(n_max, max(ceil_n, (total + spread * n_blocks) // n_blocks))  # floor(N_bar + spread), or ceil
    kept = [lo] * n_blocks
    remaining = total - lo * n_blocks
    for i in reversed(_least_important_first(imp)):  # most important first
        give = min(hi - lo, remaining)
        kept[i] += give
        remaining -= give
    assert remaining == 0 and sum(kept) == total
    return [Pattern.nm(k, m) for k in kept]
