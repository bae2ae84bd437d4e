"""Sparsity patterns: unstructured, or N:M with **N the number of weights kept** in every group of M.

N counts kept weights, as the hardware does (NVIDIA's 2:4 keeps 2 of 4). Many research repositories count pruned
weights instead (Wanda's ``prune_n``); for 2:4 both read the same, for 2:8 they do not: here 2:8 keeps 2 of 8 (75%
sparsity). Groups are M consecutive input weights of one output row (method.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern. ``n == m == 0`` means unstructured; otherwise keep ``n`` of every ``m`` inputs of a row."""

    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if (self.n, self.m) == (0, 0):
            return
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 0 < self.n < self.m:
            raise ValueError(f"N:M pattern needs 0 < N < M (N = weights kept per group), got {self.n}:{self.m}")

    @classmethod
    def unstructured(cls) -> Pattern:
        return cls()

    @classmethod
    def nm(cls, n_kept: int, m: int) -> Pattern:
        return cls(n_kept, m)

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        """``"unstructured"`` (or ``""``) or ``"N:M"`` with N kept, e.g. ``"2:4"``."""
        if isinstance(text, Pattern):
            return text
        t = str(text).strip().lower()
        if t in ("", "unstructured", "none"):
            return cls()
        try:
            n, m = (int(x) for x in t.split(":"))
        except ValueError:
            raise ValueError(f"pattern must be 'unstructured' or 'N:M' (N kept of M), got {text!r}") from None
        return cls(n, m)

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (1 - N/M); None when unstructured."""
        return 1.0 - self.n / self.m if self.is_nm else None

    def check_shape(self, in_features: int, where: str = "layer") -> None:
        if self.is_nm and in_features % self.m:
            raise ValueError(f"{where}: in_features={in_features} is not a multiple of M={self.m} for pattern {self}")

    def resolve_sparsity(self, sparsity: float | None) -> float:
        """The sparsity to apply: for N:M the implied one (a given value must agree), else ``sparsity`` in [0, 1)."""
        if self.is_nm:
            if sparsity is not None and abs(sparsity - self.sparsity) > 1e-9:
                raise ValueError(f"sparsity {sparsity} contradicts pattern {self} (which prunes {self.sparsity:.4g})")
            return self.sparsity
        if sparsity is None or not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        return float(sparsity)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"
