"""The LoSA entry point: baselines, the T-step dynamic sparse adaptation loop (DSA, method.md §4), and its report.

One function, :func:`run_losa`, runs every method of a comparison table (``LosaConfig.method``): dense, pruned
only, pruned + standard LoRA, and LoSA with its ablations. No I/O besides reading the shipped data; the report is a
plain dataclass that the orchestration layer logs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from . import data
from .calibration import PruneReport
from .config import LosaConfig
from .layer_sparsity import allocate_layer_sparsity, delta_for, mixed_nm
from .patterns import Pattern
from .rank_allocation import allocate_ranks
from .schedule import cubic_sparsity, mean_rank
from .stages import LocalStages, MergeVerificationError, Stages, overall_sparsity

__all__ = ["run_losa", "drive", "evaluate", "LosaReport", "StepRecord", "MergeVerificationError", "verify_final_sparsity"]


@dataclass
class StepRecord:
    """What one DSA step t decided and measured (method.md §4)."""

    t: int
    theta: float  # Θ^t
    omega: int  # Ω^t
    cka: list[list[float]] | None  # LSR inputs/outputs (None under −LSR)
    importance: list[float] | None
    rates: list[float]  # s^t_l per block
    patterns: list[str]
    errors: list[float]  # L_l against the dense outputs (method.md §3)
    ranks: list[int]  # r^t_l requested by SRA (or uniform Ω^t under −SRA)
    applied_ranks: list[int]  # after the physical-rank cut
    achieved_sparsity: float
    train_losses: list[float]
    timings: dict[str, float]


@dataclass
class LosaReport:
    """Everything a cell produces; ``to_dict`` is JSON-ready."""

    config: dict
    steps: list[StepRecord] = field(default_factory=list)
    ppl: float | None = None  # final model (merged, for LoRA baselines too)
    ppl_unmerged: float | None = None  # plain-LoRA baseline: adapter kept separate (dense update)
    ppl_pruned: float | None = None  # after pruning, before any fine-tuning (pruned / lora / losa −DSA)
    sparsity: float = 0.0  # achieved over prunable linears of the final model
    layer_sparsity: dict[str, float] = field(default_factory=dict)  # "block.name" -> achieved
    sparsity_before_merge: float | None = None  # plain-LoRA baseline: sparsity before its (dense) merge
    trainable_params: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    # optional stages on the final model (config.zeroshot / export / speed): None when not run
    zeroshot: dict | None = None  # task -> lm-eval's acc, acc_stderr, acc_norm, ...; "mean"
    export: dict | None = None  # the sparse form's byte counts (losa.export.describe)
    speed: dict | None = None  # latencies per engine and speed-ups (losa.speed.measure)

    def to_dict(self) -> dict:
        return asdict(self)


def _step_plan(cfg: LosaConfig, theta: float, importance: torch.Tensor | None, final_n: list[int] | None,
               n_blocks: int, floor: list[float] | None) -> tuple[list, list[Pattern]]:
    """Per-block (rates, patterns) of one pruning step at mean sparsity Θ^t.

    Unstructured: LSR's rates (method.md §2) with each block's current sparsity as a floor (its pruned weights stay
    pruned), or Θ^t everywhere under −LSR. N:M and mixed N:M (method.md §1): block
    l ends at N_l kept of M (uniform N, or mixed N_l fixed from step 1's importance); step t keeps
    N^t_l = N_l + round((M − N_l)(1 − Θ^t/Θ)), never more than the step before, so masks stay nested and every group
    holds exactly N^t_l weights (N^t_l = M: no pruning yet).
    """
    if final_n is None:
        if importance is None:
            return [theta] * n_blocks, [Pattern()] * n_blocks
        rates = allocate_layer_sparsity(importance, theta, delta_for(theta, cfg.delta_bands), floor=floor)
        return rates, [Pattern()] * n_blocks
    m = cfg.parsed_pattern()[1].m
    frac = theta / cfg.sparsity
    ns = [n + round((m - n) * (1 - frac)) for n in final_n]
    return [0.0 if n >= m else None for n in ns], [Pattern() if n >= m else Pattern.nm(n, m) for n in ns]


def _final_n(cfg: LosaConfig, importance: torch.Tensor | None, n_blocks: int) -> list[int] | None:
    """N_l kept of M per block at the end (None when unstructured): uniform N, or mixed by importance."""
    kind, base = cfg.parsed_pattern()
    if kind == "unstructured":
        return None
    if kind == "nm" or importance is None:
        return [base.n] * n_blocks
    return [p.n for p in mixed_nm(importance, cfg.sparsity, base.m, spread=cfg.mixed_spread)]


def run_losa(model, tokenizer, cfg: LosaConfig, *, calibration: torch.Tensor | None = None,
             eval_text: str | None = None, device=None, progress: bool = True,
             log: Callable[[Mapping[str, float], int], None] | None = None) -> LosaReport:
    """Run one cell of the comparison (method.md §4–§5) on ``model`` (modified in place) and return its report.

    Args:
        model: a dense causal LM of a supported family.
        tokenizer: its tokenizer.
        cfg: the cell's settings.
        calibration: (N, S) token ids; default: ``cfg.nsamples`` C4 windows of ``cfg.seqlen`` tokens.
        eval_text: perplexity text; default WikiText-2 test.
        device: compute device for calibration (default: the model's).
        progress: progress bars.
        log: ``log(metrics, step)`` for training losses (step counts across DSA steps).

    Raises:
        MergeVerificationError: the merged LoSA model is non-zero outside its final mask, or a layer's sparsity
            differs from what its last pruning step achieved.
    """
    torch.manual_seed(cfg.seed)
    if calibration is None and cfg.method != "dense":
        calibration = data.calibration_windows(tokenizer, cfg.nsamples, cfg.seqlen, seed=cfg.seed)
    return drive(cfg, LocalStages(model, tokenizer, cfg, calibration, eval_text, device=device, progress=progress,
                                  log=log))


def drive(cfg: LosaConfig, stages: Stages) -> LosaReport:
    """The control flow of one cell, written once for every executor (in memory, or one cached job per stage)."""
    report = LosaReport(config=cfg.identity())
    times = report.timings
    with _timed(times, "total"):
        dense = stages.dense()
        if cfg.method == "dense":
            with _timed(times, "perplexity"):
                report.ppl = stages.perplexity(dense)
            final = dense
        elif cfg.method in ("pruned", "lora"):
            final = _one_shot(cfg, stages, dense, report)
        else:
            final = _dsa(cfg, stages, dense, report)
        evaluate(cfg, stages, final, dense, report)
    return report


def evaluate(cfg: LosaConfig, stages: Stages, final, dense, report: LosaReport) -> LosaReport:
    """The optional stages the config asks for, on the model whose perplexity is ``report.ppl`` (method.md §6):
    zero-shot accuracy, the sparse form's size, speed against the ``dense`` model."""
    times = report.timings
    if cfg.zeroshot is not None:
        with _timed(times, "zeroshot"):
            report.zeroshot = stages.zero_shot(final)
    if cfg.export is not None:
        with _timed(times, "export"):
            report.export = stages.export(final)
    if cfg.speed is not None:
        with _timed(times, "speed"):
            report.speed = stages.speed(final, dense)
    return report


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the ``with`` body to ``timings[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _sizes(pr: PruneReport) -> dict[str, int]:
    return {f"{r.block}.{r.name}": r.shape[0] * r.shape[1] for r in pr.layers}


def _one_shot(cfg: LosaConfig, stages: Stages, dense, report: LosaReport):
    """Baselines: uniform one-shot pruning, then (``lora``) a standard, unmasked LoRA of uniform rank. Returns the
    final state."""
    kind, base = cfg.parsed_pattern()
    n, times = stages.n_blocks, report.timings
    with _timed(times, "prune"):
        pruned, pr = stages.prune(dense, [None if base.is_nm else cfg.sparsity] * n, [str(base)] * n, None)
    with _timed(times, "perplexity"):
        report.ppl_pruned = stages.perplexity(pruned)
    report.layer_sparsity = {f"{r.block}.{r.name}": r.sparsity for r in pr.layers}
    report.sparsity = pr.sparsity
    if cfg.method == "pruned":
        report.ppl = report.ppl_pruned
        return pruned
    with _timed(times, "finetune"):
        state, trained = stages.lora(pruned)
    report.trainable_params = trained.trainable_params
    report.steps.append(StepRecord(
        t=1, theta=cfg.sparsity, omega=cfg.lora_rank, cka=None, importance=None, rates=pr.targets,
        patterns=pr.patterns, errors=pr.block_errors, ranks=[cfg.lora_rank] * n, applied_ranks=[cfg.lora_rank] * n,
        achieved_sparsity=pr.sparsity, train_losses=trained.train_losses, timings={"finetune": trained.seconds}))
    report.sparsity_before_merge = report.sparsity
    with _timed(times, "perplexity"):
        report.ppl_unmerged = stages.perplexity(state)
    with _timed(times, "merge"):
        merged, final = stages.finalize(state, pr.patterns)
    with _timed(times, "perplexity"):
        report.ppl = stages.perplexity(merged)
    report.layer_sparsity = final.layer_sparsity  # drops: the plain LoRA update is dense
    report.sparsity = overall_sparsity(report.layer_sparsity, _sizes(pr))
    return merged


def _dsa(cfg: LosaConfig, stages: Stages, dense, report: LosaReport):
    """The T-step loop of method.md §4 (Algorithm 1), one numbered step per comment. Returns the final state."""
    T, n = cfg.effective_steps, stages.n_blocks
    with _timed(report.timings, "dense_outputs"):
        reference = stages.dense_outputs()  # Y^dense, once
    state, final_n, floor = dense, None, None
    for t in range(1, T + 1):
        times: dict[str, float] = {}
        # step 1: schedules (cubic sparsity, linear mean rank)
        theta, omega = cubic_sparsity(cfg.sparsity, t, T), mean_rank(t, cfg.omega1, cfg.delta_omega)
        # step 2: merge the adapter into the (masked) weights; at t = 1 there is no adapter yet
        with _timed(times, "merge"):
            merged = state if t == 1 else stages.merge(state)
        # step 3: LSR on the merged model (§2)
        with _timed(times, "lsr"):
            lsr = None if "lsr" in cfg.ablate else stages.importance(merged)
            imp = torch.tensor(lsr.importance, dtype=torch.float64) if lsr is not None else None
            if t == 1:
                final_n = _final_n(cfg, imp, n)
            rates, patterns = _step_plan(cfg, theta, imp, final_n, n, floor)
        # step 4: prune the merged weights block by block, recording L_l against the dense outputs (§1, §3)
        with _timed(times, "prune"):
            pruned, pr = stages.prune(merged, rates, [str(p) for p in patterns], reference)
        floor = pr.block_sparsity
        # step 6 (decided before 5, applied inside it): SRA ranks from the reconstruction errors (§3)
        ranks = [omega] * n if "sra" in cfg.ablate else \
            allocate_ranks(pr.block_errors, omega, r_min=cfg.r_min, r_max=cfg.r_max)
        # steps 5 and 7: unmerge with the new mask (pruned base entries exactly zero), fine-tune the masked LoRA
        with _timed(times, "finetune"):
            state, trained = stages.finetune(pruned, None if t == 1 else state, ranks, t)
        report.trainable_params = trained.trainable_params
        report.steps.append(StepRecord(
            t=t, theta=theta, omega=omega, cka=lsr.cka if lsr else None, importance=lsr.importance if lsr else None,
            rates=pr.targets, patterns=pr.patterns, errors=pr.block_errors, ranks=ranks,
            applied_ranks=trained.applied_ranks, achieved_sparsity=pr.sparsity, train_losses=trained.train_losses,
            timings=times))
        for k, v in times.items():
            report.timings[k] = report.timings.get(k, 0.0) + v

    # merge and unload (verified on the mask inside), then check the sparsity the last step allocated
    with _timed(report.timings, "merge"):
        merged, final = stages.finalize(state, pr.patterns)
    report.layer_sparsity = final.layer_sparsity
    report.sparsity = overall_sparsity(report.layer_sparsity, _sizes(pr))
    verify_final_sparsity(report.layer_sparsity, pr)
    with _timed(report.timings, "perplexity"):
        report.ppl = stages.perplexity(merged)
    return merged


def verify_final_sparsity(layer_sparsity: dict[str, float], last: PruneReport) -> None:
    """The merged model's sparsity is the last pruning step's, layer by layer, and that is the allocated rate
    (up to one weight per row: per-row rounding of the kept count).

    Raises:
        MergeVerificationError: a layer's sparsity moved in the merge, or differs from its allocated rate.
    """
    layers = {f"{r.block}.{r.name}": r for r in last.layers}
    if moved := {k: (v, layers[k].sparsity) for k, v in layer_sparsity.items() if v != layers[k].sparsity}:
        raise MergeVerificationError(f"layer sparsity changed by the merge (merged, pruned): {moved}")
    if off := {k: (r.sparsity, r.target) for k, r in layers.items()
               if abs(r.sparsity - r.target) > 1 / r.shape[1] + 1e-9}:
        raise MergeVerificationError(f"layer sparsity differs from its allocated rate (achieved, allocated): {off}")
