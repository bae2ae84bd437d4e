"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with lazy batched updates (method.md §1). Pure rule.

Follows IST-DASLab/sparsegpt ``fasterprune``: block size 128, dampening ``percdamp * mean(diag H)``, the mask of a
block chosen by w^2 / [H^-1]_jj^2 before the block's column sweep, N:M groups chosen inside the sweep, dead inputs
(H_jj = 0) given H_jj = 1 and zero weights. Differences: N counts kept weights (see :mod:`losa.patterns`); the block
mask keeps exactly round((1 - s) * size) weights (the reference prunes one extra at the threshold); a failed Cholesky is
retried with 10x the damping instead of crashing.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..patterns import Pattern
from ._select import select_mask

MAX_CHOLESKY_RETRIES = 4
SINGLE_THREAD_BELOW = 1 << 20  # elements per column update under which one thread is faster than a team


@contextmanager
def _sweep_threads(update_elements: int):
    """Run the column sweep on one CPU thread when its per-column updates are small.

    The sweep issues a few tiny ops per column (d_in columns per layer); with a thread team each op pays a
    fork/join, and on a busy machine a spinning team is 5-10x slower than one thread (measured on SmolLM2's
    1536 x 576 layers). Large layers (a 7B model's 11008-row updates) keep the team; CUDA is unaffected.
    """
    before = torch.get_num_threads()
    if update_elements < SINGLE_THREAD_BELOW and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float, stats: dict | None) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, retrying with 10x the damping when H + damp I is not positive definite."""
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    damp = percdamp * torch.mean(torch.diag(hessian))
    for attempt in range(MAX_CHOLESKY_RETRIES + 1):
        h = hessian.clone()
        h[diag, diag] += damp
        chol, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            chol_inv, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                if stats is not None:
                    stats["cholesky_retries"] = stats.get("cholesky_retries", 0) + attempt
                    stats["damp"] = float(damp)
                return chol_inv
        damp = damp * 10 if damp > 0 else torch.tensor(1e-6, device=hessian.device)
    raise torch.linalg.LinAlgError(f"Cholesky failed after {MAX_CHOLESKY_RETRIES} retries with 10x damping each")


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None,
    pattern: Pattern = Pattern(),
    blocksize: int = 128,
    percdamp: float = 0.01,
    stats: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` with SparseGPT and update the kept weights to compensate.

    Args:
        weight: (d_out, d_in) weight (any float dtype; computed in fp32).
        hessian: (d_in, d_in) H = 2 X X^T / n over calibration tokens (fp32).
        sparsity: fraction pruned (implied by an N:M pattern).
        pattern: unstructured or N:M (N kept of every M consecutive inputs).
        blocksize: columns per lazy-update block (128 as the paper).
        percdamp: dampening as a fraction of mean(diag H).
        stats: optional dict that receives ``cholesky_retries`` (added to any value present) and ``damp``.

    Returns:
        (new_weight, mask): the updated weight in ``weight``'s dtype, exactly zero where ``mask`` (True = kept) is False.
    """
    sparsity = pattern.resolve_sparsity(sparsity)
    d_out, d_in = weight.shape
    pattern.check_shape(d_in)
    if hessian.shape != (d_in, d_in):
        raise ValueError(f"hessian must be ({d_in}, {d_in}), got {tuple(hessian.shape)}")
    if pattern.is_nm and blocksize % pattern.m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={pattern.m}")
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _inverse_cholesky(H, percdamp, stats)
    keep = torch.zeros_like(W, dtype=torch.bool)

    with _sweep_threads(d_out * blocksize):
        for i1 in range(0, d_in, blocksize):
            i2 = min(i1 + blocksize, d_in)
            # the sweep walks columns: keep them as contiguous rows (W1t[i] is column i1 + i of W)
            W1t = W[:, i1:i2].T.contiguous()  # (B, d_out)
            Err1t = torch.zeros_like(W1t)
            Hinv1 = Hinv[i1:i2, i1:i2]
            hdiag = torch.diag(Hinv1)
            if pattern.is_nm:
                keep1t = torch.zeros_like(W1t, dtype=torch.bool)  # filled group by group inside the sweep
            else:
                keep1t = select_mask((W1t**2 / hdiag[:, None] ** 2).T, sparsity, pattern, per="matrix").T.contiguous()
            kept = keep1t.to(W1t.dtype)
            for i in range(i2 - i1):
                if pattern.is_nm and i % pattern.m == 0:
                    # the group's mask uses the weights as updated by the sweep so far
                    score = W1t[i : i + pattern.m] ** 2 / hdiag[i : i + pattern.m, None] ** 2
                    keep1t[i : i + pattern.m] = select_mask(score.T, None, pattern).T
                    kept[i : i + pattern.m] = keep1t[i : i + pattern.m].to(W1t.dtype)
                w = W1t[i]
                err = (w - w * kept[i]) / Hinv1[i, i]  # (w - q) / d with q = w kept, 0 pruned: bit for bit
                W1t[i:] -= torch.outer(Hinv1[i, i:], err)
                Err1t[i] = err
            # a kept column ends as its updated value (its own err is 0), a pruned one is zeroed
            W[:, i1:i2] = (W1t * kept).T
            keep[:, i1:i2] = keep1t.T
            W[:, i2:] -= Err1t.T @ Hinv[i1:i2, i2:]

    W[~keep] = 0  # exact zeros whatever the arithmetic above did
    return W.to(weight.dtype), keep
