"""losa: LoSA (Dynamic Low-Rank Sparse Adaptation, ICLR 2025) as a plain torch/transformers/peft library.

The method only: no orchestration, no tracking, no file writes outside explicit save functions.
"""

from .calibration import PruneReport, prune_model
from .dsa import LosaReport, run_losa
from .models import get_adapter, load_model
from .patterns import Pattern

# Bump when a change in the library changes results (the orchestration layer keys its caches on it).
METHOD_VERSION = "0.1.0"

__all__ = ["METHOD_VERSION", "LosaReport", "Pattern", "PruneReport", "get_adapter", "load_model", "prune_model",
           "run_losa"]
