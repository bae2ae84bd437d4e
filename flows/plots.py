"""Plots of a grid's results and of one LoSA cell's allocation, from the results frame and a cell report.

Pure matplotlib (``Figure`` objects rendered by Agg; pyplot's global state is never touched). File names are the
caller's; ``losa-tables`` names each cell's plots by its label (:func:`cell_plot_name`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from flows.tables import _baseline_rows, _losa_rows, _normalize, _scopes


def cell_plot_name(kind: str, description: str) -> str:
    """``<kind>_<slug of the cell's description>.png``, e.g. ``allocation_testbed-wanda-70pct-unstructured-LoSA-T3-seed0.png``."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", description.replace("%", "pct").replace("+", "")).strip("-")
    return f"{kind}_{slug}.png"


def _empty(fig: Figure, text: str) -> None:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()


def plot_ppl_vs_sparsity(results: pd.DataFrame, path: Path) -> Path:
    """Perplexity vs sparsity, one line per method label, one subplot per (model, pruner); log y; dense dashed."""
    df = _normalize(results)
    df = df[(df["pattern"] == "unstructured") | (df["method"] == "dense")]
    scopes = list(_scopes(df))
    ncols = min(3, max(1, len(scopes)))
    nrows = max(1, math.ceil(len(scopes) / ncols))
    fig = Figure(figsize=(5 * ncols, 3.8 * nrows), layout="constrained")
    if not scopes:
        _empty(fig, "no results")
    for k, (scope, cells) in enumerate(scopes):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for row in _baseline_rows(cells) + _losa_rows(cells, ablations=True):
            vals = row.cells[["sparsity", row.metric]].replace([np.inf, -np.inf], np.nan)
            vals = vals[vals[row.metric] > 0]  # also drops NaN; log axis
            vals = vals if row.broadcast else vals.dropna()  # dense needs no sparsity
            if row.kind != "ppl" or vals.empty:
                continue
            if row.broadcast:
                ax.axhline(vals[row.metric].mean(), color="grey", ls="--", lw=1, label=row.label)
                continue
            g = vals.groupby("sparsity")[row.metric]
            ax.errorbar(g.mean().index * 100, g.mean().values, yerr=g.std(ddof=1).fillna(0).values,
                        marker="o", ms=4, capsize=2, label=row.label)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # "60", not "6 x 10^1"
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("perplexity")
        seq = f", eval_seqlen {scope.seqlen}" if scope.seqlen >= 0 else ""
        ax.set_title(f"{scope.model}, {scope.pruner}{seq}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _heatmap(fig: Figure, ax, matrix: np.ndarray, steps: list, title: str, fmt: str, annotate: bool) -> None:
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.9)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("DSA step t")
    ax.set_ylabel("block")
    ax.set_xticks(range(len(steps)), [str(t) for t in steps])
    if matrix.shape[0] <= 40:
        ax.set_yticks(range(matrix.shape[0]))
    if annotate and np.isfinite(matrix).any():
        mid = np.nanmean([np.nanmin(matrix), np.nanmax(matrix)])
        for (i, j), v in np.ndenumerate(matrix):
            if np.isfinite(v):
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7,
                        color="black" if v > mid else "white")


def plot_allocation(report: dict, path: Path) -> Path:
    """Per-block sparsity rate and applied LoRA rank across DSA steps, as two heatmaps, from a LosaReport dict."""
    steps = report.get("steps") or []
    fig = Figure(figsize=(11, 0.9 + 0.32 * max(4, *(len(s.get("rates") or []) for s in steps)) if steps else 3),
                 layout="constrained")
    if not steps:
        _empty(fig, "no DSA steps in this report")
    else:
        def matrix(key: str, fallback: str | None = None) -> np.ndarray:
            cols = [s.get(key) or (s.get(fallback) if fallback else None) or [] for s in steps]
            out = np.full((max(1, max(map(len, cols))), len(cols)), np.nan)
            for j, c in enumerate(cols):
                out[: len(c), j] = [np.nan if v is None else float(v) for v in c]
            return out  # (blocks, steps)

        rates, ranks = matrix("rates"), matrix("applied_ranks", "ranks")
        ts = [s.get("t", j + 1) for j, s in enumerate(steps)]
        annotate = rates.size <= 200
        axes = fig.subplots(1, 2)
        _heatmap(fig, axes[0], rates, ts, "sparsity rate per block", ".2f", annotate)
        _heatmap(fig, axes[1], ranks, ts, "applied LoRA rank per block", ".0f", annotate)
        cfg = report.get("config") or {}
        head = " ".join(str(cfg[k]) for k in ("method", "pruner", "pattern") if cfg.get(k))
        if isinstance(cfg.get("sparsity"), (int, float)):
            head += f" {cfg['sparsity']:.0%}"
        fig.suptitle(f"{head}, T={len(steps)}".strip(", "), fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_lsr(report: dict, path: Path) -> Path:
    """LSR and SRA inputs per DSA step (method.md §2–§3): the CKA matrix between block inputs, and the
    per-block reconstruction errors L_l, from a LosaReport dict."""
    steps = [s for s in report.get("steps") or [] if s.get("cka") is not None or s.get("errors")]
    fig = Figure(figsize=(3.2 * max(1, len(steps)), 6.2), layout="constrained")
    if not steps:
        _empty(fig, "no LSR/SRA records in this report")
    else:
        axes = fig.subplots(2, len(steps), squeeze=False)
        for j, s in enumerate(steps):
            ax = axes[0][j]
            if s.get("cka") is not None:
                # 1 - CKA with the colour range fitted to the off-diagonal values: on a 0-1 CKA scale every block
                # pair of a real model sits near 1 and the differences LSR acts on are invisible
                dist = 1.0 - np.asarray(s["cka"], dtype=float)
                cka = dist
                off = dist[~np.eye(len(dist), dtype=bool)]
                lo, hi = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
                im = ax.imshow(dist, vmin=lo, vmax=max(hi, lo + 1e-9), cmap="magma", interpolation="nearest")
                fig.colorbar(im, ax=ax, shrink=0.8, label="1 − CKA")
                ax.set_xticks(range(len(cka)))
                ax.set_yticks(range(len(cka)))
            else:
                ax.text(0.5, 0.5, "no LSR (ablated)", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"1 − CKA between block inputs, step {s.get('t', j + 1)}", fontsize=9)
            ax.set_xlabel("block")
            ax.set_ylabel("block")
            errors = s.get("errors") or []
            axes[1][j].bar(range(len(errors)), errors, color="tab:red")
            axes[1][j].set_xticks(range(len(errors)))
            axes[1][j].set_title(f"reconstruction error L_l, step {s.get('t', j + 1)}", fontsize=9)
            axes[1][j].set_xlabel("block")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_loss(report: dict, path: Path) -> Path:
    """The training loss over every optimiser step of a cell, with the DSA steps marked (method.md §4): the jumps
    where a step re-prunes are the method, not instability."""
    steps = [s for s in report.get("steps") or [] if s.get("train_losses")]
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    if not steps:
        _empty(fig, "no fine-tuning in this cell")
    else:
        ax = fig.subplots()
        start = 0
        for s in steps:
            losses = s["train_losses"]
            xs = range(start, start + len(losses))
            ax.plot(xs, losses, marker="o", ms=3, label=f"t={s.get('t')}: sparsity {s.get('theta', 0):.0%}")
            if start:
                ax.axvline(start - 0.5, color="grey", ls="--", lw=0.8)
            start += len(losses)
        ax.set_xlabel("optimiser step (all DSA steps)")
        ax.set_ylabel("training loss")
        ax.set_title("training loss; dashed: a DSA step re-prunes", fontsize=9)
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
