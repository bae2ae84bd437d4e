"""Typed settings of one LoSA cell: method, pruner, target, ablations, budgets (method.md §2–§5). Pure data.

Field names are the YAML keys of the experiment grids and the flattened MLflow parameter names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .patterns import Pattern
from .schedule import DEFAULT_DELTA_BANDS, delta_for

Method = Literal["dense", "pruned", "lora", "losa"]
Ablation = Literal["lsr", "sra", "dsa"]


class FinetuneConfig(BaseModel):
    """Optimisation settings of one fine-tuning run (official LoSA defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.3, ge=0, le=1)
    weight_decay: float = Field(0.001, ge=0)
    max_grad_norm: float = Field(0.3, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    seqlen: int = Field(256, ge=2)
    optimizer: str = "auto"  # "auto": paged 8-bit AdamW on CUDA when bitsandbytes is installed, else torch AdamW


DEFAULT_BETA = {"wanda": 1.0, "sparsegpt": 100.0, "magnitude": 1.0}  # official: 1 with Wanda, 100 with SparseGPT


class LosaConfig(BaseModel):
    """One configuration of :func:`losa.run_losa`.

    ``method``: ``dense`` (evaluate only), ``pruned`` (uniform one-shot pruning), ``lora`` (pruned + standard
    unmasked LoRA of uniform rank), ``losa`` (the T-step dynamic loop). ``ablate`` removes LSR (uniform rates), SRA
    (uniform rank Ω^t) or DSA (T = 1) from ``losa``.

    ``pattern``: ``"unstructured"``, ``"N:M"`` (uniform, N kept) or ``"mixed-N:M"`` (each block its own N' of M with
    mean N'/M = N/M, more important blocks keeping more; method.md §1).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = "losa"
    pruner: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    sparsity: float = Field(0.7, ge=0.0, lt=1.0)
    pattern: str = "unstructured"
    ablate: tuple[Ablation, ...] = ()
    steps: int = Field(5, ge=1)  # T
    seed: int = 0

    # calibration (method.md §1)
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(256, ge=2)
    calib_batch_size: int = Field(16, ge=1)
    propagation: Literal["pruned", "dense"] = "pruned"

    # LSR (method.md §2)
    rmi_samples: int = Field(64, ge=2)
    beta: float | None = None  # None: DEFAULT_BETA[pruner]
    delta_bands: tuple[tuple[float, float], ...] = DEFAULT_DELTA_BANDS
    mixed_spread: int = Field(1, ge=0)

    # SRA and the adapter (method.md §3, §4)
    omega1: int = Field(6, ge=1)
    delta_omega: int = Field(1, ge=0)
    r_min: int = Field(1, ge=1)
    r_max: int = Field(16, ge=1)
    physical_rank: int = Field(8, ge=1)  # 8 reproduces the official code (ranks above 8 silently become 8)
    clip_to_physical: bool = True  # official behaviour; False raises when an allocated rank exceeds physical_rank
    lora_rank: int = Field(8, ge=1)  # the plain-LoRA baseline
    lora_alpha: float = 16.0
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)

    # fine-tuning (method.md §4 step 7)
    finetune: FinetuneConfig = FinetuneConfig()
    train_data: Literal["text", "alpaca"] = "text"  # plain LM text suits the testbed; alpaca as the official code
    train_steps: int = Field(40, ge=1)  # optimiser steps per DSA step 1..T-1 (text data)
    final_train_steps: int = Field(120, ge=1)  # optimiser steps at step T (and for the LoRA baseline)
    alpaca_per_step: int = Field(1000, ge=1)  # official: 1,000 examples per step, the rest of 10,000 at step T
    alpaca_total: int = Field(10_000, ge=1)
    alpaca_max_len: int = Field(512, ge=8)

    # evaluation (method.md §6)
    eval_seqlen: int = Field(256, ge=2)
    eval_batch_size: int = Field(8, ge=1)
    eval_windows: int | None = None

    @model_validator(mode="after")
    def _check(self) -> LosaConfig:
        kind, nm = self.parsed_pattern()
        if nm.is_nm and abs(nm.sparsity - self.sparsity) > 1e-9:
            raise ValueError(f"pattern {self.pattern} implies sparsity {nm.sparsity:g}, but sparsity={self.sparsity}")
        if self.ablate and self.method != "losa":
            raise ValueError(f"ablate={list(self.ablate)} only applies to method 'losa', not {self.method!r}")
        if len(set(self.ablate)) != len(self.ablate):
            raise ValueError(f"ablate lists a component twice: {list(self.ablate)}")
        if not self.r_min <= self.r_max:
            raise ValueError(f"need r_min <= r_max, got {self.r_min} > {self.r_max}")
        if self.method == "losa" and kind == "unstructured":
            delta_for(self.sparsity, self.delta_bands)  # raises when no band covers the target
        return self

    def parsed_pattern(self) -> tuple[str, Pattern]:
        """(``"unstructured"`` | ``"nm"`` | ``"mixed"``, the base pattern)."""
        text = self.pattern.strip().lower()
        if text.startswith("mixed-"):
            return "mixed", Pattern.parse(text[len("mixed-"):])
        p = Pattern.parse(text)
        return ("nm" if p.is_nm else "unstructured"), p

    @property
    def effective_steps(self) -> int:
        """Pruning steps actually run: T for LoSA, 1 under −DSA and for the one-shot baselines."""
        return self.steps if self.method == "losa" and "dsa" not in self.ablate else 1

    @property
    def effective_beta(self) -> float:
        return DEFAULT_BETA[self.pruner] if self.beta is None else self.beta
