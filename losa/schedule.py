"""Schedules of dynamic sparse adaptation (DSA, method.md §4): the target sparsity and mean rank at each step t.

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
