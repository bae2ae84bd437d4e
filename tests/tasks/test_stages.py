"""tasks/stages.py: the cache key of every stage (pinned: a changed key recomputes every store that exists), what
enters it, and one task computed once and then found in the store."""

from pathlib import Path

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
    "importance": {"state": DENSE, "calib": CALIB},
    "prune": {"state": DENSE, "calib": CALIB, "reference": DENSE, "rates": [0.5, 0.5], "patterns": ["unstructured"] * 2},
    "finetune": {"pruned": PRUNED, "previous": None, "tokens": None, "ranks": [6, 6], "t": 1},
    "perplexity": {"state": PRUNED},
}
# pinned (with the library versions and data hashes fixed below): a key that moves recomputes every store that exists.
# Moved on purpose by issue 11, twice: stored forms changed, data hashes and library versions entered every key; then
# weights-only states stopped storing the RNG state (STAGE_VERSION 3)
PINNED = {
    "calibration": "c977ab289da3d0294f1e5f4d5e3843bf048ec5e74f97a71dbf6baaf91b6f4b6f",
    "finetune": "032a8a66a4792651d7f2d3e43e69879e5d8ae181e9b42e890b05acc96cbb10aa",
    "importance": "d97f0e9dde9b496b8bdf6f4f2fa733dde6843c66cc4884d93d17ac65e1fbe3f9",
    "perplexity": "5fd529615a95716c9176875007cf573fcb4a8846cf5e97ffb76628e70cdc2e0f",
    "prune": "91cb8a245d73005ae766efad8a7b5316e3b296e34cfea1621a3e2cd06f66de04",
}


@pytest.fixture
def fixed_inputs(monkeypatch):
    """Library versions and data hashes as constants: the pinned keys hold on any machine."""
    from losa import data

    monkeypatch.setattr(T, "_version", lambda package: "1.0")
    monkeypatch.setattr(data, "files_sha256", lambda relpaths: {rel: "f" * 64 for rel in relpaths})


@pytest.fixture(autouse=True)
def fixed_store(monkeypatch):
    monkeypatch.setenv("LOSA_ARTIFACTS", "/nonexistent/store")  # the key includes the store it points into


@pytest.mark.parametrize("stage", sorted(PINNED))
def test_keys_are_pinned(stage, fixed_inputs):
    assert cache_key(stage, {"cell": CELL, **PARAMS[stage]}) == PINNED[stage]


def test_every_task_has_its_fields_and_its_name():
    tasks = [T.calibration, T.train_tokens, T.importance, T.prune, T.finetune, T.lora, T.merge,
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
    files = data.files_sha256(T.FILES["zeroshot"](cell.config))
    assert set(files) == {f for t in cell.config.zeroshot.tasks for f in data.ZEROSHOT_FILES[t][0]}
    real = data.files_sha256
    monkeypatch.setattr(data, "files_sha256", lambda rels: {**real(rels), "boolq/dev.jsonl": "0" * 64})
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


class _Recording(LosaConfig):
    """A config that records which of its fields are read (methods and properties read through it too)."""

    def __getattribute__(self, name):
        if name in type(self).model_fields:
            _READS.add(name)
        return super().__getattribute__(name)


_READS: set[str] = set()


def test_every_stage_reads_only_the_fields_and_files_its_key_holds(tmp_path, monkeypatch):
    """Each task's body runs on the testbed with a config that records the fields read and a data layer that records
    the files opened: a stage that reads a field or a file its key omits (FIELDS, FILES) fails here, before any
    store serves a stale result. The library versions every key holds are checked to be real ones."""
    from losa import data
    from losa.config import ExportConfig, SpeedConfig, ZeroShotConfig
    from losa.zoo import TESTBED
    from tasks.model import content_hash

    monkeypatch.setenv("LOSA_HOME", str(tmp_path))
    monkeypatch.setenv("LOSA_ARTIFACTS", str(tmp_path / "artifacts"))
    opened: set[str] = set()
    find = data.find
    monkeypatch.setattr(data, "find", lambda rel: (opened.add(rel), find(rel))[1])
    data.c4_documents.cache_clear()  # read again, through the recording find
    T._tokenizer.cache_clear()
    small = dict(nsamples=2, seqlen=16, calib_batch_size=2, rmi_samples=2, steps=2, train_steps=1, final_train_steps=1,
                 eval_seqlen=32, eval_batch_size=2, eval_windows=1, finetune={"batch_size": 1, "seqlen": 16},
                 alpaca_per_step=2, alpaca_total=4, alpaca_max_len=160, zeroshot=ZeroShotConfig(tasks=("rte",), limit=2),
                 export=ExportConfig(), speed=SpeedConfig(prefill=8, decode=2, repeats=1, engines=("torch",)))
    sha = content_hash(TESTBED)

    def cell(**over):
        return CellSpec(model=str(TESTBED), model_sha256=sha, config=_Recording(**{**small, **over}), device="cpu")

    seen: dict[str, tuple[set, set]] = {}

    def run(stage, spec, **params):
        _READS.clear()
        opened.clear()
        ref = getattr(T, stage).fn(cell=spec, **params)
        fields, files = seen.setdefault(stage, (set(), set()))
        fields |= _READS
        files |= opened - set(T.FILES.get(stage, lambda cfg: ())(spec.config))
        return ref

    text, alpaca = cell(), cell(train_data="alpaca")
    dense = T.model_ref(text)
    calib = run("calibration", text)
    tokens = run("train_tokens", text)
    ranks = [2] * 6
    run("importance", text, state=dense, calib=calib)
    pruned = run("prune", text, state=dense, calib=calib, reference=dense, rates=[0.5] * 6,
                 patterns=["unstructured"] * 6)
    step1 = run("finetune", text, pruned=pruned, previous=None, tokens=tokens, ranks=ranks, t=1)
    merged = run("merge", text, state=step1)
    pruned2 = run("prune", text, state=merged, calib=calib, reference=dense, rates=[0.6] * 6,
                  patterns=["unstructured"] * 6)
    step2 = run("finetune", text, pruned=pruned2, previous=step1, tokens=tokens, ranks=ranks, t=2)
    final = run("finalize", text, state=step2, patterns=["unstructured"] * 6)
    run("perplexity", text, state=final)
    run("zeroshot", text, state=final)
    run("export", text, state=final)
    run("speed", text, state=final, dense=dense)
    for spec in (text, alpaca):
        lora = run("lora", spec, pruned=pruned, tokens=tokens if spec is text else None)
        lora_final = run("finalize", spec, state=lora, patterns=["unstructured"] * 6)
    run("importance", text, state=merged, calib=calib)
    run("perplexity", text, state=step2)
    run("export", text, state=lora_final)
    run("speed", text, state=lora_final, dense=dense)
    run("finetune", alpaca, pruned=pruned, previous=None, tokens=None, ranks=ranks, t=1)

    assert sorted(seen) == sorted(FIELDS)  # every stage ran
    unkeyed = {stage: sorted(fields - set(FIELDS[stage])) for stage, (fields, _) in seen.items()}
    assert not any(unkeyed.values()), f"stages read config fields their key omits: {unkeyed}"
    unhashed = {stage: sorted(files) for stage, (_, files) in seen.items() if files}
    assert not unhashed, f"stages read data files their key omits: {unhashed}"
    assert seen["calibration"][0] and seen["perplexity"][0]  # the recording works: fields were read
    assert all(T._version(p) != "missing" for p in T.LIBRARIES if p != "gguf")


def test_a_recipe_restores_its_state_bit_for_bit(tmp_path, monkeypatch):
    """A stage that stores only what it adds (a masking rule's mask, an adapter, a merge's recipe) restores the very
    state it computed: every weight, adapter matrix, mask and active rank equal bit for bit, and the RNG state."""
    import torch

    from losa import stages
    from losa.adapter import masked_layers
    from losa.snapshot import snapshot
    from losa.zoo import TESTBED
    from tasks.model import content_hash

    monkeypatch.setenv("LOSA_HOME", str(tmp_path))
    monkeypatch.setenv("LOSA_ARTIFACTS", str(tmp_path / "artifacts"))
    cfg = LosaConfig(nsamples=2, seqlen=16, calib_batch_size=2, steps=2, train_steps=2,
                     finetune={"batch_size": 1, "seqlen": 16})
    spec = CellSpec(model=str(TESTBED), model_sha256=content_hash(TESTBED), config=cfg, device="cpu")
    dense, calib = T.model_ref(spec), T.calibration.fn(cell=spec)
    tokens = T.train_tokens.fn(cell=spec)
    pruned = T.prune.fn(cell=spec, state=dense, calib=calib, reference=dense, rates=[0.5] * 6,
                        patterns=["unstructured"] * 6)
    step1 = T.finetune.fn(cell=spec, pruned=pruned, previous=None, tokens=tokens, ranks=[3, 1] * 3, t=1)
    merged = T.merge.fn(cell=spec, state=step1)
    pruned2 = T.prune.fn(cell=spec, state=merged, calib=calib, reference=dense, rates=[0.7, 0.6] * 3,
                         patterns=["unstructured"] * 6)

    def copy(state):  # snapshots share the live model's storage
        return {k: v.clone() for k, v in state[0].items()}

    # the same states computed in memory, in one process, as the tasks computed them
    model = T._model(spec)
    stages.prune(model, T._ids(calib), cfg, [0.5] * 6, ["unstructured"] * 6, None)
    want_pruned = copy(snapshot(model, adapter=False))
    model, _ = stages.finetune(model, T._tokenizer(spec.model), cfg, [3, 1] * 3, 1, stream=T._ids(tokens), progress=False)
    want_step1, rng = copy(snapshot(model)), torch.get_rng_state()
    masks = {(b, n): layer.sparsity_mask["default"].clone() for b, n, layer in masked_layers(model)}
    model = stages.merge(model).unload()
    want_merged = copy(snapshot(model, adapter=False))
    stages.prune(model, T._ids(calib), cfg, [0.7, 0.6] * 3, ["unstructured"] * 6, None)
    want_pruned2 = copy(snapshot(model, adapter=False))

    def same(got, want):
        assert got.keys() == want.keys()
        for k in want:
            if k != "rng.cpu":
                assert got[k].dtype == want[k].dtype and torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k

    assert ArtifactStore().tensors(pruned)[0].keys() == {k.replace("w.", "k.") for k in want_pruned if k != "rng.cpu"}
    same(snapshot(T._model(spec, pruned), adapter=False)[0], want_pruned)
    restored = T._model(spec, step1)
    same(snapshot(restored)[0], want_step1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(layer.sparsity_mask["default"], masks[(b, n)]) for b, n, layer in masked_layers(restored))
    same(snapshot(T._model(spec, merged), adapter=False)[0], want_merged)
    same(snapshot(T._model(spec, pruned2), adapter=False)[0], want_pruned2)
    # SparseGPT updates the weights it keeps: its prune stores them (non-zeros + bitmask), restored bit for bit
    sgpt = spec.model_copy(update={"config": cfg.model_copy(update={"pruner": "sparsegpt"})})
    full = T.prune.fn(cell=sgpt, state=dense, calib=calib, reference=dense, rates=[0.5] * 6,
                      patterns=["unstructured"] * 6)
    model = T._model(sgpt)
    stages.prune(model, T._ids(calib), sgpt.config, [0.5] * 6, ["unstructured"] * 6, None)
    assert {k[:2] for k in ArtifactStore().tensors(full)[0] if k != "rng.cpu"} == {"w."}  # weights, not a mask
    same(snapshot(T._model(sgpt, full), adapter=False)[0], copy(snapshot(model, adapter=False)))
    sizes = {r.stage: ArtifactStore().size(r.key) for r in (pruned, step1, merged)}
    weights = sum(v.numel() * v.element_size() for k, v in want_pruned.items() if k.startswith("w."))
    assert sizes["prune"] < weights / 25 and sizes["finetune"] < weights / 4 and sizes["merge"] < 4096, sizes


def test_a_spilled_sparsegpt_prune_is_recomputed_and_checked(tmp_path, monkeypatch):
    """The next step's prune spills the SparseGPT weights it was computed from (``spill``): their tensors go, the
    manifest stays (a cache hit, the same content hash), the later prune's key does not see ``spill``, and reading the
    spilled state recomputes it from its base, bit for bit, taking it back into the store. Weights that recompute
    differently are refused: the artifact is removed, so its stage and what follows run again."""
    import torch

    from losa import stages
    from losa.snapshot import snapshot
    from losa.zoo import TESTBED
    from tasks.model import content_hash
    from tasks.store import CorruptArtifact

    monkeypatch.setenv("LOSA_HOME", str(tmp_path))
    monkeypatch.setenv("LOSA_ARTIFACTS", str(tmp_path / "artifacts"))
    cfg = LosaConfig(pruner="sparsegpt", nsamples=2, seqlen=16, calib_batch_size=2, steps=2, train_steps=2,
                     finetune={"batch_size": 1, "seqlen": 16})
    spec = CellSpec(model=str(TESTBED), model_sha256=content_hash(TESTBED), config=cfg, device="cpu")
    store = ArtifactStore()
    dense, calib = T.model_ref(spec), T.calibration.fn(cell=spec)
    tokens = T.train_tokens.fn(cell=spec)
    args = {"cell": spec, "calib": calib, "reference": dense, "patterns": ["unstructured"] * 6}
    pruned = T.prune.fn(state=dense, rates=[0.5] * 6, **args)
    want = {k: v.clone() for k, v in snapshot(T._model(spec, pruned), adapter=False)[0].items()}
    assert "rng.cpu" not in want  # a weights-only state: its bytes are the weights alone
    step1 = T.finetune.fn(cell=spec, pruned=pruned, previous=None, tokens=tokens, ranks=[3, 1] * 3, t=1)
    merged = T.merge.fn(cell=spec, state=step1)
    later = {"state": merged, "rates": [0.7, 0.6] * 3, **args}
    pruned2 = T.prune.fn(spill=pruned, **later)
    assert T.cache_key("prune", {"spill": pruned, **later}) == T.cache_key("prune", later) == pruned2.key

    manifest = store.manifest(pruned.key)
    assert manifest["spilled"] == [] and not manifest["has_tensors"]
    assert not (Path(store._dir(pruned.key)) / "tensors.safetensors").exists()
    assert store.get(pruned.key) == pruned.model_copy(update={"info": manifest["info"]})  # still a cache hit
    assert [line["key"] for line in store.spilled()] == [pruned.key]

    restored = T._model(spec, step1)  # reads the spilled prune: recomputed, checked, taken back
    got = snapshot(restored, adapter=False)[0]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    back = store.manifest(pruned.key)
    assert back["has_tensors"] and back["sha256"] == pruned.sha256 and "spilled" not in back
    assert store.computed()[-1] == {**store.computed()[-1], "key": pruned.key, "recomputed": True}

    # weights that recompute to something else are refused
    store.spill(pruned)
    real = stages.prune

    def off_by_one_weight(model, *a, **kw):
        report = real(model, *a, **kw)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "q_proj" in n).view(-1)[0] += 1.0
        return report

    monkeypatch.setattr(stages, "prune", off_by_one_weight)
    with pytest.raises(CorruptArtifact, match="recomputed to other tensors"):
        T._model(spec, step1)
    assert store.get(pruned.key) is None
