"""The LoSA entry point: baselines, the T-step dynamic sparse adaptation loop (DSA, method.md §4), and its report.

One function, :func:`run_losa`, runs every method of a comparison table (``LosaConfig.method``): dense, pruned
only, pruned + standard LoRA, and LoSA with its ablations. No I/O besides reading the shipped data; the report is a
plain dataclass that the orchestration layer logs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch

from . import data
from .adapter import make_masked_lora, merge_into_base, unmerge_with_new_mask, verify_merged, weight_masks
from .calibration import block_input_grams, dense_block_outputs, prune_model
from .config import LosaConfig
from .evaluate import perplexity
from .finetune import alpaca_batches, finetune, lm_text_batches, tokenize_alpaca
from .layer_sparsity import allocate_layer_sparsity, cka_from_grams, delta_for, layer_importance, mixed_nm
from .models import get_adapter
from .patterns import Pattern
from .rank_allocation import allocate_ranks
from .schedule import cubic_sparsity, mean_rank


class MergeVerificationError(RuntimeError):
    """The merged model left its mask or missed its allocated sparsity."""


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

    def to_dict(self) -> dict:
        return asdict(self)


def _sparsity(model) -> tuple[float, dict[str, float]]:
    per, zeros, total = {}, 0, 0
    for b, name, lin in get_adapter(model).iter_linears(model):  # base layers (adapters unwrapped)
        w = lin.weight
        z = int((w == 0).sum())
        per[f"{b}.{name}"] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    return zeros / total, per


def _train_batches(tokenizer, cfg: LosaConfig) -> Callable[[int], tuple[Iterator[Mapping], int]]:
    """``step_data(t) -> (batches, optimiser steps)`` for DSA step t (and t = T for the one-shot baselines)."""
    T = cfg.effective_steps
    bs = cfg.finetune.batch_size
    if cfg.train_data == "text":
        stream = torch.tensor(
            [i for doc in data.finetune_documents() for i in tokenizer(doc, add_special_tokens=False)["input_ids"]
             + [tokenizer.eos_token_id]], dtype=torch.int32)

        def step_data(t: int):
            # every method trains for the same total, (steps − 1)·train_steps + final_train_steps: −DSA and the
            # LoRA baseline (T = 1) get the whole budget in their single step
            steps = cfg.final_train_steps + (cfg.steps - T) * cfg.train_steps if t == T else cfg.train_steps
            # later steps continue where earlier ones stopped: every step sees new windows
            start = (t - 1) * cfg.train_steps * cfg.finetune.grad_accum
            return lm_text_batches(stream, cfg.finetune.seqlen, bs, cfg.seed, start), steps

        return step_data

    examples = data.alpaca_examples(cfg.alpaca_total)
    encoded = tokenize_alpaca(tokenizer, examples, cfg.alpaca_max_len)

    def step_data(t: int):
        # official slicing: alpaca_per_step examples for steps 1..T-1, the rest of alpaca_total at step T
        lo = (t - 1) * cfg.alpaca_per_step
        hi = len(encoded) if t == T else min(t * cfg.alpaca_per_step, len(encoded))
        if lo >= hi:
            raise ValueError(f"step {t} has no Alpaca examples: {len(encoded)} available, "
                             f"{cfg.alpaca_per_step} per step over T={T}")
        steps = math.ceil((hi - lo) / (bs * cfg.finetune.grad_accum))  # one epoch over the slice
        return alpaca_batches(encoded[lo:hi], bs, tokenizer.pad_token_id or tokenizer.eos_token_id, cfg.seed + t), steps

    return step_data


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


def _importance(model, calib: torch.Tensor, cfg: LosaConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    grams = block_input_grams(model, calib[: cfg.rmi_samples], cfg.calib_batch_size, device=device)
    cka = cka_from_grams(grams)
    return cka, layer_importance(cka, cfg.effective_beta)


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
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)  # adapter initialisation and dropout: the whole cell is a function of the seed
    report = LosaReport(config=cfg.model_dump(mode="json"))
    if calibration is None and cfg.method != "dense":
        calibration = data.calibration_windows(tokenizer, cfg.nsamples, cfg.seqlen, seed=cfg.seed)
    text = eval_text if eval_text is not None else data.wikitext2_test_text()

    def ppl(m) -> float:
        return perplexity(m, tokenizer, text, cfg.eval_seqlen, cfg.eval_batch_size, cfg.eval_windows, progress=progress)

    if cfg.method == "dense":
        report.ppl = ppl(model)
    elif cfg.method in ("pruned", "lora"):
        _one_shot(model, tokenizer, cfg, calibration, report, ppl, device, progress, log)
    else:
        _dsa(model, tokenizer, cfg, calibration, report, ppl, device, progress, log)
    report.timings["total"] = time.perf_counter() - t_start
    return report


def _one_shot(model, tokenizer, cfg, calibration, report, ppl, device, progress, log) -> None:
    """Baselines: uniform one-shot pruning, then (``lora``) a standard, unmasked LoRA of uniform rank."""
    kind, base = cfg.parsed_pattern()
    t = time.perf_counter()
    pr = prune_model(model, calibration, cfg.pruner, None if base.is_nm else cfg.sparsity, base,
                     batch_size=cfg.calib_batch_size, propagation=cfg.propagation, device=device, progress=progress)
    report.timings["prune"] = time.perf_counter() - t
    report.ppl_pruned = ppl(model)
    report.sparsity, report.layer_sparsity = _sparsity(model)
    if cfg.method == "pruned":
        report.ppl = report.ppl_pruned
        return
    from peft import LoraConfig, get_peft_model

    adapter = get_adapter(model)
    targets = [f"{adapter.blocks}.{b}.{n}" for b, n, _ in adapter.iter_linears(model)]
    peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                  lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                  task_type="CAUSAL_LM"))
    report.trainable_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    batches, steps = _train_batches(tokenizer, cfg)(cfg.effective_steps)
    t = time.perf_counter()
    res = finetune(peft_model, batches, steps, cfg.finetune, log=log, progress=progress, desc="LoRA")
    report.timings["finetune"] = time.perf_counter() - t
    report.steps.append(StepRecord(1, cfg.sparsity, cfg.lora_rank, None, None, pr.targets, pr.patterns,
                                   pr.block_errors, [cfg.lora_rank] * len(pr.targets), [cfg.lora_rank] * len(pr.targets),
                                   pr.sparsity, res.losses, {"finetune": res.seconds}))
    report.sparsity_before_merge = report.sparsity
    report.ppl_unmerged = ppl(peft_model)
    merged = peft_model.merge_and_unload()
    report.ppl = ppl(merged)
    report.sparsity, report.layer_sparsity = _sparsity(merged)  # drops: the plain LoRA update is dense


def _dsa(model, tokenizer, cfg, calibration, report, ppl, device, progress, log) -> None:
    """The T-step loop of method.md §4, one numbered step per comment."""
    T = cfg.effective_steps
    kind, base = cfg.parsed_pattern()
    n_blocks = len(get_adapter(model).get_blocks(model))
    t0 = time.perf_counter()
    reference = dense_block_outputs(model, calibration, cfg.calib_batch_size, device=device)  # Y^dense, once
    report.timings["dense_outputs"] = time.perf_counter() - t0
    step_data = _train_batches(tokenizer, cfg)
    peft_model = make_masked_lora(model, r_max=cfg.physical_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    report.trainable_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    base_model = peft_model.get_base_model()
    global_step, final_n, floor = 0, None, None

    for t in range(1, T + 1):
        times: dict[str, float] = {}
        # step 1: schedules (cubic sparsity, linear mean rank)
        theta, omega = cubic_sparsity(cfg.sparsity, t, T), mean_rank(t, cfg.omega1, cfg.delta_omega)
        # step 2: merge the adapter into the (masked) weights
        merge_into_base(peft_model)
        # step 3: LSR on the merged model (§2)
        clock = time.perf_counter()
        cka = importance = None
        if "lsr" not in cfg.ablate:
            cka, importance = _importance(base_model, calibration, cfg, device)
        if t == 1:
            final_n = _final_n(cfg, importance, n_blocks)
        rates, patterns = _step_plan(cfg, theta, importance, final_n, n_blocks, floor)
        times["lsr"] = time.perf_counter() - clock
        # step 4: prune the merged weights block by block, recording L_l against the dense outputs (§1, §3)
        clock = time.perf_counter()
        pr = prune_model(base_model, calibration, cfg.pruner, rates, patterns, batch_size=cfg.calib_batch_size,
                         propagation=cfg.propagation, reference=reference, device=device, progress=progress)
        times["prune"] = time.perf_counter() - clock
        floor = pr.block_sparsity
        # step 6 (decided before 5, applied inside it): SRA ranks from the reconstruction errors (§3)
        ranks = [omega] * n_blocks if "sra" in cfg.ablate else \
            allocate_ranks(pr.block_errors, omega, r_min=cfg.r_min, r_max=cfg.r_max)
        # step 5: unmerge with the new mask: pruned entries of the base weights are exactly zero
        clipped = unmerge_with_new_mask(peft_model, ranks=ranks, clip=cfg.clip_to_physical)
        applied = [clipped.get(b, (r, r))[1] for b, r in enumerate(ranks)]
        # step 7: fine-tune the masked LoRA
        batches, steps = step_data(t)
        res = finetune(peft_model, batches, steps, cfg.finetune, progress=progress, desc=f"LoSA step {t}/{T}",
                       log=(lambda m, s, off=global_step: log(m, off + s)) if log else None)
        global_step += steps
        times["finetune"] = res.seconds
        report.steps.append(StepRecord(
            t, theta, omega, cka.tolist() if cka is not None else None,
            importance.tolist() if importance is not None else None, pr.targets, pr.patterns, pr.block_errors,
            ranks, applied, pr.sparsity, res.losses, times))

    # merge and unload, then verify: zero exactly where the final mask is zero, sparsity as allocated
    masks = weight_masks(peft_model)
    merged = peft_model.merge_and_unload()
    try:
        verify_merged(merged, masks)
    except ValueError as err:
        raise MergeVerificationError(str(err)) from err
    report.sparsity, report.layer_sparsity = _sparsity(merged)
    last = {f"{r.block}.{r.name}": r for r in pr.layers}
    if moved := {k: (v, last[k].sparsity) for k, v in report.layer_sparsity.items() if v != last[k].sparsity}:
        raise MergeVerificationError(f"layer sparsity changed by the merge (merged, pruned): {moved}")
    # allocated rate, up to one weight per row (per-row rounding of the kept count)
    if off := {k: (r.sparsity, r.target) for k, r in last.items() if abs(r.sparsity - r.target) > 1 / r.shape[1] + 1e-9}:
        raise MergeVerificationError(f"layer sparsity differs from its allocated rate (achieved, allocated): {off}")
    if kind != "unstructured":
        _verify_nm(merged, pr.patterns)
    report.ppl = ppl(merged)


def _verify_nm(model, patterns: list[str]) -> None:
    for b, name, lin in get_adapter(model).iter_linears(model):
        p = Pattern.parse(patterns[b])
        if not p.is_nm:
            continue
        groups = (lin.weight != 0).reshape(-1, p.m).sum(-1)
        if not bool((groups == p.n).all()):
            raise MergeVerificationError(f"block {b} {name}: N:M groups hold {groups.unique().tolist()} weights, "
                                         f"not {p.n} of {p.m}")
