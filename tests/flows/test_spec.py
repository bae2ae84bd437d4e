"""Grids as data (flows/spec.py): shipped grids load, cells are canonical with stable ids, bad grids fail early."""

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from flows import spec
from flows.spec import Cell, Grid, GridSpecError, list_grids, load_grid
from losa.config import LosaConfig
from losa.finetune import FinetuneConfig

SHIPPED = ["ablation", "nm", "seeds", "steps", "table1-ppl", "table2-zeroshot", "testbed", "testbed-ablation",
           "testbed-nm", "testbed-seeds", "testbed-steps", "testbed-table1-ppl", "testbed-table2-zeroshot",
           "smollm2", "smollm2-table1-ppl", "smollm2-ablation", "smollm2-steps", "smollm2-nm", "smollm2-seeds"]
TESTBED_BUDGET = dict(nsamples=32, seqlen=128, calib_batch_size=16, rmi_samples=16, train_steps=4,
                      final_train_steps=12, eval_seqlen=256, eval_batch_size=8, eval_windows=64)
SMOLLM2_BUDGET = dict(nsamples=16, seqlen=128, calib_batch_size=16, rmi_samples=16, eval_seqlen=256,
                      eval_batch_size=8, eval_windows=16)


@pytest.fixture(scope="module")
def grids() -> dict[str, Grid]:
    return {name: load_grid(name) for name in list_grids()}


def write(tmp_path, text: str, name: str = "bad"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def grid_from(tmp_path, body: str, name: str = "g") -> Grid:
    return load_grid(write(tmp_path, "models: [testbed]\n" + textwrap.dedent(body), name))


# --- shipped grids -----------------------------------------------------------------------------------------------

def test_every_required_grid_ships_and_loads(grids):
    assert set(SHIPPED) <= set(grids), sorted(set(SHIPPED) - set(grids))
    for name, grid in grids.items():
        cells = grid.cells()
        assert grid.name == name and grid.path == spec.GRIDS_DIR / f"{name}.yaml"
        assert cells and len({c.id for c in cells}) == len(cells), name
        for p in grid.published:  # each published number sits beside a cell of its grid
            assert any(p.matches(c) for c in cells), (name, p)


def test_testbed_grids_use_the_cpu_budget_and_paper_grids_the_official_settings(grids):
    for name, grid in grids.items():
        testbed = name.startswith("testbed")
        assert (grid.models == ["testbed"]) == testbed, name
        if name.startswith("smollm2"):
            continue  # the real model's CPU budget: test_smollm2_grids_share_one_budget
        assert not (testbed and grid.published), "no published numbers exist for the testbed"
        for c in grid.cells():
            if testbed:
                assert {k: getattr(c.config, k) for k in TESTBED_BUDGET} == TESTBED_BUDGET, c.describe()
                assert (c.config.finetune.batch_size, c.config.finetune.seqlen) == (4, 128)
            else:
                assert (c.config.nsamples, c.config.seqlen, c.config.train_data) == (128, 2048, "alpaca")
                assert c.config.eval_seqlen == (2048 if c.model == "facebook/opt-6.7b" else 4096)
                if c.config.method == "losa" and name != "steps":
                    assert c.config.steps == 5


def test_smollm2_grids_share_one_budget(grids):
    """Every smollm2 grid has the same calibration / evaluation budget and 8 optimiser steps of 4 x 128 tokens per
    fine-tuned cell (however T splits them), so cells shared between grids are computed once."""
    smol = {n: g for n, g in grids.items() if n.startswith("smollm2")}
    assert len(smol) >= 6
    ft = {(c.config.finetune.batch_size, c.config.finetune.seqlen, c.config.finetune.lr)
          for g in smol.values() for c in g.cells()}
    assert len(ft) == 1, ft
    for name, grid in smol.items():
        assert grid.models == ["smollm2-135m"] and not grid.published, name
        for c in grid.cells():
            assert {k: getattr(c.config, k) for k in SMOLLM2_BUDGET} == SMOLLM2_BUDGET, c.describe()
            if c.config.method in ("lora", "losa"):
                cfg = c.config
                assert (cfg.steps - 1) * cfg.train_steps + cfg.final_train_steps == 8, c.describe()
    main = smol["smollm2"].cells()
    assert Counter(c.label for c in main) == {"dense": 1, "pruned": 4, "+LoRA": 4, "+LoSA": 4, "-LSR": 2,
                                              "-SRA": 2, "-DSA": 2}
    seeds = Counter(c.config.seed for c in smol["smollm2-seeds"].cells() if c.config.method != "dense")
    assert seeds == {0: 6, 1: 6, 2: 6}
    # the cells of the main job are the seed-0 cells of the other grids: one computation each
    main_ids = {c.id for c in main}
    for name in ("smollm2-ablation", "smollm2-seeds"):
        shared = {c.id for c in smol[name].cells() if c.config.seed == 0 and c.config.sparsity == 0.7}
        assert shared <= main_ids, name


def test_testbed_grid_rows(grids):
    cells = grids["testbed"].cells()
    assert len(cells) == 19
    assert Counter(c.label for c in cells) == {"dense": 1, "pruned": 4, "+LoRA": 4, "+LoSA": 4, "-LSR": 2,
                                               "-SRA": 2, "-DSA": 2}
    assert {c.config.sparsity for c in cells if c.label.startswith("-")} == {0.7}
    assert {c.config.pruner for c in cells if c.label.startswith("-")} == {"wanda", "sparsegpt"}
    assert grids["testbed"].table == "table1"


def test_small_testbed_grids_stay_small(grids):
    for name in ("testbed-nm", "testbed-steps", "testbed-seeds"):
        assert len(grids[name].cells()) <= 17, name
    assert {c.config.seed for c in grids["testbed-seeds"].cells() if c.config.method != "dense"} == {0, 1, 2}
    assert {c.config.steps for c in grids["testbed-steps"].cells() if c.config.method == "losa"} == {1, 2, 3, 5, 8}


def _method_id(cell: Cell) -> str:
    """The id of a cell without its optional evaluation stages: what its pruning and fine-tuning depend on."""
    return Cell(model=cell.model, config=cell.config.model_copy(update={"zeroshot": None, "export": None,
                                                                       "speed": None})).id


def test_zeroshot_grids_share_cells_with_the_perplexity_grids(grids):
    pairs = (("table1-ppl", "table2-zeroshot"), ("testbed-table1-ppl", "testbed-table2-zeroshot"),
             ("smollm2-table1-ppl", "smollm2-table2-zeroshot"))
    for a, b in pairs:
        ids = {_method_id(c) for c in grids[a].cells()}
        assert {_method_id(c) for c in grids[b].cells()} <= ids  # the same cells (the SmolLM2 one: 50 and 70 %)
        assert all(c.config.zeroshot is not None for c in grids[b].cells())  # ... scored zero-shot
        assert (grids[a].table, grids[b].table) == ("table1", "zeroshot")
    assert [_method_id(c) for c in grids["table1-ppl"].cells()] == [_method_id(c) for c in
                                                                    grids["table2-zeroshot"].cells()]


def test_dense_cell_is_shared_by_every_testbed_grid(grids):
    dense = {n: [_method_id(c) for c in g.cells() if c.config.method == "dense"] for n, g in grids.items()
             if n.startswith("testbed") and n != "testbed-ablation"}
    assert all(len(v) == 1 for v in dense.values()) and len({v[0] for v in dense.values()}) == 1, dense


def test_published_numbers_land_on_their_cells(grids):
    grid = grids["table1-ppl"]
    wanda50 = [c for c in grid.cells() if c.model == "meta-llama/Llama-2-7b-hf" and c.config.method == "pruned"
               and c.config.pruner == "wanda" and c.config.sparsity == 0.5]
    assert [p.value for p in grid.published_for(wanda50[0])] == [6.42]
    nm = grids["nm"]
    two4 = [c for c in nm.cells() if c.model == "meta-llama/Llama-2-13b-hf" and c.config.method == "pruned"
            and c.config.pruner == "sparsegpt" and c.config.pattern == "2:4"]
    assert [p.value for p in nm.published_for(two4[0])] == [8.32]


def test_ids_are_stable_across_loads_and_processes(grids):
    again = load_grid("testbed")
    assert [c.id for c in again.cells()] == [c.id for c in grids["testbed"].cells()]
    # load flows/spec.py on its own (not through flows/__init__.py) to see what it imports
    code = ("import importlib.util, json, sys; "
            "s = importlib.util.spec_from_file_location('spec_alone', 'flows/spec.py'); "
            "m = importlib.util.module_from_spec(s); sys.modules['spec_alone'] = m; s.loader.exec_module(m); "
            "print(json.dumps([[c.id for c in m.load_grid('testbed').cells()], "
            "sorted(x for x in ('prefect', 'mlflow') if x in sys.modules)]))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], cwd=spec.PROJECT_ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    ids, heavy = json.loads(out.strip().splitlines()[-1])
    assert ids == [c.id for c in grids["testbed"].cells()]
    assert heavy == [], "flows/spec.py must not import prefect or mlflow"


def test_id_is_sha256_of_canonical_json():
    import hashlib

    cell = Cell(model="testbed", config=LosaConfig(sparsity=0.5))
    text = json.dumps({"model": "testbed", "config": cell.config.identity()}, sort_keys=True,
                      separators=(",", ":"))
    assert cell.id == hashlib.sha256(text.encode()).hexdigest()[:12]
    # unset evaluation stages stay out of the identity, so cells named before they existed keep their ids
    from losa.config import EVALUATIONS, ZeroShotConfig

    assert set(cell.config.model_dump()) - set(cell.config.identity()) == set(EVALUATIONS)
    with_zs = Cell(model="testbed", config=LosaConfig(sparsity=0.5, zeroshot=ZeroShotConfig(limit=10)))
    assert with_zs.id != cell.id and with_zs.config.identity()["zeroshot"]["limit"] == 10
    assert cell.id != Cell(model="other", config=cell.config).id
    assert cell.id != Cell(model="testbed", config=LosaConfig(sparsity=0.6)).id


# --- canonical form ----------------------------------------------------------------------------------------------

def test_dense_cells_are_canonical_and_deduplicated(tmp_path):
    g = grid_from(tmp_path, """
        fixed: {steps: 3}
        axes:
          sparsity: [0.5, 0.7]
          pruner: [wanda, sparsegpt]
          method: [dense, pruned]
          ablate: [[], [lsr]]
        """)
    dense = [c for c in g.cells() if c.config.method == "dense"]
    assert len(dense) == 1 and len(g.cells()) == 5
    d = dense[0].config
    assert (d.sparsity, d.steps, d.pruner, d.pattern, d.ablate) == (0.0, 1, "wanda", "unstructured", ())
    assert dense[0].label == "dense" and dense[0].describe() == "testbed dense seed 0"


def test_nm_pattern_sets_sparsity_and_baselines_prune_uniformly(tmp_path):
    g = grid_from(tmp_path, """
        fixed: {steps: 3}
        axes:
          pattern: ["2:4", "2:8", "mixed-2:8"]
          method: [pruned, lora, losa]
        """)
    got = {(c.config.method, c.config.pattern): c.config.sparsity for c in g.cells()}
    assert got == {("pruned", "2:4"): 0.5, ("lora", "2:4"): 0.5, ("losa", "2:4"): 0.5,
                   ("pruned", "2:8"): 0.75, ("lora", "2:8"): 0.75, ("losa", "2:8"): 0.75,
                   ("losa", "mixed-2:8"): 0.75}  # pruned/lora at mixed-2:8 are the uniform 2:8 cells


def test_baselines_drop_ablations_and_pruned_has_one_step(tmp_path):
    g = grid_from(tmp_path, """
        fixed: {steps: 3, sparsity: 0.7}
        axes:
          method: [pruned, lora, losa]
          ablate: [[], [dsa, lsr], [dsa]]
        """)
    by = {c.label: c.config for c in g.cells()}
    assert sorted(by) == sorted(["pruned", "+LoRA", "+LoSA", "-LSR-DSA", "-DSA"])
    assert (by["pruned"].steps, by["pruned"].ablate) == (1, ())
    # LoRA keeps T: with text data its training budget is that of a T-step LoSA run
    assert (by["+LoRA"].steps, by["+LoRA"].ablate) == (3, ())
    assert by["-LSR-DSA"].ablate == ("lsr", "dsa") and by["-DSA"].steps == 3


def test_describe():
    cell = Cell(model="testbed", config=LosaConfig(pruner="wanda", sparsity=0.7, steps=3))
    assert cell.describe() == "testbed wanda 70% unstructured +LoSA T=3 seed 0"
    pruned = Cell(model="m", config=LosaConfig(method="pruned", pruner="sparsegpt", pattern="2:8", sparsity=0.75,
                                               seed=4))
    assert pruned.describe() == "m sparsegpt 75% 2:8 pruned seed 4"


# --- include / exclude -------------------------------------------------------------------------------------------

def test_include_and_exclude(tmp_path):
    g = load_grid(write(tmp_path, """
        models: [a, b]
        fixed: {method: pruned, nsamples: 8, finetune: {batch_size: 2}}
        axes:
          pruner: [wanda, sparsegpt]
          sparsity: [0.5, 0.7]
        exclude:
          - {pruner: sparsegpt, sparsity: 0.5}
          - {model: b, pruner: wanda}
        include:
          - {method: dense}
          - {model: c, method: losa, sparsity: 0.9, finetune.lr: 1.0e-4}
          - {model: a, pruner: sparsegpt, sparsity: 0.5}
        """, "inc"))
    got = [(c.model, c.config.method, c.config.pruner, c.config.sparsity) for c in g.cells()]
    assert got == [("a", "pruned", "wanda", 0.5), ("a", "pruned", "wanda", 0.7), ("a", "pruned", "sparsegpt", 0.7),
                   ("a", "dense", "wanda", 0.0),
                   ("b", "pruned", "sparsegpt", 0.7), ("b", "dense", "wanda", 0.0),
                   ("c", "losa", "wanda", 0.9),
                   ("a", "pruned", "sparsegpt", 0.5)]  # include is not subject to exclude
    c = g.cells()[6]
    assert (c.config.nsamples, c.config.finetune.batch_size, c.config.finetune.lr) == (8, 2, 1e-4)


def test_grid_without_axes(tmp_path):
    assert [c.label for c in grid_from(tmp_path, "fixed: {method: pruned}\n", "one").cells()] == ["pruned"]
    only = grid_from(tmp_path, "include: [{method: dense}, {method: lora, sparsity: 0.5}]\n", "only")
    assert [c.describe() for c in only.cells()] == ["testbed dense seed 0",
                                                    "testbed wanda 50% unstructured +LoRA T=5 seed 0"]


def test_cell_lookup(grids):
    grid = grids["testbed"]
    first = grid.cells()[0]
    assert grid.cell(first.id) == first
    with pytest.raises(GridSpecError, match="no cell with id 'nope'"):
        grid.cell("nope")


def test_list_grids_ignores_subfolders(tmp_path, monkeypatch):
    (tmp_path / "baselines").mkdir()
    (tmp_path / "baselines" / "old.yaml").write_text("models: [x]\n")
    (tmp_path / "b.yaml").write_text("models: [testbed]\n")
    (tmp_path / "a.yaml").write_text("models: [testbed]\n")
    (tmp_path / "notes.txt").write_text("")
    monkeypatch.setattr(spec, "GRIDS_DIR", tmp_path)
    assert list_grids() == ["a", "b"]
    assert load_grid("a").cells()[0].config == LosaConfig()


# --- errors ------------------------------------------------------------------------------------------------------

BAD = {
    "unknown top-level key": ("models: [testbed]\naxis: {sparsity: [0.5]}\n", ["'axis'", "allowed keys", "axes"]),
    "unknown config key": ("models: [testbed]\nfixed: {sparsty: 0.5}\n",
                           ["fixed.sparsty", "allowed keys", "sparsity", "finetune.lr"]),
    "unknown nested key": ("models: [testbed]\nfixed: {finetune: {lrr: 1}}\n",
                           ["fixed.finetune.lrr", "allowed keys", "lr, warmup_ratio"]),
    "bad literal": ("models: [testbed]\naxes: {pruner: [wanda, foo]}\n",
                    ["axes.pruner[1]", "'foo'", "allowed: magnitude, wanda, sparsegpt"]),
    "bad ablation": ("models: [testbed]\naxes: {ablate: [[lsr], [foo]]}\n",
                     ["axes.ablate[1][0]", "allowed: lsr, sra, dsa"]),
    "bad pattern": ("models: [testbed]\naxes: {pattern: ['2:4', '3:2']}\n",
                    ["axes.pattern[1]", "3:2", "0 < N < M", "mixed-N:M"]),
    "unquoted pattern": ("models: [testbed]\naxes: {pattern: [2:4]}\n", ["axes.pattern[0]", "124", "quote"]),
    "unknown axis key": ("models: [testbed]\naxes: {sparsty: [0.5]}\n", ["axes.sparsty:", "allowed keys"]),
    "empty axis": ("models: [testbed]\naxes: {sparsity: []}\n", ["axes.sparsity", "empty list"]),
    "axis not a list": ("models: [testbed]\naxes: {sparsity: 0.5}\n", ["axes.sparsity", "must be a list"]),
    "wrong type": ("models: [testbed]\naxes: {steps: [3, three]}\n", ["axes.steps[1]", "integer", "'three'"]),
    "out of range": ("models: [testbed]\nfixed: {sparsity: 1.5}\n", ["fixed.sparsity", "less than 1"]),
    "contradicting sparsity": ("models: [testbed]\nfixed: {sparsity: 0.7}\naxes: {pattern: ['2:4']}\n",
                               ["fixed.sparsity = 0.7", "axes.pattern[0] = '2:4'", "implies sparsity 0.5"]),
    "empty after exclusion": ("models: [testbed]\naxes: {pruner: [wanda]}\nexclude: [{pruner: wanda}]\n",
                              ["empty after `exclude`"]),
    "exclude matches nothing": ("models: [testbed]\naxes: {sparsity: [0.5]}\nexclude: [{sparsity: 0.55}]\n",
                                ["exclude[0]", "matches no cell"]),
    "cross-field error": ("models: [testbed]\nfixed: {r_min: 20}\n",
                          ["testbed wanda 70% unstructured +LoSA T=5 seed 0", "r_min <= r_max"]),
    "bad table": ("models: [testbed]\ntable: tabel1\n", ["table", "'table1'", "'seeds'"]),
    "no models": ("models: []\n", ["models", "at least 1"]),
    "axis also fixed": ("models: [testbed]\nfixed: {seed: 1}\naxes: {seed: [0, 1]}\n",
                        ["axes.seed", "also set in `fixed`"]),
    "per_model unknown model": ("models: [testbed]\nper_model: {other: {seed: 1}}\n",
                                ["per_model.other", "testbed"]),
    "published bad method": ("models: [testbed]\npublished: [{model: testbed, method: sparse, eval_seqlen: 256, "
                             "value: 1.0, source: x}]\n", ["published[0].method", "'dense'", "'losa'"]),
    "published matches no cell": ("models: [testbed]\npublished: [{model: testbed, method: dense, eval_seqlen: 4096,"
                                  " value: 1.0, source: x}]\n", ["published[0]", "matches no cell"]),
    "name differs from file": ("name: other\nmodels: [testbed]\n", ["name", "'other'", "'bad'"]),
    "invalid yaml": ("models: [testbed\n", ["not valid YAML"]),
    "not a mapping": ("- testbed\n", ["must be a mapping"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_grid_names_file_key_and_allowed_values(tmp_path, case):
    text, needles = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(GridSpecError) as info:
        load_grid(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(GridSpecError, match="missing.yaml: cannot read"):
        load_grid(tmp_path / "missing.yaml")
    with pytest.raises(GridSpecError) as info:
        load_grid("no-such-grid")
    assert "'no-such-grid'" in str(info.value) and "testbed-nm" in str(info.value) and "table1-ppl" in str(info.value)


def test_grid_error_is_a_value_error():
    assert issubclass(GridSpecError, ValueError)


# --- MLflow params -----------------------------------------------------------------------------------------------

def test_params_round_trip(grids):
    from losa.config import EVALUATIONS, ExportConfig, ZeroShotConfig

    fields = set(LosaConfig.model_fields) - {"finetune"} - set(EVALUATIONS)  # unset stages: no params
    for name in ("testbed", "testbed-nm", "table1-ppl"):
        for cell in grids[name].cells():
            params = cell.params()
            assert all(isinstance(v, str) for v in params.values())
            assert set(params) == fields | {f"finetune.{k}" for k in FinetuneConfig.model_fields} | {"model"}
            assert Cell.from_params(params) == cell
            assert Cell.from_params(params).id == cell.id
    for cell in grids["smollm2-table2-zeroshot"].cells():  # set stages: dotted params, and back
        params = cell.params()
        assert {f"zeroshot.{k}" for k in ZeroShotConfig.model_fields} | {f"export.{k}" for k in
                                                                         ExportConfig.model_fields} <= set(params)
        assert params["zeroshot.limit"] == "50" and params["export.dtype"] == "float16"
        assert Cell.from_params(params) == cell
    c = next(c for c in grids["testbed"].cells() if c.label == "-LSR" and c.config.pruner == "sparsegpt")
    p = c.params()
    assert (p["model"], p["pruner"], p["sparsity"], p["ablate"], p["finetune.batch_size"], p["eval_windows"],
            p["beta"], p["clip_to_physical"]) == ("testbed", "sparsegpt", "0.7", '["lsr"]', "4", "64", "null", "true")
    assert json.loads(p["delta_bands"]) == [list(b) for b in c.config.delta_bands]
