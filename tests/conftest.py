"""Shared test setup: offline Hugging Face, and tiny random-init models of every supported family.

The builders live in ``tests/tiny_models.py``; this file puts ``tests/`` on ``sys.path`` so test modules can
``from tiny_models import ...``, and exposes them as fixtures.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as flows/__init__.py: no spinning threads on a shared machine

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_models import BUILDERS, calibration_ids  # noqa: E402

# tiny tensors: one thread is much faster than several (OpenMP spin-waits, especially on a busy machine)
torch.set_num_threads(1)


@pytest.fixture(params=sorted(BUILDERS))
def tiny_family(request):
    """(name, model) for every tiny family: llama, llama_gqa, mistral, qwen2, opt."""
    return request.param, BUILDERS[request.param]()


@pytest.fixture
def calib8():
    """(8, 16) random token ids: 8 calibration windows of 16 tokens."""
    return calibration_ids(8, 16)
