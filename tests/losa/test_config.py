"""LosaConfig rejects contradictions before any compute."""

import pytest
from pydantic import ValidationError

from losa.config import LosaConfig


def test_defaults_are_the_official_settings():
    cfg = LosaConfig()
    assert (cfg.steps, cfg.omega1, cfg.delta_omega, cfg.physical_rank, cfg.r_min, cfg.r_max) == (5, 6, 1, 8, 1, 16)
    assert (cfg.finetune.lr, cfg.finetune.warmup_ratio, cfg.finetune.weight_decay, cfg.finetune.max_grad_norm) == \
        (2e-4, 0.3, 0.001, 0.3)
    assert (cfg.lora_alpha, cfg.lora_dropout) == (16.0, 0.1)
    assert cfg.effective_beta == 1.0 and LosaConfig(pruner="sparsegpt").effective_beta == 100.0


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, "less than 1"),
    ({"pattern": "2:4", "sparsity": 0.7}, "implies sparsity 0.5"),
    ({"method": "pruned", "ablate": ("lsr",)}, "only applies to method 'losa'"),
    ({"ablate": ("lsr", "lsr")}, "twice"),
    ({"r_min": 9, "r_max": 4}, "r_min <= r_max"),
    ({"ablate": ("foo",)}, "lsr"),
    ({"unknown_field": 1}, "Extra inputs"),
    ({"pattern": "4:4", "sparsity": 0.0}, "0 < N < M"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        LosaConfig(**kwargs)


def test_patterns_and_ablation_views():
    assert LosaConfig(pattern="mixed-2:8", sparsity=0.75).parsed_pattern()[0] == "mixed"
    assert LosaConfig(pattern="2:4", sparsity=0.5).parsed_pattern()[1].n == 2
    assert LosaConfig(ablate=("dsa",), steps=5).effective_steps == 1
    assert LosaConfig(sparsity=0.8).sparsity == 0.8  # above the official 0.7 band table: covered, no crash


def test_one_vocabulary():
    from losa.config import ABLATIONS, LABELS, METHODS, PRUNERS
    from losa.pruners import METHODS as PRUNER_REGISTRY

    assert set(PRUNERS) == set(PRUNER_REGISTRY)  # every configurable pruner is implemented, and no other
    assert METHODS == tuple(LABELS) and ABLATIONS == ("lsr", "sra", "dsa")


def test_canonical_cells():
    from losa.config import LosaConfig, SettingsConflict

    dense = LosaConfig.canonical({"method": "dense", "pruner": "sparsegpt", "pattern": "2:4", "steps": 4})
    assert dense == LosaConfig.canonical({"method": "dense"}) and (dense.sparsity, dense.steps) == (0.0, 1)
    assert LosaConfig.canonical({"method": "pruned", "steps": 5}).steps == 1
    assert LosaConfig.canonical({"method": "lora", "pattern": "mixed-2:4"}).pattern == "2:4"
    assert LosaConfig.canonical({"method": "losa", "pattern": " 2:4 "}).sparsity == 0.5
    assert LosaConfig.canonical({"ablate": ["dsa", "lsr"]}).label == "-LSR-DSA"
    with pytest.raises(SettingsConflict, match="implies sparsity 0.5"):
        LosaConfig.canonical({"pattern": "2:4", "sparsity": 0.7})
