"""losa: LoSA (Dynamic Low-Rank Sparse Adaptation, ICLR 2025) as a plain torch/transformers/peft library.

The method only: no orchestration, no tracking, no file writes outside explicit save functions. The names below are
imported on first use, so ``from losa.patterns import Pattern`` or ``from losa.config import LosaConfig`` stays light
(no torch, no peft).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Bump when a change in the library changes results (the orchestration layer keys its caches on it).
METHOD_VERSION = "0.1.0"

_LAZY = {"LosaReport": "dsa", "run_losa": "dsa", "get_adapter": "models", "load_model": "models",
         "Pattern": "patterns", "PruneReport": "calibration", "prune_model": "calibration"}

if TYPE_CHECKING:
    from .calibration import PruneReport, prune_model
    from .dsa import LosaReport, run_losa
    from .models import get_adapter, load_model
    from .patterns import Pattern


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHOD_VERSION", "LosaReport", "Pattern", "PruneReport", "get_adapter", "load_model", "prune_model",
           "run_losa"]
