"""Comparison tables in the paper's layouts from the per-cell results frame. No tracking, no orchestration.

Pure pandas (plots: ``flows.plots``). :func:`results_frame` builds the frame from the grid's typed cells and their
metrics; :func:`build_tables` also takes frames written by hand (``published`` numbers too), whose columns it
normalises. Every layout returns plain string tables: a cell without a result is an empty string, a cell whose run
failed (``status`` ``failed``: diverged, merge check failed, any error) reads ``failed``, never a number.

Format decisions (the tests pin them):

* Values: perplexity with 2 decimals; sparsity as a percentage with 1 decimal ("50.0%").
* Repeats: all cells at the same table position (same row and column; in practice the seeds of one configuration)
  are aggregated. One cell with a value is printed plainly; two or more as ``"mean ± sd (n=k)"`` (sample sd,
  ddof=1), with ``"(n=k of N)"`` when only k of the N cells produced the metric. The ``seeds`` layout prints every
  value in that form, ``"12.34 (n=1)"`` for a single run.
* Dense: one value (aggregated over all dense cells of the model) repeated in every column, so each column reads
  on its own.
* Published numbers sit in two extra rows right under ours: ``"<label> (published)"`` and ``"<label> (diff)"``
  (ours − published; ours is the mean over seeds; "+"-signed, percentage points for sparsity rows). They match
  on model, method, pruner, sparsity, pattern, metric and eval_seqlen (dense ignores pruner/sparsity/pattern;
  ablations and the ``steps`` layout are never compared, as published rows have no ablate/steps). Entries that
  match everything except eval_seqlen are not compared; a note in ``table.attrs["notes"]`` says so.
* Several LoSA step counts T in one table give one row each, ``"+LoSA (T=2)"``; a model evaluated at several
  eval_seqlen values gets one table per length (name suffix ``__seq<L>``).
* Table names: ``<layout>__<model>__<pruner>``. ``table1``/``zeroshot``/``seeds`` use unstructured cells
  (columns are sparsities); ``nm`` uses N:M cells (columns are patterns); ``ablation`` and ``steps`` take both
  (sparsity columns first, then patterns).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from typing import get_args

import numpy as np
import pandas as pd

from flows.spec import Cell, Layout
from losa.config import LABELS, ablation_rank, label

LAYOUTS: tuple[str, ...] = get_args(Layout)
METRICS = ("ppl", "ppl_pruned", "ppl_unmerged", "achieved_sparsity", "sparsity_before_merge", "trainable_params")
_METRIC_ALIASES = {"perplexity": "ppl", "wikitext2_ppl": "ppl", "sparsity": "achieved_sparsity"}
_DEFAULTS = {"model": "", "method": "", "pruner": "", "pattern": "unstructured", "ablate": "", "sparsity": np.nan,
             "steps": np.nan, "seed": 0, "eval_seqlen": np.nan, **{m: np.nan for m in METRICS}, "status": ""}
# metrics of the optional stages (MLflow names): zero-shot ``zs.<task>`` (the task's headline accuracy, a fraction),
# ``zs.<task>.stderr``, ``zs.mean``; the sparse form ``export.*``; speed ``speed.<engine>.*``
EXTRA_PREFIXES = ("zs.", "export.", "speed.")
_ZEROSHOT_NOTE = ("no zero-shot results in these cells (set `zeroshot:` in the grid, method.md §6); the table shows "
                  "WikiText-2 perplexity")
_TASK_LABELS = {"boolq": "BoolQ", "rte": "RTE", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
                "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA", "piqa": "PIQA"}


COLUMNS = ["cell_id", "grid", "model", "label", "method", "pruner", "sparsity", "pattern", "ablate", "steps", "seed",
           "eval_seqlen", *METRICS, "run_id", "status", "failure"]


def is_extra(metric: str) -> bool:
    """Whether a metric belongs to an optional stage (and is passed through to the results frame)."""
    return metric.startswith(EXTRA_PREFIXES)


def results_frame(cells: list[Cell], metrics: dict[str, dict]) -> pd.DataFrame:
    """One row per cell: its typed settings and label, and its metrics (``metrics[cell.id]``: metric -> value, plus
    ``run_id`` and ``grid``; a cell without an entry gets NaN metrics)."""
    rows = []
    for cell in cells:
        cfg, got = cell.config, metrics.get(cell.id, {})
        rows.append({"cell_id": cell.id, "grid": got.get("grid", ""), "model": cell.model, "label": cell.label,
                     "method": cfg.method, "pruner": cfg.pruner, "sparsity": cfg.sparsity, "pattern": cfg.pattern,
                     "ablate": ",".join(cfg.ablate), "steps": cfg.steps, "seed": cfg.seed,
                     "eval_seqlen": cfg.eval_seqlen, **{m: got.get(m, np.nan) for m in METRICS},
                     "run_id": got.get("run_id", np.nan), "status": got.get("status", ""),
                     "failure": got.get("failure", ""), **{k: v for k, v in got.items() if is_extra(k)}})
    extra = sorted({k for r in rows for k in r if is_extra(k)})
    return pd.DataFrame(rows, columns=COLUMNS + extra)


# ---------------------------------------------------------------- normalising the inputs

def _norm_pattern(p) -> str:
    return "unstructured" if p is None or (isinstance(p, float) and math.isnan(p)) or str(p).strip() in ("", "0:0") \
        else str(p).strip()


def _norm_ablate(a) -> str:
    """``"sra, lsr"``, ``["lsr", "sra"]`` or ``"lsr-sra"`` -> ``"lsr,sra"`` (canonical order); NaN/None -> ``""``."""
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return ""
    parts = [x for x in re.split(r"[\s,+\-]+", a.lower()) if x] if isinstance(a, str) else [str(x).lower() for x in a]
    return ",".join(sorted(set(parts), key=lambda x: (ablation_rank(x), x)))


def _ablate_label(ablate: str) -> str:
    return label("losa", ablate.split(",") if ablate else ())


def _ablate_order(ablate: str) -> tuple:
    parts = ablate.split(",") if ablate else []
    return len(parts), [ablation_rank(x) for x in parts], ablate


def _pct_label(s: float) -> str:
    return "?" if s is None or math.isnan(s) else f"{s * 100:.4g}%"


def _pattern_order(p: str) -> tuple:
    m = re.fullmatch(r"(mixed-)?(\d+):(\d+)", p)
    if not m:
        return 2, 0.0, 0, p
    n, mm = int(m[2]), int(m[3])
    return int(bool(m[1])), 1 - n / mm, mm, p


def _slug(text) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "none"


def _normalize(results: pd.DataFrame) -> pd.DataFrame:
    df = results.copy()
    for col, default in _DEFAULTS.items():
        if col not in df:
            df[col] = default
    for col in ("model", "method", "pruner"):
        df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
    df["method"] = df["method"].str.lower()
    df["pattern"] = [_norm_pattern(p) for p in df["pattern"]]
    df["ablate"] = [_norm_ablate(a) for a in df["ablate"]]
    for col in ("sparsity", "steps", "eval_seqlen", *METRICS, *(c for c in df.columns if is_extra(c))):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["_T"] = df["steps"].fillna(-1).astype(int)
    df["_seq"] = df["eval_seqlen"].fillna(-1).astype(int)
    unstructured = df["pattern"] == "unstructured"
    df["_col"] = [_pct_label(s) if u else p for s, u, p in zip(df["sparsity"], unstructured, df["pattern"])]
    return df


# ---------------------------------------------------------------- formatting

def _fmt(v: float, kind: str) -> str:
    if v is None or math.isnan(v):
        return ""
    return f"{v * 100:.1f}%" if kind == "pct" else f"{v:.2f}"


def _fmt_diff(v: float, kind: str) -> str:
    return f"{v * 100:+.1f} pp" if kind == "pct" else f"{v:+.2f}"


def _aggregate(values: pd.Series, kind: str, seeds: bool, status: pd.Series | None = None
               ) -> tuple[str, float | None]:
    """Text and mean of the metric over the cells at one table position (see the module docstring)."""
    n_cells, v = len(values), values.dropna()
    k = len(v)
    failed = int((status == "failed").sum()) if status is not None else 0
    if k == 0:
        return ("failed" if failed == n_cells else f"failed ({failed} of {n_cells})") if failed else "", None
    mean = float(v.mean())
    if n_cells == 1 and not seeds:
        return _fmt(mean, kind), mean
    count = f"n={k}" if k == n_cells else f"n={k} of {n_cells}" + (f", {failed} failed" if failed else "")
    if k == 1:
        return f"{_fmt(mean, kind)} ({count})", mean
    sd = float(v.std(ddof=1))
    text = f"{sd * 100:.1f}" if kind == "pct" else f"{sd:.2f}"
    mean_text = f"{mean * 100:.1f}" if kind == "pct" else f"{mean:.2f}"
    return f"{mean_text} ± {text}{'%' if kind == 'pct' else ''} ({count})", mean


# ---------------------------------------------------------------- rows, scopes, published

@dataclass(frozen=True)
class _Row:
    label: str
    cells: pd.DataFrame  # the cells of this row, already in the table's scope
    metric: str
    kind: str = "ppl"  # "ppl" | "pct"
    method: str | None = None  # published method to compare with; None: never compared
    broadcast: bool = False  # dense: one value in every column


def _baseline_rows(cells: pd.DataFrame, dense: bool = True) -> list[_Row]:
    rows = []
    if dense and len(d := cells[cells["method"] == "dense"]):
        rows.append(_Row("dense", d, "ppl", method="dense", broadcast=True))
    if len(p := cells[cells["method"] == "pruned"]):
        rows.append(_Row("pruned", p, "ppl", method="pruned"))
    if len(lo := cells[cells["method"] == "lora"]):
        rows += [_Row("+LoRA (unmerged)", lo, "ppl_unmerged", method="lora"),
                 _Row("+LoRA (merged)", lo, "ppl", method="lora"),
                 _Row("+LoRA merged sparsity", lo, "achieved_sparsity", "pct", method="lora")]
    return rows


def _losa_rows(cells: pd.DataFrame, ablations: bool) -> list[_Row]:
    losa = cells[cells["method"] == "losa"]
    if not ablations:
        losa = losa[losa["ablate"] == ""]
    several_t = losa["_T"].nunique() > 1
    rows = []
    for ablate in sorted(losa["ablate"].unique(), key=_ablate_order):
        a = losa[losa["ablate"] == ablate]
        for t in sorted(a["_T"].unique()) if several_t else [None]:
            suffix = "" if t is None else f" (T={t if t >= 0 else '?'})"
            rows.append(_Row(_ablate_label(ablate) + suffix, a if t is None else a[a["_T"] == t], "ppl",
                             method="losa" if ablate == "" else None))
    return rows


def _step_rows(cells: pd.DataFrame) -> list[_Row]:
    losa = cells[(cells["method"] == "losa") & (cells["ablate"] == "")]
    return [_Row(f"T={t if t >= 0 else '?'}", losa[losa["_T"] == t], "ppl") for t in sorted(losa["_T"].unique())]


@dataclass(frozen=True)
class _Scope:
    model: str
    pruner: str
    seqlen: int  # -1: unknown
    suffix: str  # table-name suffix


def _scopes(df: pd.DataFrame) -> Iterator[tuple[_Scope, pd.DataFrame]]:
    """(model, pruner[, eval_seqlen]) scopes, each with its cells; dense cells join every pruner of their model."""
    for model in dict.fromkeys(df["model"]):
        mdf = df[df["model"] == model]
        seqs = sorted(mdf["_seq"].unique())
        for seq in seqs:
            sdf = mdf[mdf["_seq"] == seq]
            suffix = f"__seq{seq}" if len(seqs) > 1 else ""
            for pruner in sorted(set(sdf.loc[sdf["method"] != "dense", "pruner"])):
                cells = sdf[(sdf["method"] == "dense") | (sdf["pruner"] == pruner)]
                yield _Scope(model, pruner, int(seq), suffix), cells


class _Published:
    def __init__(self, published: pd.DataFrame):
        df = published.copy()
        for col in ("model", "method", "pruner", "pattern", "sparsity", "eval_seqlen", "metric", "value", "source"):
            if col not in df:
                df[col] = np.nan
        for col in ("model", "method", "pruner", "metric", "source"):
            df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
        df["method"] = df["method"].str.lower()
        df["metric"] = [_METRIC_ALIASES.get(m.lower(), m.lower()) for m in df["metric"]]
        df["pattern"] = [_norm_pattern(p) for p in df["pattern"]]
        for col in ("sparsity", "eval_seqlen", "value"):
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
        self.df = df

    def lookup(self, scope: _Scope, row: _Row, colmeta: dict[str, tuple[float, str]]
               ) -> tuple[dict[str, float], list[str]]:
        """Published value per column of ``row``, and notes on entries skipped for another eval_seqlen."""
        d = self.df
        cand = d[(d["model"] == scope.model) & (d["method"] == row.method) & (d["metric"] == row.metric)]
        if row.method != "dense":
            cand = cand[cand["pruner"] == scope.pruner]
        values, notes = {}, []
        for col, (sparsity, pattern) in colmeta.items():
            hit = cand
            if row.method != "dense":
                nm = pattern != "unstructured"
                same_sp = np.isclose(hit["sparsity"], sparsity, atol=1e-6) | (
                    (hit["sparsity"].isna() | math.isnan(sparsity)) if nm else False)
                hit = hit[(hit["pattern"] == pattern) & same_sp]
            same = hit[hit["eval_seqlen"] == scope.seqlen]
            if len(same):
                values[col] = float(same["value"].iloc[0])
            elif len(hit):
                other = ", ".join(f"{int(x)}" if not math.isnan(x) else "?" for x in hit["eval_seqlen"].unique())
                src = ", ".join(s for s in hit["source"].unique() if s)
                where = "" if row.broadcast else f" at {col}"
                notes.append(f"published {row.label}{where} ({src or 'no source'}) was measured at eval_seqlen "
                             f"{other}, ours at {scope.seqlen if scope.seqlen >= 0 else '?'}: not compared")
        return values, list(dict.fromkeys(notes))


# ---------------------------------------------------------------- building tables

def _columns(cells: pd.DataFrame) -> tuple[list[str], dict[str, tuple[float, str]]]:
    """Column labels (sparsities ascending, then patterns) and each column's (sparsity, pattern)."""
    nd = cells[cells["method"] != "dense"]
    meta = {}
    for col, sp, pat in zip(nd["_col"], nd["sparsity"], nd["pattern"]):
        meta.setdefault(col, (float(sp), pat))
    order = sorted(meta, key=lambda c: (0, np.nan_to_num(meta[c][0], nan=np.inf), "")
                   if meta[c][1] == "unstructured" else (1, *_pattern_order(meta[c][1])))
    return order, {c: meta[c] for c in order}


def _table(rows: list[_Row], cells: pd.DataFrame, scope: _Scope, published: _Published | None, seeds: bool,
           index_name: str, title: str, notes: list[str]) -> pd.DataFrame | None:
    columns, colmeta = _columns(cells)
    if not columns or not rows:
        return None
    body: dict[str, dict[str, str]] = {}
    notes = list(notes)
    for row in rows:
        if row.broadcast:
            text, mean = _aggregate(row.cells[row.metric], row.kind, seeds, row.cells["status"])
            texts, means = dict.fromkeys(columns, text), dict.fromkeys(columns, mean)
        else:
            texts, means = {}, {}
            for col, g in row.cells.groupby("_col", sort=False):
                texts[col], means[col] = _aggregate(g[row.metric], row.kind, seeds, g["status"])
        body[row.label] = texts
        if published is None or row.method is None:
            continue
        pub, skipped = published.lookup(scope, row, colmeta)
        notes += skipped
        if pub:
            body[f"{row.label} (published)"] = {c: _fmt(v, row.kind) for c, v in pub.items()}
            body[f"{row.label} (diff)"] = {c: _fmt_diff(means[c] - v, row.kind) for c, v in pub.items()
                                           if means.get(c) is not None}
    kinds = {"unstructured" == p for _, p in colmeta.values()}
    table = pd.DataFrame([[body[r].get(c, "") for c in columns] for r in body],
                         index=pd.Index(list(body), name=index_name),
                         columns=pd.Index(columns, name="sparsity" if kinds == {True} else
                                          "pattern" if kinds == {False} else "sparsity / pattern"), dtype=object)
    table.attrs = json.loads(json.dumps({"title": title, "model": scope.model, "pruner": scope.pruner,
                                         "eval_seqlen": scope.seqlen, "notes": list(dict.fromkeys(notes))}))
    return table


def build_tables(layout: str, results: pd.DataFrame, published: pd.DataFrame | None = None
                 ) -> dict[str, pd.DataFrame]:
    """Comparison tables of one layout, by name (``<layout>__<model>__<pruner>``).

    Args:
        layout: one of :data:`LAYOUTS`.
        results: one row per grid cell (columns as described in the module docstring; missing ones read as NaN).
        published: optional published numbers (``model, method, pruner, sparsity, pattern, eval_seqlen, metric,
            value, source``), shown as extra "(published)"/"(diff)" rows.

    Returns:
        Tables of strings; ``table.attrs`` holds ``title``, ``model``, ``pruner``, ``eval_seqlen`` and ``notes``.

    Raises:
        ValueError: unknown layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown table layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    df = _normalize(results)
    pub = _Published(published) if published is not None and len(published) else None
    unstructured = (df["pattern"] == "unstructured") | (df["method"] == "dense")
    if layout == "nm":
        df = df[(df["pattern"] != "unstructured") | (df["method"] == "dense")]
    elif layout in ("table1", "zeroshot", "seeds"):
        df = df[unstructured]

    rows_of: Callable[[pd.DataFrame], list[_Row]] = {
        "table1": lambda c: _baseline_rows(c) + _losa_rows(c, ablations=False),
        "zeroshot": lambda c: _baseline_rows(c) + _losa_rows(c, ablations=False),
        "seeds": lambda c: _baseline_rows(c) + _losa_rows(c, ablations=False),
        "nm": lambda c: _baseline_rows(c) + _losa_rows(c, ablations=True),
        "ablation": lambda c: _losa_rows(c, ablations=True),
        "steps": _step_rows,
    }[layout]
    what = {"zeroshot": "WikiText-2 perplexity", "seeds": "perplexity, mean ± sd over seeds",
            "ablation": "LoSA ablations, perplexity", "steps": "LoSA by number of DSA steps T, perplexity",
            "nm": "N:M sparsity, perplexity"}.get(layout, "WikiText-2 perplexity")
    if layout == "zeroshot" and _tasks(df):
        return _zeroshot_tables(df)
    tables = {}
    for scope, cells in _scopes(df):
        seq = f", eval_seqlen {scope.seqlen}" if scope.seqlen >= 0 else ""
        notes = [_ZEROSHOT_NOTE] if layout == "zeroshot" else []
        table = _table(rows_of(cells), cells, scope, pub, layout == "seeds",
                       "steps" if layout == "steps" else "method",
                       f"{what}: {scope.model}, {scope.pruner}{seq}", notes)
        if table is not None:
            tables[f"{layout}__{_slug(scope.model)}__{_slug(scope.pruner)}{scope.suffix}"] = table
    return tables


# ---------------------------------------------------------------- Table 2: zero-shot accuracy

def _tasks(df: pd.DataFrame) -> list[str]:
    """The zero-shot tasks with a result in the frame, in the paper's order (then any others)."""
    have = {c[3:] for c in df.columns if c.startswith("zs.") and c.count(".") == 1 and c not in ("zs.mean", "zs.n")
            and df[c].notna().any()}
    return [t for t in _TASK_LABELS if t in have] + sorted(have - set(_TASK_LABELS))


def _acc(cells: pd.DataFrame, metric: str, stderr: str | None, status: pd.Series) -> str:
    """Accuracy in points: one cell ``"62.3 ± 2.1"`` (lm-eval's stderr); several (seeds) ``"mean ± sd (n=k)"``."""
    v = pd.to_numeric(cells[metric], errors="coerce") if metric in cells else pd.Series(dtype=float)
    v = v.dropna()
    if not len(v):
        return "failed" if (status == "failed").any() else ""
    if len(v) == 1:
        se = cells[stderr].dropna() if stderr and stderr in cells else pd.Series(dtype=float)
        return f"{v.iloc[0] * 100:.1f}" + (f" ± {float(se.iloc[0]) * 100:.1f}" if len(se) else "")
    return f"{v.mean() * 100:.1f} ± {v.std(ddof=1) * 100:.1f} (n={len(v)})"


def _zeroshot_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The paper's Table 2: one table per model, pruner and sparsity; methods as rows (dense, pruned, +LoRA, +LoSA),
    tasks as columns, then the mean (of ``acc_norm`` where lm-eval reports it, else ``acc``), every accuracy with
    its stderr; size and speed columns when those stages ran."""
    tasks = _tasks(df)
    df = df[(df["ablate"] == "")]
    sizes = "export.ratio" in df and df["export.ratio"].notna().any()
    engines = sorted({c.split(".")[1] for c in df.columns if c.startswith("speed.") and c.endswith(".decode_speedup")
                      and df[c].notna().any()})
    tables = {}
    for model in dict.fromkeys(df["model"]):
        mdf = df[df["model"] == model]
        dense = mdf[mdf["method"] == "dense"]
        for pruner in sorted(set(mdf.loc[mdf["method"] != "dense", "pruner"])):
            pdf = mdf[(mdf["method"] != "dense") & (mdf["pruner"] == pruner)]
            for sparsity in sorted(pdf["sparsity"].dropna().unique()):
                cells = pdf[np.isclose(pdf["sparsity"], sparsity)]
                several_t = cells.loc[cells["method"] == "losa", "_T"].nunique() > 1
                groups = [("dense", dense)] + [(LABELS[m], cells[cells["method"] == m]) for m in
                                               ("pruned", "lora") if (cells["method"] == m).any()]
                losa = cells[cells["method"] == "losa"]
                groups += [(f"+LoSA (T={t})" if several_t else "+LoSA", losa[losa["_T"] == t])
                           for t in sorted(losa["_T"].unique())]
                body = {}
                for name, g in groups:
                    if not len(g):
                        continue
                    row = {_TASK_LABELS.get(t, t): _acc(g, f"zs.{t}", f"zs.{t}.stderr", g["status"]) for t in tasks}
                    row["Mean"] = _acc(g, "zs.mean", None, g["status"])
                    if sizes:
                        r = pd.to_numeric(g.get("export.ratio"), errors="coerce").dropna()
                        row["size (× dense)"] = f"{r.mean():.2f}×" if len(r) else ""
                    for e in engines:
                        r = pd.to_numeric(g.get(f"speed.{e}.decode_speedup"), errors="coerce").dropna()
                        row[f"decode × ({e})"] = f"{r.mean():.2f}×" if len(r) else ""
                    body[name] = row
                gain = _gain(groups)
                if gain is not None:  # the paper's headline form: LoSA's mean accuracy over the pruned model's
                    body["+LoSA − pruned (points)"] = {**{c: "" for c in next(iter(body.values()))},
                                                       "Mean": f"{gain:+.1f}"}
                columns = list(next(iter(body.values())))
                table = pd.DataFrame([[body[r][c] for c in columns] for r in body],
                                     index=pd.Index(list(body), name="method"),
                                     columns=pd.Index(columns, name="task"), dtype=object)
                n = pd.to_numeric(cells.get("zs.n"), errors="coerce").dropna() if "zs.n" in cells else []
                limit = f", {int(n.max())} documents per task at most" if len(n) else ""
                table.attrs = {"title": f"zero-shot accuracy (%, ± stderr): {model}, {pruner}, "
                                        f"{sparsity * 100:g}% sparsity{limit}", "model": model, "pruner": pruner,
                               "eval_seqlen": -1, "notes": [
                                   "Mean: over the tasks, acc_norm where lm-eval reports it (HellaSwag, ARC, OBQA, "
                                   "PIQA), else acc (method.md §6)."]}
                tables[f"zeroshot__{_slug(model)}__{_slug(pruner)}__{sparsity * 100:g}"] = table
    return tables


def _gain(groups: list[tuple[str, pd.DataFrame]]) -> float | None:
    """Mean accuracy of +LoSA minus pruned, in points (None unless both have it; one LoSA row only)."""
    means = {name: pd.to_numeric(g["zs.mean"], errors="coerce").dropna() if "zs.mean" in g else pd.Series(dtype=float)
             for name, g in groups}
    if len(means.get("+LoSA", [])) and len(means.get("pruned", [])):
        return float(means["+LoSA"].mean() - means["pruned"].mean()) * 100
    return None


# ---------------------------------------------------------------- writers

def _markdown(table: pd.DataFrame) -> str:
    def esc(x) -> str:
        return str(x).replace("|", "\\|")

    header = [esc(table.index.name or ""), *(esc(c) for c in table.columns)]
    body = [[esc(i), *(esc(v) for v in row)] for i, row in zip(table.index, table.itertuples(index=False))]
    widths = [max(len(r[j]) for r in [header, *body]) for j in range(len(header))]
    line = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "| " + " | ".join("-" * w if j == 0 else "-" * (w - 1) + ":" for j, w in enumerate(widths)) + " |"
    text = "\n".join([line(header), rule, *map(line, body)])
    if notes := table.attrs.get("notes"):
        text += "".join(f"\n\nNote: {n}" for n in notes)
    return text


def _latex(table: pd.DataFrame) -> str:
    def esc(x) -> str:
        s = str(x).replace("\\", r"\textbackslash{}")
        s = re.sub(r"([&%$#_{}])", r"\\\1", s).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")
        return s.replace("±", r"$\pm$")

    lines = [r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule",
             " & ".join([esc(table.index.name or ""), *map(esc, table.columns)]) + r" \\", r"\midrule"]
    lines += [" & ".join([esc(i), *map(esc, row)]) + r" \\"
              for i, row in zip(table.index, table.itertuples(index=False))]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par{{\footnotesize Note: {esc(n)}}}" for n in table.attrs.get("notes", [])]
    return "\n".join(lines) + "\n"


def results_markdown(tables: dict[str, pd.DataFrame], title: str = "") -> str:
    """All tables as one Markdown document: a ``##`` heading per table, its title, the table and its notes."""
    parts = [f"# {title}"] if title else []
    for name, table in tables.items():
        head = f"## {name}" + (f"\n\n{table.attrs['title']}" if table.attrs.get("title") else "")
        parts.append(f"{head}\n\n{_markdown(table)}")
    return "\n\n".join(parts) + "\n"


def write_tables(tables: dict[str, pd.DataFrame], out_dir: Path, title: str = "") -> list[Path]:
    """Write every table as ``<name>.{md,csv,parquet,tex}`` plus ``tables.md`` with all of them; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in tables.items():
        safe = table.astype(str)  # parquet-safe: every cell, label and header a string
        safe.columns = pd.Index([str(c) for c in table.columns], name=table.columns.name)
        safe.index = pd.Index([str(i) for i in table.index], name=table.index.name or "row")
        safe.attrs = dict(table.attrs)
        for suffix, write in ((".md", lambda p: p.write_text(_markdown(safe) + "\n")),
                              (".csv", lambda p: safe.to_csv(p)),
                              (".parquet", lambda p: safe.to_parquet(p)),
                              (".tex", lambda p: p.write_text(_latex(safe)))):
            path = out_dir / f"{name}{suffix}"
            write(path)
            paths.append(path)
    path = out_dir / "tables.md"
    path.write_text(results_markdown(tables, title))
    return [*paths, path]
