"""The ``losa`` command on the committed testbed (small calibration and evaluation budgets)."""

import json
from pathlib import Path

import pandas as pd
import pytest

import losa
from flows.cli import main

QUICK = ["--nsamples", "8", "--seqlen", "64", "--eval-seqlen", "128", "--eval-windows", "8"]


def test_prune_prints_sparsity_and_perplexity(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["prune", "--method", "wanda", "--sparsity", "0.8", *QUICK, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "wanda unstructured" in printed
    report = json.loads(out.read_text())
    assert report["sparsity"] == pytest.approx(0.8, abs=2e-3)
    assert all(abs(layer["sparsity"] - 0.8) < 2e-3 for layer in report["layers"])
    assert report["ppl"] > report["dense_ppl"] > 1
    assert f"{report['ppl']:.3f}" in printed and f"{report['sparsity']:.4f}" in printed


def test_prune_two_four(tmp_path):
    out = tmp_path / "report.json"
    assert main(["prune", "--method", "sparsegpt", "--pattern", "2:4", *QUICK, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sparsity"] == 0.5 and report["patterns"][0] == "2:4"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pattern", "4:4"], "0 < N < M"),
        (["--method", "obs"], "unknown method"),
        (["--sparsity", "1.5"], "[0, 1)"),
        (["--sparsity", "0.1,0.2"], "2 rates for"),
        (["--pattern", "2:4", "--sparsity", "0.7"], "contradicts"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
    ],
)
def test_bad_arguments_fail_before_any_compute(argv, message, monkeypatch):
    monkeypatch.setattr(losa, "load_model", lambda *a, **k: pytest.fail("loaded a model despite bad arguments"))
    with pytest.raises(SystemExit) as err:
        main(["prune", *argv])
    assert message in str(err.value)


def test_table_writes_one_row_per_cell(tmp_path):
    csv = tmp_path / "t.csv"
    assert main(["table", "--methods", "magnitude,wanda", "--settings", "0.5,2:4", *QUICK, "--csv", str(csv)]) == 0
    df = pd.read_csv(csv)
    assert list(df["method"]) == ["dense", "magnitude", "magnitude", "wanda", "wanda"]
    assert (df["ppl"] > 1).all() and df["ppl"].notna().all()
    assert df["sparsity"][1:].round(3).tolist() == [0.5] * 4
