"""Bad input and too-small machines are refused before any compute, with one line per problem, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.preflight import PreflightError, cell_memory, model_shape, require
from flows.spec import load_grid
from losa.config import LosaConfig

TESTBED = str(Path(__file__).resolve().parents[2] / "testbed" / "model")


def _grid(tmp_path: Path, **raw) -> Path:
    base = {"name": "bad", "models": ["testbed"],
            "fixed": {"nsamples": 8, "seqlen": 64, "rmi_samples": 8, "eval_seqlen": 128, "steps": 2},
            "axes": {"method": ["pruned"]}}
    base.update(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_model_dependent_problems_are_one_line_each_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    state = tmp_path / "state"
    monkeypatch.setenv("LOSA_HOME", str(state))
    path = _grid(tmp_path, models=["testbed", "./no/such/model"],
                 fixed={"nsamples": 8, "seqlen": 64, "rmi_samples": 8, "eval_seqlen": 100_000},
                 axes={"pattern": ["2:4", "3:7"], "method": ["pruned"]})
    with pytest.raises(SystemExit) as exit_:
        main(["grid", str(path)])
    lines = str(exit_.value).splitlines()
    assert any("model path ./no/such/model does not exist" in x for x in lines)
    assert any("pattern 3:7: M = 7 must divide every prunable input width" in x and "is 688" in x for x in lines)
    assert sum("eval_seqlen = 100000 exceeds the model's context" in x for x in lines) == 2
    assert all(x.startswith(f"losa grid: {path}: ") for x in lines)
    assert not state.exists()  # no MLflow run, no artifact, no state folder


def test_an_explicit_rmi_subset_larger_than_the_calibration_set_is_refused(tmp_path):
    from flows.spec import GridSpecError

    path = _grid(tmp_path, fixed={"nsamples": 8, "seqlen": 64, "rmi_samples": 16})
    with pytest.raises(GridSpecError, match=r"rmi_samples \(16\) cannot exceed nsamples \(8\)"):
        load_grid(path).cells()


def test_the_resource_guard_refuses_a_cell_that_cannot_fit(tmp_path, monkeypatch):
    import psutil

    path = _grid(tmp_path, axes={"method": ["losa"]})
    require(load_grid(path))  # fits this machine
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=2**20))
    with pytest.raises(PreflightError, match=r"needs about .* GiB of memory .* 0\.0 GiB are available"):
        require(load_grid(path))
    monkeypatch.setenv("LOSA_SKIP_RESOURCE_GUARD", "1")
    require(load_grid(path))


def test_memory_estimate_grows_with_what_holds_memory():
    shape = model_shape(TESTBED)
    assert shape.layers > 0 and shape.params > 1_000_000
    small = cell_memory(shape, LosaConfig(method="losa", nsamples=8, seqlen=64))
    big = cell_memory(shape, LosaConfig(method="losa", nsamples=64, seqlen=256))
    assert big["dense outputs"] == 32 * small["dense outputs"] and big["pruning"] > small["pruning"]
    assert cell_memory(shape, LosaConfig(method="pruned"))["fine-tuning"] == 0


def test_a_grid_name_cannot_point_outside_the_state_folder(tmp_path):
    from flows.spec import GridSpecError

    path = tmp_path / "...yaml"  # stem "..": the name would make outputs/<name> the state folder's parent
    path.write_text(yaml.safe_dump({"name": "..", "models": ["testbed"], "axes": {"method": ["dense"]}}))
    with pytest.raises(GridSpecError, match="name"):
        load_grid(path)


def test_optional_stage_settings_are_checked_before_compute(tmp_path, monkeypatch):
    """speed: prefill + decode within the context; zeroshot: hub tasks refused offline; unknown task: by the schema."""
    state = tmp_path / "state"
    monkeypatch.setenv("LOSA_HOME", str(state))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fixed = {"nsamples": 8, "seqlen": 64, "rmi_samples": 8, "eval_seqlen": 128, "steps": 2,
             "speed": {"prefill": 4000}, "zeroshot": {"source": "hub"}}
    with pytest.raises(SystemExit) as exit_:
        main(["grid", str(_grid(tmp_path, fixed=fixed))])
    text = str(exit_.value)
    assert "speed.prefill + speed.decode = 4016 exceeds the model's context (2048 tokens)" in text
    assert "zeroshot.source = hub needs the Hugging Face hub" in text
    assert not state.exists()
    with pytest.raises(SystemExit, match=r"zeroshot.tasks.*mmlu|mmlu.*zeroshot"):
        main(["grid", str(_grid(tmp_path, fixed={**fixed, "zeroshot": {"tasks": ["boolq", "mmlu"]}}))])
