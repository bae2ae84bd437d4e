"""tasks/stages.py: the cache key of every stage (pinned: a changed key recomputes every store that exists), what
enters it, and one task computed once and then found in the store."""

import pytest

from losa.config import LosaConfig
from tasks import stages as T
from tasks.stages import FIELDS, CellSpec, cache_key
from tasks.store import ArtifactStore, Ref

CELL = CellSpec(model="/m", model_sha256="ab" * 32, config=LosaConfig(sparsity=0.5, steps=2, nsamples=8))
CALIB = Ref(stage="calibration", key="k1", sha256="c" * 64)
DENSE = Ref(stage="model", key="ab" * 32, sha256="ab" * 32)
PRUNED = Ref(stage="prune", key="k2", sha256="d" * 64)
PARAMS = {
    "calibration": {},
    "dense_outputs": {"calib": CALIB},
    "importance": {"state": DENSE, "calib": CALIB},
    "prune": {"state": DENSE, "calib": CALIB, "reference": None, "rates": [0.5, 0.5], "patterns": ["unstructured"] * 2},
    "finetune": {"pruned": PRUNED, "previous": None, "tokens": None, "ranks": [6, 6], "t": 1},
    "perplexity": {"state": PRUNED},
}
# computed with the code before the stages were rewritten (issue 9); equal keys = existing stores keep hitting
PINNED = {
    "calibration": "7d6914803a97c00c9e761d645da9c8bdc6c9b0414cdf0892e3b192ed3d0808d5",
    "dense_outputs": "b1a583dd83a45b853bad0fda02a915c76fde8ff81a397ba3783d60d3ba4f3586",
    "importance": "19481339a18e34e85d0907ea20818d2bf12e242135b1c13d5d584cc922c21446",
    "prune": "f7ce22396e00c2e788150f048722675b5bd350014963ac0e425204aef778b820",
    "finetune": "4907915787c61159e27bfddc5ed4f0f526a49073f28562a27586967bbecf1bc9",
    "perplexity": "4a30e58ce3eb44499a4122adeab9034731e2f839b7a9a095edfd9e19b0b2e4f6",
}


@pytest.fixture(autouse=True)
def fixed_store(monkeypatch):
    monkeypatch.setenv("LOSA_ARTIFACTS", "/nonexistent/store")  # the key includes the store it points into


@pytest.mark.parametrize("stage", sorted(PINNED))
def test_keys_are_pinned(stage):
    assert cache_key(stage, {"cell": CELL, **PARAMS[stage]}) == PINNED[stage]


def test_every_task_has_its_fields_and_its_name():
    tasks = [T.calibration, T.train_tokens, T.dense_outputs, T.importance, T.prune, T.finetune, T.lora, T.merge,
             T.finalize, T.perplexity, T.zeroshot, T.export, T.speed]
    assert sorted(t.name for t in tasks) == sorted(FIELDS)
    assert all(set(fields) <= set(LosaConfig.model_fields) for fields in FIELDS.values())


@pytest.mark.parametrize("stage", sorted(PINNED))
def test_a_key_moves_with_the_fields_its_stage_reads_and_only_those(stage):
    key = cache_key(stage, {"cell": CELL, **PARAMS[stage]})
    changes = {"nsamples": 16, "seed": 1, "rmi_samples": 8, "pruner": "sparsegpt", "physical_rank": 4,
               "eval_windows": 3, "train_steps": 7, "calib_batch_size": 4, "lora_dropout": 0.2}
    for field, value in changes.items():
        other = CELL.model_copy(update={"config": CELL.config.model_copy(update={field: value})})
        moved = cache_key(stage, {"cell": other, **PARAMS[stage]}) != key
        assert moved == (field in FIELDS[stage]), (stage, field)


def test_a_key_moves_with_the_model_the_store_and_the_inputs_content(monkeypatch):
    key = cache_key("perplexity", {"cell": CELL, "state": PRUNED})
    other_model = CELL.model_copy(update={"model_sha256": "cd" * 32})
    assert cache_key("perplexity", {"cell": other_model, "state": PRUNED}) != key
    assert cache_key("perplexity", {"cell": CELL, "state": PRUNED.model_copy(update={"sha256": "e" * 64})}) != key
    assert cache_key("perplexity", {"cell": CELL, "state": PRUNED.model_copy(update={"key": "elsewhere"})}) == key
    monkeypatch.setenv("LOSA_ARTIFACTS", "/another/store")
    assert cache_key("perplexity", {"cell": CELL, "state": PRUNED}) != key


def test_the_zeroshot_key_reads_the_task_data_the_task_files_and_lm_evals_version(monkeypatch):
    """What the zero-shot stage reads beyond its settings enters its key: the shipped files' content hashes, the
    task definitions (losa/zeroshot_tasks) and the lm-eval version; the other stages' keys do not move."""
    from losa import data
    from losa.config import ZeroShotConfig

    cell = CELL.model_copy(update={"config": CELL.config.model_copy(update={"zeroshot": ZeroShotConfig(limit=5)})})
    key = cache_key("zeroshot", {"cell": cell, "state": PRUNED})
    assert cache_key("perplexity", {"cell": cell, "state": PRUNED}) == cache_key("perplexity",
                                                                                 {"cell": CELL, "state": PRUNED})
    files = data.zeroshot_sha256(cell.config.zeroshot.tasks)
    assert set(files) == {f for t in cell.config.zeroshot.tasks for f in data.ZEROSHOT_FILES[t][0]}
    monkeypatch.setattr(data, "zeroshot_sha256", lambda tasks: {**files, "boolq/dev.jsonl": "0" * 64})
    assert cache_key("zeroshot", {"cell": cell, "state": PRUNED}) != key
    monkeypatch.undo()
    monkeypatch.setenv("LOSA_ARTIFACTS", "/nonexistent/store")
    monkeypatch.setattr(T, "_version", lambda package: "0.0.0")
    assert cache_key("zeroshot", {"cell": cell, "state": PRUNED}) != key
    monkeypatch.undo()
    monkeypatch.setenv("LOSA_ARTIFACTS", "/nonexistent/store")
    monkeypatch.setattr(T, "_task_files_hash", lambda: "changed")
    assert cache_key("zeroshot", {"cell": cell, "state": PRUNED}) != key
    limit = cell.model_copy(update={"config": cell.config.model_copy(update={"zeroshot": ZeroShotConfig(limit=6)})})
    monkeypatch.undo()
    monkeypatch.setenv("LOSA_ARTIFACTS", "/nonexistent/store")
    assert cache_key("zeroshot", {"cell": limit, "state": PRUNED}) != key


def test_a_stage_is_computed_once_then_read_from_the_store(tmp_path, monkeypatch):
    from losa.zoo import TESTBED
    from tasks.model import content_hash

    monkeypatch.setenv("LOSA_HOME", str(tmp_path))
    monkeypatch.setenv("LOSA_ARTIFACTS", str(tmp_path / "artifacts"))
    cell = CellSpec(model=str(TESTBED), model_sha256=content_hash(TESTBED),
                    config=LosaConfig(nsamples=2, seqlen=16), device="cpu")
    first = T.calibration.fn(cell=cell)  # the task's body, without Prefect
    assert first.stage == "calibration" and first.info == {"shape": [2, 16]}
    again = T.calibration.fn(cell=cell)
    assert again == first and [c["stage"] for c in ArtifactStore().computed()] == ["calibration"]
    assert ArtifactStore().tensors(first)[0]["ids"].shape == (2, 16)
