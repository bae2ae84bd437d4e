"""Typed settings of one LoSA cell: method, pruner, target, ablations, budgets (method.md §2–§5). Pure data.

Field names are the YAML keys of the experiment grids and the flattened MLflow parameter names. The project's
vocabulary (methods, pruners, ablations and their order, row labels, patterns) is defined here once, by the
``Literal`` types of :class:`LosaConfig`; the CLI, the grid files and the tables derive theirs from it. So does the
canonical form of a cell (:meth:`LosaConfig.canonical`). No torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .patterns import Pattern
from .schedule import DEFAULT_DELTA_BANDS, delta_for

Method = Literal["dense", "pruned", "lora", "losa"]
Pruner = Literal["magnitude", "wanda", "sparsegpt"]
Ablation = Literal["lsr", "sra", "dsa"]
Propagation = Literal["pruned", "dense"]
TrainData = Literal["text", "alpaca"]

METHODS: tuple[str, ...] = get_args(Method)
PRUNERS: tuple[str, ...] = get_args(Pruner)
ABLATIONS: tuple[str, ...] = get_args(Ablation)  # also the order of a combined ablation ("-LSR-SRA")
LABELS = {"dense": "dense", "pruned": "pruned", "lora": "+LoRA", "losa": "+LoSA"}  # table row label per method
PATTERNS = "'unstructured', 'N:M' with 0 < N < M (N weights kept of every M, e.g. '2:4'), 'mixed-N:M'"
DENSE_IGNORES = ("pruner", "pattern", "ablate")  # a dense cell resets these to their defaults (plus sparsity 0, T 1)


def label(method: str, ablate: tuple[str, ...] | list[str] = ()) -> str:
    """Table row label: ``dense``, ``pruned``, ``+LoRA``, ``+LoSA``, or LoSA's ablations (``-LSR``, ``-LSR-SRA``)."""
    if method == "losa" and ablate:
        return "".join(f"-{a.upper()}" for a in sorted(ablate, key=ablation_rank))
    return LABELS[method]


def ablation_rank(ablation: str) -> int:
    """Position of an ablation in :data:`ABLATIONS` (unknown ones last)."""
    return ABLATIONS.index(ablation) if ablation in ABLATIONS else len(ABLATIONS)


def parse_pattern(text: str) -> tuple[str, Pattern]:
    """(``"unstructured"`` | ``"nm"`` | ``"mixed"``, the base pattern) of a pattern setting.

    Raises:
        ValueError: not one of :data:`PATTERNS`.
    """
    t = str(text).strip().lower()
    if t.startswith("mixed-"):
        p = Pattern.parse(t[len("mixed-"):])
        if not p.is_nm:
            raise ValueError(f"mixed patterns need an N:M base, got {text!r}")
        return "mixed", p
    p = Pattern.parse(t)
    return ("nm" if p.is_nm else "unstructured"), p


def canonical_pattern(text: str) -> str:
    """The one spelling of a pattern (``"2:4"``, ``"mixed-2:4"``, ``"unstructured"``); raises like :func:`parse_pattern`."""
    kind, p = parse_pattern(text)
    return f"mixed-{p}" if kind == "mixed" else str(p)


class SettingsConflict(ValueError):
    """Two settings of a cell contradict each other: ``keys`` names them, ``reason`` says why."""

    def __init__(self, keys: tuple[str, ...], values: tuple, reason: str):
        super().__init__(" contradicts ".join(f"{k} = {v!r}" for k, v in zip(keys, values)) + f", {reason}")
        self.keys, self.values, self.reason = keys, values, reason


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


ZeroShotTask = Literal["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa"]
ZEROSHOT_TASKS: tuple[str, ...] = get_args(ZeroShotTask)
PAPER_TASKS: tuple[str, ...] = ZEROSHOT_TASKS[:7]  # the paper's Table 2 (Wanda's protocol); PIQA is extra
Engine = Literal["torch", "csr", "onnxruntime", "deepsparse", "cuda", "cuda_2:4"]
ENGINES: tuple[str, ...] = get_args(Engine)
EVALUATIONS = ("zeroshot", "export", "speed")  # optional stages after the final model: unset, not in a cell's identity


class ZeroShotConfig(BaseModel):
    """The zero-shot stage (method.md §6): lm-eval tasks, documents per task (None: all), batch, task source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: tuple[ZeroShotTask, ...] = Field(PAPER_TASKS, min_length=1)
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    source: Literal["local", "hub"] = "local"  # hub: lm-eval's standard tasks and their hub data (online only)


class ExportConfig(BaseModel):
    """The export stage (method.md §6): the final model's compact sparse form, in ``dtype``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Literal["float16", "bfloat16", "float32"] = "float16"


class SpeedConfig(BaseModel):
    """The speed stage (method.md §6): prefill of ``prefill`` tokens and ``decode`` single-token steps after it, the
    median of ``repeats`` runs, on each engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill: int = Field(512, ge=1)
    decode: int = Field(16, ge=1)
    repeats: int = Field(3, ge=1)
    engines: tuple[Engine, ...] = Field(("torch", "csr", "onnxruntime"), min_length=1)
    threads: int | None = Field(None, ge=1)  # None: torch's default


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
    pruner: Pruner = "wanda"
    sparsity: float = Field(0.7, ge=0.0, lt=1.0)
    pattern: str = "unstructured"
    ablate: tuple[Ablation, ...] = ()
    steps: int = Field(5, ge=1)  # T
    seed: int = 0

    # calibration (method.md §1)
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(256, ge=2)
    calib_batch_size: int = Field(16, ge=1)
    propagation: Propagation = "pruned"

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
    train_data: TrainData = "text"  # plain LM text suits the testbed; alpaca as the official code
    train_steps: int = Field(40, ge=1)  # optimiser steps per DSA step 1..T-1 (text data)
    final_train_steps: int = Field(120, ge=1)  # optimiser steps at step T (and for the LoRA baseline)
    alpaca_per_step: int = Field(1000, ge=1)  # official: 1,000 examples per step, the rest of 10,000 at step T
    alpaca_total: int = Field(10_000, ge=1)
    alpaca_max_len: int = Field(512, ge=8)

    # evaluation (method.md §6)
    eval_seqlen: int = Field(256, ge=2)
    eval_batch_size: int = Field(8, ge=1)
    eval_windows: int | None = Field(None, ge=1)
    # optional stages on the final model (method.md §6); None: not run
    zeroshot: ZeroShotConfig | None = None
    export: ExportConfig | None = None
    speed: SpeedConfig | None = None

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"got the number {value}; quote N:M patterns (YAML reads an unquoted 2:4 as the base-60 "
                             f"number 124); allowed: {PATTERNS}")
        if not isinstance(value, str):
            raise ValueError(f"must be a string; allowed: {PATTERNS}")
        try:
            return canonical_pattern(value)
        except ValueError as err:
            raise ValueError(f"{err}; allowed: {PATTERNS}") from None

    @model_validator(mode="after")
    def _check(self) -> LosaConfig:
        kind, nm = self.parsed_pattern()
        if nm.is_nm and abs(nm.sparsity - self.sparsity) > 1e-9:
            raise ValueError(f"pattern {self.pattern} implies sparsity {nm.sparsity:g}, but sparsity={self.sparsity}")
        if self.ablate and self.method != "losa":
            raise ValueError(f"ablate={list(self.ablate)} only applies to method 'losa', not {self.method!r}")
        if len(set(self.ablate)) != len(self.ablate):
            raise ValueError(f"ablate lists a component twice: {list(self.ablate)}")
        # the default (64) is cut to nsamples; an explicit value above it is a mistake worth naming
        if "rmi_samples" in self.model_fields_set and self.rmi_samples > self.nsamples:
            raise ValueError(f"rmi_samples ({self.rmi_samples}) cannot exceed nsamples ({self.nsamples}): LSR's CKA "
                             "runs on a subset of the calibration windows")
        if not self.r_min <= self.r_max:
            raise ValueError(f"need r_min <= r_max, got {self.r_min} > {self.r_max}")
        if self.method == "losa" and kind == "unstructured":
            delta_for(self.sparsity, self.delta_bands)  # raises when no band covers the target
        return self

    @classmethod
    def canonical(cls, settings: Mapping[str, Any]) -> LosaConfig:
        """The one config that equal experiments share (so they get one id and one cache entry), validated once.

        - ``dense`` evaluates only: pruner, pattern and ablate go back to their defaults, sparsity 0, steps 1.
        - N:M and mixed N:M patterns fix the sparsity (1 - N/M); a different explicit sparsity is an error.
        - ``pruned`` and ``lora`` never ablate; ``pruned`` has one step. ``lora`` keeps ``steps``: with text data its
          training budget is that of a T-step LoSA run (losa/stages.py). Both baselines prune uniformly, so
          ``mixed-N:M`` becomes ``N:M`` for them.
        - Ablations are listed in the order of :data:`ABLATIONS`.

        Raises:
            SettingsConflict: an explicit sparsity contradicts the pattern.
            pydantic.ValidationError: a setting is not allowed (the one validation of the cell).
        """
        return cls(**cls.canonical_settings(settings))

    @classmethod
    def canonical_settings(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`canonical`'s settings before validation (values it cannot read are left for validation)."""
        s = dict(settings)
        method = s.get("method", cls.model_fields["method"].default)
        if method == "dense":
            for key in DENSE_IGNORES:
                s.pop(key, None)
            s["sparsity"], s["steps"] = 0.0, 1
            return s
        try:
            kind, p = parse_pattern(s.get("pattern", "unstructured")) if isinstance(s.get("pattern", ""), str) \
                else (None, Pattern())
        except ValueError:
            kind, p = None, Pattern()
        if p.is_nm:
            sparsity = s.get("sparsity")
            if isinstance(sparsity, (int, float)) and abs(sparsity - p.sparsity) > 1e-9:
                raise SettingsConflict(("sparsity", "pattern"), (sparsity, s["pattern"]),
                                       f"which implies sparsity {p.sparsity:g}; drop the sparsity for N:M cells")
            s["sparsity"] = p.sparsity
        if method in ("pruned", "lora"):
            s["ablate"] = ()
            if kind == "mixed":
                s["pattern"] = str(p)
            if method == "pruned":
                s["steps"] = 1
        elif isinstance(s.get("ablate", ()), (list, tuple)):
            s["ablate"] = tuple(sorted(s.get("ablate", ()), key=lambda a: ablation_rank(str(a))))
        return s

    def identity(self) -> dict[str, Any]:
        """The config as JSON data, without the optional evaluation stages that are not set: what names a cell (its
        id and MLflow key), so adding these stages to the code changed no existing cell."""
        dump = self.model_dump(mode="json")
        return {k: v for k, v in dump.items() if not (k in EVALUATIONS and v is None)}

    def parsed_pattern(self) -> tuple[str, Pattern]:
        """(``"unstructured"`` | ``"nm"`` | ``"mixed"``, the base pattern)."""
        return parse_pattern(self.pattern)

    @property
    def label(self) -> str:
        """Table row label (:func:`label`)."""
        return label(self.method, self.ablate)

    @property
    def effective_steps(self) -> int:
        """Pruning steps actually run: T for LoSA, 1 under −DSA and for the one-shot baselines."""
        return self.steps if self.method == "losa" and "dsa" not in self.ablate else 1

    @property
    def effective_beta(self) -> float:
        return DEFAULT_BETA[self.pruner] if self.beta is None else self.beta
