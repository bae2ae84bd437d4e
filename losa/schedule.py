"""Schedules of dynamic sparse adaptation (DSA, method.md §4): the target sparsity and mean rank at each step t, and
the half-width delta of LSR's rate band around a step's target (method.md §2).

Pure arithmetic on numbers: it must not touch a model, read or write files, or import orchestration or tracking code.
Steps are numbered t = 1..T as in method.md.
"""

from __future__ import annotations

import math


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


def _check_target(target: float) -> float:
    if not (math.isfinite(target) and 0.0 <= target < 1.0):
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    return float(target)


def cubic_sparsity(target: float, t: int, T: int) -> float:
    """Target sparsity of step t: Theta^t = Theta - Theta * (1 - t/T)^3 (method.md §4).

    It rises quickly at first and flattens towards Theta, which step T reaches exactly. With T = 1 it is Theta.

    Args:
        target: final sparsity Theta in [0, 1).
        t: step, 1 <= t <= T.
        T: number of steps (>= 1; paper: 5).

    Returns:
        Theta^t in [0, Theta], strictly increasing in t when Theta > 0.

    Raises:
        ValueError: on T < 1, t outside 1..T, non-int steps, or a target outside [0, 1).
    """
    _check_int("t", t)
    _check_int("T", T)
    target = _check_target(target)
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if not 1 <= t <= T:
        raise ValueError(f"step t must be in 1..{T}, got {t}")
    return target - target * (1.0 - t / T) ** 3


def sparsity_schedule(target: float, T: int) -> list[float]:
    """[Theta^1, ..., Theta^T] of :func:`cubic_sparsity` (method.md §4)."""
    _check_int("T", T)
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    return [cubic_sparsity(target, t, T) for t in range(1, T + 1)]


def mean_rank(t: int, omega1: int = 6, delta_omega: int = 1) -> int:
    """Mean LoRA rank of step t: Omega^t = Omega^1 + (t - 1) * delta_omega (method.md §4; official Omega^1 = 6, +1).

    Args:
        t: step, >= 1.
        omega1: mean rank of step 1 (>= 1).
        delta_omega: increase per step (>= 0).

    Raises:
        ValueError: on non-int arguments, t < 1, omega1 < 1 or delta_omega < 0.
    """
    for name, value in (("t", t), ("omega1", omega1), ("delta_omega", delta_omega)):
        _check_int(name, value)
    if t < 1 or omega1 < 1 or delta_omega < 0:
        raise ValueError(f"need t >= 1, omega1 >= 1, delta_omega >= 0, got {t=}, {omega1=}, {delta_omega=}")
    return omega1 + (t - 1) * delta_omega


# ---------------------------------------------------------------------------------------- LSR band half-width

DeltaBands = tuple[tuple[float, float], ...]
"""A band table: ``(upper_target, delta)`` pairs sorted by ``upper_target``; a target uses the first band it fits."""

OFFICIAL_DELTA_BANDS: DeltaBands = ((0.5, 0.01), (0.6, 0.02), (0.7, 0.03))
"""The official code's delta: 0.01 for targets <= 0.5, 0.02 for <= 0.6, 0.03 for <= 0.7, none above (method.md §2)."""

DEFAULT_DELTA_BANDS: DeltaBands = OFFICIAL_DELTA_BANDS + ((1.0, 0.03),)
"""The official bands plus 0.03 for targets in (0.7, 1).

The official code sets delta only up to 0.7. Above it, it reuses whatever delta an earlier DSA step left in its
``args`` (0.03 whenever an earlier step's target was in (0.6, 0.7], as with the cubic schedule at 0.8, T = 5) and
crashes with an AttributeError when no earlier step set one (e.g. T = 1 at 0.8). The extension makes that effective
0.03 explicit; pass another table to change it.
"""


def _check_bands(bands: DeltaBands) -> None:
    if len(bands) == 0:
        raise ValueError("delta band table is empty")
    uppers = [u for u, _ in bands]
    if any(b <= a for a, b in zip(uppers, uppers[1:])):
        raise ValueError(f"delta bands must have strictly increasing upper targets, got {list(bands)}")
    if any(not (math.isfinite(d) and d >= 0) for _, d in bands):
        raise ValueError(f"delta band widths must be finite and >= 0, got {list(bands)}")


def official_delta(target: float) -> float:
    """The official code's delta for a target, read from :data:`OFFICIAL_DELTA_BANDS` without clipping.

    Raises:
        ValueError: for a target outside [0, 0.7], where the official code defines no delta.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    for upper, delta in OFFICIAL_DELTA_BANDS:
        if target <= upper:
            return delta
    raise ValueError(f"the official code defines no delta above {OFFICIAL_DELTA_BANDS[-1][0]}, got target {target}")


def delta_for(target: float, bands: DeltaBands = DEFAULT_DELTA_BANDS) -> float:
    """Half-width delta of the rate band around ``target`` (method.md §2).

    The first band with ``target <= upper`` gives delta; it is then clipped to ``min(delta, target, (1 - target)/2)``
    so that every rate stays in [0, 1) (a target of 0.005 gets 0.005, not 0.01; a target of 0.98 gets 0.01). The clip
    never bites for the official range 0.03 <= target <= 0.7. Where it bites, the official code would instead produce
    negative rates and then raise them to 0, which changes the mean.

    Args:
        target: mean sparsity Theta^t in [0, 1).
        bands: ``(upper_target, delta)`` pairs sorted by upper target (default :data:`DEFAULT_DELTA_BANDS`).

    Returns:
        delta >= 0.

    Raises:
        ValueError: on a target outside [0, 1), a malformed table, or a target above every band.
    """
    _check_bands(bands)
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    for upper, delta in bands:
        if target <= upper:
            return min(delta, target, (1.0 - target) / 2.0)
    raise ValueError(f"no delta band covers target {target}: the table stops at {bands[-1][0]} ({list(bands)})")
