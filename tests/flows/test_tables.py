"""flows/tables.py: the comparison tables hold the input numbers, in the paper's row/column order, and every writer works."""

import math

import numpy as np
import pandas as pd
import pytest

from flows.plots import cell_plot_name, plot_allocation, plot_ppl_vs_sparsity
from flows.tables import LAYOUTS, build_tables, results_markdown, write_tables

MODEL = "testbed"
SEQ = 256
METHOD_OFFSET = {"pruned": 30.0, "lora": 8.0, "losa": 5.0}  # ppl = 10 + 10 * (10 * sparsity - 4) + offset (+1 sparsegpt)
ABLATE_OFFSET = {"": 0.0, "lsr": 1.0, "sra": 2.0, "dsa": 3.0, "lsr,sra": 4.0}
LABELS = {"": "+LoSA", "lsr": "-LSR", "sra": "-SRA", "dsa": "-DSA", "lsr,sra": "-LSR-SRA"}


def _ppl(method, pruner, sparsity, ablate=""):
    return 10 + 10 * (10 * sparsity - 4) + METHOD_OFFSET[method] + ABLATE_OFFSET[ablate] + (pruner == "sparsegpt")


def _cell(method, pruner="", sparsity=0.0, pattern="unstructured", ablate="", steps=1, seed=0, seq=SEQ, **metrics):
    label = {"dense": "dense", "pruned": "pruned", "lora": "+LoRA"}.get(method) or LABELS[ablate]
    row = dict(cell_id=f"{method}-{pruner}-{sparsity}-{pattern}-{ablate}-{steps}-{seed}", grid="g", model=MODEL,
               label=label, method=method, pruner=pruner, sparsity=sparsity, pattern=pattern, ablate=ablate,
               steps=steps, seed=seed, eval_seqlen=seq, ppl=np.nan, ppl_pruned=np.nan, ppl_unmerged=np.nan,
               achieved_sparsity=sparsity, sparsity_before_merge=np.nan, trainable_params=0)
    return row | metrics


@pytest.fixture
def results():
    """2 pruners x 2 sparsities x every method and ablation, a second seed, failed cells and some N:M cells."""
    rows = [_cell("dense", ppl=10.0, achieved_sparsity=0.0)]
    for pruner in ("wanda", "sparsegpt"):
        for sp in (0.5, 0.6):
            rows.append(_cell("pruned", pruner, sp, ppl=_ppl("pruned", pruner, sp)))
            rows.append(_cell("lora", pruner, sp, ppl=_ppl("lora", pruner, sp), ppl_unmerged=_ppl("lora", pruner, sp) - 1,
                              achieved_sparsity=0.123, sparsity_before_merge=sp, ppl_pruned=_ppl("pruned", pruner, sp)))
            for ablate in ABLATE_OFFSET:
                rows.append(_cell("losa", pruner, sp, ablate=ablate, steps=5, ppl=_ppl("losa", pruner, sp, ablate)))
    rows.append(_cell("losa", "wanda", 0.5, steps=5, seed=1, ppl=_ppl("losa", "wanda", 0.5) + 1))  # second seed
    rows.append(_cell("pruned", "sparsegpt", 0.5, seed=1, ppl=np.nan))  # a failed second seed
    df = pd.DataFrame(rows)
    df.loc[(df.method == "lora") & (df.pruner == "sparsegpt") & (df.sparsity == 0.6), "ppl"] = np.nan  # failed merge
    nm = [_cell("pruned", "wanda", s, p, ppl=v) for p, s, v in
          (("2:4", 0.5, 70.0), ("mixed-2:8", 0.75, 95.0), ("2:8", 0.75, 90.0), ("4:8", 0.5, 60.0))]
    nm.append(_cell("losa", "wanda", 0.5, "2:4", steps=5, ppl=33.0))
    return pd.concat([df, pd.DataFrame(nm)], ignore_index=True)


def test_table1_rows_columns_and_values(results):
    tables = build_tables("table1", results)
    assert list(tables) == ["table1__testbed__sparsegpt", "table1__testbed__wanda"]
    t = tables["table1__testbed__wanda"]
    assert list(t.index) == ["dense", "pruned", "+LoRA (unmerged)", "+LoRA (merged)", "+LoRA merged sparsity", "+LoSA"]
    assert list(t.columns) == ["50%", "60%"]  # N:M cells stay out of table1
    assert list(t.loc["dense"]) == ["10.00", "10.00"]  # dense: its value in every column
    assert t.loc["pruned", "60%"] == f"{_ppl('pruned', 'wanda', 0.6):.2f}" == "60.00"
    assert t.loc["+LoRA (unmerged)", "50%"] == f"{_ppl('lora', 'wanda', 0.5) - 1:.2f}"
    assert t.loc["+LoRA merged sparsity", "50%"] == "12.3%"
    assert t.loc["+LoSA", "60%"] == f"{_ppl('losa', 'wanda', 0.6):.2f}"


def test_seeds_and_failed_cells_are_shown_not_crashed(results):
    t = build_tables("table1", results)["table1__testbed__wanda"]
    mean, sd = np.mean([25.0, 26.0]), np.std([25.0, 26.0], ddof=1)
    assert t.loc["+LoSA", "50%"] == f"{mean:.2f} ± {sd:.2f} (n=2)" == "25.50 ± 0.71 (n=2)"
    s = build_tables("table1", results)["table1__testbed__sparsegpt"]
    assert s.loc["+LoRA (merged)", "60%"] == ""  # NaN metric: empty cell
    assert s.loc["pruned", "50%"] == f"{_ppl('pruned', 'sparsegpt', 0.5):.2f} (n=1 of 2)"

    seeds = build_tables("seeds", results)["seeds__testbed__wanda"]
    assert seeds.loc["pruned", "60%"] == "60.00 (n=1)"
    assert seeds.loc["+LoSA", "50%"] == "25.50 ± 0.71 (n=2)"
    assert all("(n=" in v for v in seeds.to_numpy().ravel() if v)


def test_published_beside_ours_only_at_the_same_eval_seqlen(results):
    published = pd.DataFrame([
        dict(model=MODEL, method="pruned", pruner="wanda", sparsity=0.5, pattern="unstructured", eval_seqlen=SEQ,
             metric="ppl", value=48.5, source="paper T1"),
        dict(model=MODEL, method="dense", pruner=None, sparsity=0.0, pattern=None, eval_seqlen=SEQ,
             metric="ppl", value=9.5, source="paper T1"),
        dict(model=MODEL, method="losa", pruner="wanda", sparsity=0.6, pattern="unstructured", eval_seqlen=2048,
             metric="ppl", value=30.0, source="paper T1"),
        dict(model=MODEL, method="pruned", pruner="sparsegpt", sparsity=0.5, pattern="unstructured", eval_seqlen=SEQ,
             metric="ppl", value=1.0, source="other pruner"),
    ])
    t = build_tables("table1", results, published)["table1__testbed__wanda"]
    assert list(t.index[:5]) == ["dense", "dense (published)", "dense (diff)", "pruned", "pruned (published)"]
    assert t.loc["pruned (published)", "50%"] == "48.50"
    assert t.loc["pruned (published)", "60%"] == ""
    assert t.loc["pruned (diff)", "50%"] == f"{_ppl('pruned', 'wanda', 0.5) - 48.5:+.2f}" == "+1.50"
    assert list(t.loc["dense (diff)"]) == ["+0.50", "+0.50"]
    assert "+LoSA (published)" not in t.index  # measured at eval_seqlen 2048, ours at 256
    assert any("2048" in n and "not compared" in n for n in t.attrs["notes"])
    ablation = build_tables("ablation", results, published)["ablation__testbed__wanda"]
    assert not any("(published)" in r for r in ablation.index)


def test_other_layouts(results):
    nm = build_tables("nm", results)["nm__testbed__wanda"]
    assert list(nm.columns) == ["2:4", "4:8", "2:8", "mixed-2:8"]
    assert list(nm.index) == ["dense", "pruned", "+LoSA"]
    assert nm.loc["pruned", "mixed-2:8"] == "95.00" and nm.loc["+LoSA", "4:8"] == ""
    assert list(build_tables("nm", results)) == ["nm__testbed__wanda"]  # no N:M cells for sparsegpt

    ab = build_tables("ablation", results)["ablation__testbed__sparsegpt"]
    assert list(ab.index) == ["+LoSA", "-LSR", "-SRA", "-DSA", "-LSR-SRA"]
    assert ab.loc["-SRA", "60%"] == f"{_ppl('losa', 'sparsegpt', 0.6, 'sra'):.2f}"

    zs = build_tables("zeroshot", results)["zeroshot__testbed__wanda"]
    assert zs.equals(build_tables("table1", results)["table1__testbed__wanda"])
    assert any("zero-shot" in n for n in zs.attrs["notes"])

    with pytest.raises(ValueError, match="table1.*steps"):
        build_tables("table9", results)


def test_steps_layout_and_several_t_in_table1():
    rows = [_cell("losa", "wanda", sp, steps=t, ppl=20.0 + t + sp) for t in (3, 1, 2) for sp in (0.5, 0.7)]
    df = pd.DataFrame(rows)
    steps = build_tables("steps", df)["steps__testbed__wanda"]
    assert list(steps.index) == ["T=1", "T=2", "T=3"] and list(steps.columns) == ["50%", "70%"]
    assert steps.loc["T=2", "70%"] == "22.70"
    assert list(build_tables("table1", df)["table1__testbed__wanda"].index) == [
        "+LoSA (T=1)", "+LoSA (T=2)", "+LoSA (T=3)"]
    two_lengths = pd.DataFrame([_cell("pruned", "wanda", 0.5, seq=s, ppl=40.0) for s in (256, 2048)])
    assert sorted(build_tables("table1", two_lengths)) == ["table1__testbed__wanda__seq2048",
                                                           "table1__testbed__wanda__seq256"]


def test_sparse_inputs_never_crash():
    bare = pd.DataFrame([dict(model="m", method="pruned", pruner="wanda", sparsity=0.5),
                         dict(model="m", method="lora", pruner="wanda", sparsity=0.5, ppl=None)])
    for layout in LAYOUTS:
        build_tables(layout, bare)
    t = build_tables("table1", bare)["table1__m__wanda"]
    assert t.loc["pruned", "50%"] == "" and t.loc["+LoRA (merged)", "50%"] == ""
    assert build_tables("table1", bare.iloc[:0]) == {}


def test_writers(results, tmp_path):
    tables = build_tables("seeds", results) | build_tables("table1", results)
    paths = write_tables(tables, tmp_path / "out", title="testbed grid")
    assert len(paths) == 4 * len(tables) + 1 and all(p.exists() and p.stat().st_size > 0 for p in paths)
    for name, table in tables.items():
        back = pd.read_parquet(tmp_path / "out" / f"{name}.parquet")
        assert back.shape == table.shape and list(back.index) == list(table.index)
        assert pd.read_csv(tmp_path / "out" / f"{name}.csv", index_col=0, keep_default_na=False).shape == table.shape
    tex = (tmp_path / "out" / "seeds__testbed__wanda.tex").read_text()
    assert r"\begin{tabular}{lrr}" in tex and r"25.50 $\pm$ 0.71 (n=2)" in tex and r"50\%" in tex
    md = (tmp_path / "out" / "tables.md").read_text()
    assert md.startswith("# testbed grid") and "## table1__testbed__wanda" in md and "## seeds__testbed__sparsegpt" in md
    assert md == results_markdown(tables, "testbed grid")
    one = results_markdown({"t": tables["table1__testbed__wanda"]})
    assert one.splitlines()[4].startswith("| method") and "| +LoSA " in one


def _is_png(path):
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_plots(results, tmp_path):
    assert _is_png(plot_ppl_vs_sparsity(results, tmp_path / "ppl.png"))
    assert _is_png(plot_ppl_vs_sparsity(results.iloc[:0], tmp_path / "empty.png"))
    steps = [dict(t=t, theta=0.5 * t / 3, omega=5 + t, cka=None, importance=None,
                  rates=[0.1 * t + 0.05 * b for b in range(4)], patterns=["unstructured"] * 4, errors=[0.1] * 4,
                  ranks=[6 + b for b in range(4)], applied_ranks=[min(8, 6 + b) for b in range(4)],
                  achieved_sparsity=0.5 * t / 3, train_losses=[3.0], timings={}) for t in (1, 2, 3)]
    report = dict(config=dict(method="losa", pruner="wanda", sparsity=0.5), steps=steps,
                  layer_sparsity={"0.q_proj": 0.5}, ppl=20.0)
    assert _is_png(plot_allocation(report, tmp_path / "alloc.png"))
    assert _is_png(plot_allocation(dict(steps=[]), tmp_path / "alloc-empty.png"))
    assert not math.isnan(report["ppl"])
    from flows.plots import plot_loss, plot_lsr

    for s, losses in zip(steps, ([4.0, 3.5], [3.9, 3.4, 3.2], [3.6, 3.1])):
        s["train_losses"] = losses
        s["cka"] = [[1.0, 0.97, 0.95], [0.97, 1.0, 0.99], [0.95, 0.99, 1.0]]
    assert _is_png(plot_loss(report, tmp_path / "loss.png")) and _is_png(plot_lsr(report, tmp_path / "lsr.png"))
    assert _is_png(plot_loss(dict(steps=[]), tmp_path / "loss-empty.png"))


def test_imports_no_orchestration_or_tracking():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, flows.tables; print(sorted(m for m in ('prefect', 'mlflow', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_results_frame_comes_from_typed_cells():
    from flows.spec import Cell
    from flows.tables import COLUMNS, results_frame
    from losa.config import LosaConfig

    cells = [Cell(model="m", config=LosaConfig.canonical({"method": "dense"})),
             Cell(model="m", config=LosaConfig.canonical({"method": "losa", "ablate": ["sra", "lsr"], "steps": 3}))]
    frame = results_frame(cells, {cells[1].id: {"ppl": 12.5, "run_id": "r1", "grid": "g"}})
    assert list(frame.columns) == COLUMNS
    assert list(frame.label) == ["dense", "-LSR-SRA"] and list(frame.ablate) == ["", "lsr,sra"]
    assert math.isnan(frame.ppl[0]) and frame.ppl[1] == 12.5 and frame.run_id[1] == "r1"
    (table,) = build_tables("ablation", frame).values()
    assert list(table.index) == ["-LSR-SRA"]  # the table's row label is the cell's


def test_cell_plots_are_named_by_the_cell_not_a_hash():
    assert cell_plot_name("allocation", "testbed wanda 70% unstructured +LoSA T=3 seed 0") == \
        "allocation_testbed-wanda-70pct-unstructured-LoSA-T-3-seed-0.png"
    assert cell_plot_name("cka_errors", "testbed wanda 70% unstructured -LSR-SRA T=3 seed 0") == \
        "cka_errors_testbed-wanda-70pct-unstructured-LSR-SRA-T-3-seed-0.png"


def test_a_failed_cell_reads_failed_never_blank_or_a_number():
    from flows.spec import Cell
    from flows.tables import build_tables, results_frame
    from losa.config import LosaConfig

    cells = [Cell(model="m", config=LosaConfig.canonical({"method": m, "sparsity": 0.7})) for m in ("pruned", "lora")]
    frame = results_frame(cells, {cells[0].id: {"ppl": 99.0, "achieved_sparsity": 0.7, "status": "finished"},
                                  cells[1].id: {"status": "failed", "failure": "Diverged: training loss is nan"}})
    table = next(iter(build_tables("table1", frame).values()))
    assert table.loc["pruned", "70%"] == "99.00" and table.loc["+LoRA (merged)", "70%"] == "failed"


def test_table2_layout_accuracies_with_stderr_mean_gain_size_and_speed():
    """The paper's Table 2: per model, pruner and sparsity; methods x tasks, then the mean; lm-eval's stderr beside
    each accuracy; two seeds as mean ± sd; LoSA's gain over pruned; size and speed columns when measured."""
    def zs(acc: float, **extra):
        return {"zs.boolq": acc, "zs.boolq.stderr": 0.02, "zs.arc_easy": acc / 2, "zs.arc_easy.stderr": 0.01,
                "zs.mean": acc * 0.75, "zs.n": 50, **extra}

    rows = [_cell("dense", **zs(0.80, **{"export.ratio": 1.0})),
            _cell("pruned", "wanda", 0.7, **zs(0.60, **{"export.ratio": 0.5, "speed.csr.decode_speedup": 0.2})),
            _cell("lora", "wanda", 0.7, **zs(0.62)),
            _cell("losa", "wanda", 0.7, steps=5, **zs(0.70)),
            _cell("losa", "wanda", 0.7, steps=5, seed=1, **zs(0.74)),
            _cell("losa", "wanda", 0.5, steps=5, status="failed")]
    tables = build_tables("zeroshot", pd.DataFrame(rows))
    assert sorted(tables) == ["zeroshot__testbed__wanda__50", "zeroshot__testbed__wanda__70"]
    t = tables["zeroshot__testbed__wanda__70"]
    assert list(t.columns) == ["BoolQ", "ARC-e", "Mean", "size (× dense)", "decode × (csr)"]
    assert list(t.index) == ["dense", "pruned", "+LoRA", "+LoSA", "+LoSA − pruned (points)"]
    assert t.loc["pruned", "BoolQ"] == "60.0 ± 2.0" and t.loc["pruned", "ARC-e"] == "30.0 ± 1.0"
    assert t.loc["+LoSA", "BoolQ"] == "72.0 ± 2.8 (n=2)"  # two seeds: mean ± sd
    assert t.loc["pruned", "Mean"] == "45.0" and t.loc["+LoSA − pruned (points)", "Mean"] == "+9.0"
    assert t.loc["pruned", "size (× dense)"] == "0.50×" and t.loc["pruned", "decode × (csr)"] == "0.20×"
    assert t.loc["+LoRA", "size (× dense)"] == ""
    assert "50 documents per task" in t.attrs["title"]
    assert tables["zeroshot__testbed__wanda__50"].loc["+LoSA", "BoolQ"] == "failed"
