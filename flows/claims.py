"""The paper's claims, checked against a model's grids: a generated Markdown report (``losa claims``).

Each claim is a comparison of perplexities (lower is better) or sparsities between cells of the ``<prefix>-*`` grids
(``smollm2-seeds``, ``-table1-ppl``, ``-ablation``, ``-steps``, ``-nm``), read from MLflow like the tables; a cell that
several grids share counts once. Over seeds a claim
*holds* when it holds for the means and for every seed paired by seed, *holds on average* when only the means
agree, and *fails* otherwise; a claim without its cells says so ("not measured"). Where a claim fails, the report
adds the per-layer data of the cells involved (CKA, rates, reconstruction errors, ranks) so the reader can see why.
Pure functions over a results frame (:func:`verdict`, :func:`claims`), plus one entry point that reads MLflow.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tasks.state import PROJECT_ROOT

REPORT = PROJECT_ROOT / "docs" / "{prefix}-claims.md"
GRIDS = ("seeds", "table1-ppl", "ablation", "steps", "nm")  # <prefix>-<grid> files the report reads


@dataclass
class Comparison:
    """``better`` beats ``worse`` (lower perplexity), per seed and on average."""

    label: str
    better: dict[int, float]  # seed -> value
    worse: dict[int, float]

    @property
    def n(self) -> int:
        return len(set(self.better) & set(self.worse))

    def verdict(self) -> str:
        return verdict(self.better, self.worse)

    def describe(self, better_name: str, worse_name: str) -> str:
        return f"{better_name} {_stat(self.better)} vs {worse_name} {_stat(self.worse)}"


@dataclass
class Claim:
    title: str
    verdict: str
    lines: list[str] = field(default_factory=list)  # evidence, one Markdown bullet each
    why: list[str] = field(default_factory=list)  # per-layer data, when the claim does not hold


def _stat(values: dict[int, float]) -> str:
    v = [x for x in values.values() if x == x]
    if not v:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.2f} (n=1)"
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} (n={len(v)})"


def verdict(better: dict[int, float], worse: dict[int, float]) -> str:
    """``holds`` | ``holds on average`` | ``fails`` | ``not measured`` for "better < worse" over paired seeds."""
    seeds = sorted(s for s in set(better) & set(worse) if better[s] == better[s] and worse[s] == worse[s])
    if not seeds:
        return "not measured"
    mean_b = statistics.mean(better[s] for s in seeds)
    mean_w = statistics.mean(worse[s] for s in seeds)
    if mean_b >= mean_w:
        return "fails"
    return "holds" if all(better[s] < worse[s] for s in seeds) else "holds on average"


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim made of several comparisons (all must hold for ``holds``)."""
    measured = [v for v in verdicts if v != "not measured"]
    if not measured:
        return "not measured"
    if all(v == "holds" for v in measured):
        return "holds" + (" (partly measured)" if len(measured) < len(verdicts) else "")
    if all(v in ("holds", "holds on average") for v in measured):
        return "holds on average"
    if any(v.startswith("holds") for v in measured):
        return "mixed"
    return "fails"


def _values(frame: pd.DataFrame, metric: str = "ppl", **where) -> dict[int, float]:
    sel = frame
    for key, value in where.items():
        sel = sel[sel[key] == value]
    return {int(r.seed): float(getattr(r, metric)) for r in sel.itertuples() if pd.notna(getattr(r, metric))}


def _compare(frame, label, better: dict, worse: dict, metric="ppl") -> Comparison:
    return Comparison(label, _values(frame, metric, **better), _values(frame, metric, **worse))


COLUMNS = ("cell_id", "method", "pruner", "sparsity", "pattern", "ablate", "steps", "seed", "ppl",
           "achieved_sparsity", "sparsity_before_merge", "label", "run_id")


def claims(results: pd.DataFrame, why: Callable[[pd.DataFrame, dict], list[str]] | None = None) -> list[Claim]:
    """The five claims of the paper on the results of a model's grids (one row per cell, any grid, any seed).

    ``results`` has :func:`flows.tracking.results_frame`'s columns; a cell that several grids share appears once.
    ``why(frame, where)`` returns per-layer lines for the cells matching ``where``, used when a claim fails.
    """
    frame = results if len(results) else pd.DataFrame(columns=list(COLUMNS))
    if "cell_id" in frame:
        frame = frame.drop_duplicates("cell_id")
    frame = frame.assign(ablate=frame["ablate"].fillna(""), pattern=frame["pattern"].fillna("unstructured"))
    steps, nm = frame[frame["pattern"] == "unstructured"], frame
    out = []
    pruners = sorted(set(frame["pruner"].dropna()) - {""})
    unstructured = dict(pattern="unstructured")
    # the grids' own T (the steps grid varies it): claims 1-3 compare cells at that T only
    tuned = frame[frame["method"].isin(["lora", "losa"])]["steps"]
    main_t = int(tuned.mode().iloc[0]) if len(tuned) else 0

    # 1. LoSA < LoRA < pruned at 60-70 %
    lines, verdicts, failed = [], [], []
    for pruner in pruners:
        for sparsity in (0.6, 0.7):
            src = frame
            base = dict(pruner=pruner, sparsity=sparsity, **unstructured)
            a = _compare(src, "", dict(method="losa", ablate="", steps=main_t, **base),
                         dict(method="lora", steps=main_t, **base))
            b = _compare(src, "", dict(method="lora", steps=main_t, **base), dict(method="pruned", **base))
            for cmp, names in ((a, ("+LoSA", "+LoRA")), (b, ("+LoRA", "pruned"))):
                v = cmp.verdict()
                verdicts.append(v)
                lines.append(f"{pruner} {sparsity:.0%}: {cmp.describe(*names)} → **{v}**")
                if v == "fails":
                    failed.append(dict(method="losa", ablate="", **base))
    out.append(_claim("LoSA < LoRA < pruned in perplexity at 60–70 %", verdicts, lines, failed, frame, why))

    # 2. LoSA keeps the target sparsity exactly; plain LoRA's merge makes the model dense
    lines, verdicts = [], []
    src = frame[frame["pattern"] == "unstructured"]
    if len(src):
        losa = src[(src.method == "losa") & (src.ablate == "") & src.achieved_sparsity.notna()]
        lora = src[(src.method == "lora") & src.achieved_sparsity.notna()]
        if len(losa):
            dev = (losa.achieved_sparsity - losa.sparsity).abs()
            ok = bool((dev <= 1e-3).all())
            verdicts.append("holds" if ok else "fails")
            lines.append(f"+LoSA: achieved − target sparsity at most {dev.max():.5f} over {len(losa)} cells "
                         f"(targets {', '.join(f'{s:.0%}' for s in sorted(losa.sparsity.unique()))}) → "
                         f"**{'holds' if ok else 'fails'}**")
        if len(lora):
            dense = bool((lora.achieved_sparsity < 0.01).all())
            verdicts.append("holds" if dense else "fails")
            lines.append(f"+LoRA after merge: sparsity {lora.achieved_sparsity.min():.2%}–"
                         f"{lora.achieved_sparsity.max():.2%} over {len(lora)} cells (before merge: "
                         f"{lora.sparsity_before_merge.min():.2%}–{lora.sparsity_before_merge.max():.2%}) → "
                         f"**{'holds' if dense else 'fails'}**")
    out.append(_claim("LoSA keeps the target sparsity exactly; plain LoRA's merge makes the model dense",
                      verdicts or ["not measured"], lines, [], src, why))

    # 3. each of -LSR, -SRA, -DSA is worse than LoSA
    lines, verdicts, failed = [], [], []
    for pruner in pruners:
        base = dict(pruner=pruner, sparsity=0.7, method="losa", steps=main_t, **unstructured)
        for ab in ("lsr", "sra", "dsa"):
            cmp = _compare(frame, "", dict(ablate="", **base), dict(ablate=ab, **base))
            v = cmp.verdict()
            verdicts.append(v)
            lines.append(f"{pruner} 70%: {cmp.describe('+LoSA', '−' + ab.upper())} → **{v}**")
            if v == "fails":
                failed.append(dict(ablate=ab, **base))
    out.append(_claim("Each of −LSR, −SRA, −DSA is worse than LoSA", verdicts or ["not measured"], lines, failed,
                      frame, why))

    # 4. T > 1 beats T = 1
    lines, verdicts, failed = [], [], []
    if len(steps):
        losa = steps[(steps.method == "losa") & (steps.ablate == "")]
        for (pruner, sparsity), group in losa.groupby(["pruner", "sparsity"]):
            one = _values(group[group.steps == 1])
            if not one:
                continue
            for T in sorted(t for t in group.steps.unique() if t > 1):
                more = _values(group[group.steps == T])
                v = verdict(more, one)
                verdicts.append(v)
                lines.append(f"{pruner} {sparsity:.0%}: T={T} {_stat(more)} vs T=1 {_stat(one)} → **{v}**")
                if v == "fails":
                    failed.append(dict(pruner=pruner, sparsity=sparsity, method="losa", steps=int(T)))
    out.append(_claim("T > 1 beats T = 1 (equal total fine-tuning)", verdicts or ["not measured"], lines, failed,
                      steps, why))

    # 5. mixed N:M beats uniform N:M at equal mean
    lines, verdicts, failed = [], [], []
    if len(nm):
        nm = nm[(nm.ablate == "")]
        mixed = nm[nm.pattern.astype(str).str.startswith("mixed-")]
        for pattern in sorted(mixed.pattern.unique()):
            uniform = pattern.removeprefix("mixed-")
            for (pruner, method), _ in mixed[mixed.pattern == pattern].groupby(["pruner", "method"]):
                where = dict(pruner=pruner, method=method)
                a, b = _values(nm, pattern=pattern, **where), _values(nm, pattern=uniform, **where)
                v = verdict(a, b)
                verdicts.append(v)
                lines.append(f"{pruner} {method}: {pattern} {_stat(a)} vs {uniform} {_stat(b)} → **{v}**")
                if v == "fails":
                    failed.append(dict(pattern=pattern, **where))
    out.append(_claim("Mixed N:M beats uniform N:M at equal mean sparsity", verdicts or ["not measured"], lines,
                      failed, nm, why))
    return out


def _claim(title, verdicts, lines, failed, frame, why) -> Claim:
    c = Claim(title, combine(verdicts), lines)
    if why is not None and c.verdict not in ("holds", "not measured"):
        for where in failed[:4]:
            c.why += why(frame, where)
    return c


def render(model: str, claims_: list[Claim], budget: str, grids: dict[str, str]) -> str:
    """The report as Markdown."""
    out = [f"# The paper's claims on {model}", "",
           f"Generated by `losa claims` from the MLflow runs of {', '.join(f'`{g}`' for g in grids.values())}; "
           "do not edit by hand. Perplexity: WikiText-2, lower is better. Over seeds: mean ± sample sd (n); a claim "
           "*holds* when the means and every seed (paired) agree, *holds on average* when only the means do.", "",
           f"Budget: {budget}", "",
           "| claim | verdict |", "|---|---|"]
    out += [f"| {c.title} | {c.verdict} |" for c in claims_]
    for i, c in enumerate(claims_, 1):
        out += ["", f"## {i}. {c.title}: {c.verdict}", ""]
        out += [f"- {line}" for line in c.lines] or ["- no cells of this comparison have run yet"]
        if c.why:
            out += ["", "Per-layer data of the cells where it does not hold:", ""] + [f"- {w}" for w in c.why]
    return "\n".join(out) + "\n"


def per_layer_lines(frame: pd.DataFrame, where: dict) -> list[str]:
    """CKA, rates, errors and ranks of the first cell matching ``where`` (from its MLflow report)."""
    from flows import tracking

    sel = frame
    for key, value in where.items():
        sel = sel[sel[key] == value]
    sel = sel.dropna(subset=["run_id"])
    if sel.empty:
        return []
    row = sel.iloc[0]
    report = tracking.cell_report(row.run_id)
    lines = []
    for st in report.get("steps", []):
        rates = [r for r in st["rates"] if r is not None]
        parts = [f"`{row.label}` step {st['t']}: Θ={st['theta']:.3f}"]
        if st.get("cka"):
            cka = [v for i, r in enumerate(st["cka"]) for j, v in enumerate(r) if i != j]
            parts.append(f"off-diagonal CKA {min(cka):.3f}–{max(cka):.3f}")
        if rates:
            parts.append(f"rates {min(rates):.3f}–{max(rates):.3f}")
        errs = st["errors"]
        parts.append(f"errors L_l mean {statistics.mean(errs):.3f} (first block {errs[0]:.3f}, last {errs[-1]:.3f})")
        parts.append(f"ranks {min(st['applied_ranks'])}–{max(st['applied_ranks'])} (requested "
                     f"{min(st['ranks'])}–{max(st['ranks'])})")
        losses = st.get("train_losses") or []
        if losses:
            parts.append(f"loss {losses[0]:.2f} → {losses[-1]:.2f}")
        lines.append("; ".join(parts))
    return lines


def write_report(prefix: str = "smollm2", out: Path | None = None) -> Path:
    """Read the ``<prefix>-*`` grids' results from MLflow and write ``docs/<prefix>-claims.md``."""
    from flows.grid import grid_results
    from flows.spec import load_grid

    names = {kind: f"{prefix}-{kind}" for kind in GRIDS}
    frames, budget, model = [], "", prefix
    for name in names.values():
        spec = load_grid(name)
        frames.append(grid_results(spec)[0])
        tuned = [c.config for c in spec.cells() if c.config.method == "losa" and not c.config.ablate]
        model = spec.models[0]
        if budget or not tuned:
            continue  # the budget of the first grid with a LoSA cell (every grid of a prefix shares it)
        cfg = tuned[0]
        budget = (f"calibration {cfg.nsamples} C4 windows × {cfg.seqlen}; T = {cfg.steps} (unless the grid varies "
                  f"it); {(cfg.steps - 1) * cfg.train_steps + cfg.final_train_steps} optimiser steps of "
                  f"{cfg.finetune.batch_size} × {cfg.finetune.seqlen} tokens (lr {cfg.finetune.lr:g}) for every "
                  f"fine-tuned method; first {cfg.eval_windows} WikiText-2 windows of {cfg.eval_seqlen}.")
    path = out or Path(str(REPORT).format(prefix=prefix))
    path.parent.mkdir(parents=True, exist_ok=True)
    results = pd.concat(frames, ignore_index=True)
    path.write_text(render(model, claims(results, per_layer_lines), budget, names))
    return path
