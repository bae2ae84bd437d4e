"""One Prefect task per LoSA stage. Each loads a fresh model, restores its inputs (:mod:`losa.snapshot`), calls ONE
:mod:`losa.stages` function and stores its result as an artifact; it knows nothing of the in-memory executor.

Every task's cache key (:func:`cache_key`) holds the stage name and version, the config fields the stage reads, its
own parameters, the content hashes of its input artifacts and of the data files it reads, and the versions of the
libraries that compute it. The same key addresses the artifact store, so a stage whose artifact exists is never
recomputed. SERIALIZABLE isolation (a file lock per key, tied to a live holder: :mod:`tasks.locks`) makes concurrent
cells that need the same stage wait for one computation instead of racing.

A stage stores what it adds to the state it started from (a mask, an adapter, or only a recipe), and a stored state
is rebuilt by redoing that on the states it refers to (:func:`_restore`), bit for bit. SparseGPT's pruned weights,
the one state stored whole at every DSA step, are spilled once the next step has pruned them further (the cell passes
``spill``; :meth:`tasks.store.ArtifactStore.spill`); should a crash or a corrupt artifact make them needed again, they
are recomputed and must hash to what they were (:func:`_recompute`).

The artifact store, not Prefect's result record, decides a cache hit: every task body looks its key up in the store
(whose manifests are checked, :mod:`tasks.store`), so an artifact removed as corrupt is rebuilt instead of being
served from a stale record, and no pickle is ever read: Prefect persists only the returned
:class:`~tasks.store.Ref` (a pointer plus small JSON info), with its JSON serializer.
"""

from __future__ import annotations

import functools
import inspect
import json
import time
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from pydantic import BaseModel, ConfigDict

from losa import METHOD_VERSION, data, snapshot, stages
from losa.config import LosaConfig
from losa.pruners import get_rule

from .locks import LiveLockManager
from .state import artifacts_url, state_dir
from .store import ArtifactStore, Ref, Spilled, stage_key

STAGE_VERSION = "3"  # bump with any change in this file that changes what a stage stores


class CellSpec(BaseModel):
    """The identity of one cell as the tasks see it: a resolved model and its settings."""

    model_config = ConfigDict(frozen=True)

    model: str  # resolved local path
    model_sha256: str  # content hash of the model's files (see tasks.model.resolve_model)
    config: LosaConfig
    device: str = "auto"  # "auto": cuda when available


# the config fields each stage reads: they, and nothing else of the config, enter its cache key
# what restoring a stored state reads: a stored adapter is rebuilt with these (DSA step 5 redone: seed, clip)
_ADAPTER = ("physical_rank", "lora_alpha", "lora_dropout", "lora_rank", "seed", "clip_to_physical")
_TRAIN = ("finetune", "train_data", "train_steps", "final_train_steps", "steps", "method", "ablate",
          "alpaca_per_step", "alpaca_total", "alpaca_max_len", "seed", "clip_to_physical") + _ADAPTER
FIELDS: dict[str, tuple[str, ...]] = {
    "calibration": ("nsamples", "seqlen", "seed"),
    "train_tokens": (),
    "importance": ("rmi_samples", "calib_batch_size", "beta", "pruner") + _ADAPTER,  # beta defaults by pruner
    "prune": ("pruner", "propagation", "calib_batch_size") + _ADAPTER,  # pruner: also the stored form
    "finetune": _TRAIN,
    "lora": _TRAIN,
    "merge": _ADAPTER,
    "finalize": _ADAPTER,
    "perplexity": ("eval_seqlen", "eval_batch_size", "eval_windows") + _ADAPTER,
    "zeroshot": ("zeroshot",) + _ADAPTER,
    "export": ("export",) + _ADAPTER,
    "speed": ("speed",) + _ADAPTER,
}
# what else a stage reads: data files (their content hashes enter its key; test_stages checks that a stage reads no
# file its key omits) and the libraries whose versions change its numbers
_ALPACA = lambda cfg: (data.ALPACA,) if cfg.train_data == "alpaca" else ()  # noqa: E731 - a table of one-liners
FILES: dict[str, Callable[[LosaConfig], tuple[str, ...]]] = {
    "calibration": lambda cfg: (data.C4_CALIBRATION,),
    "train_tokens": lambda cfg: (data.C4_CALIBRATION, data.C4_EXTRA),
    "finetune": _ALPACA,
    "lora": _ALPACA,
    "perplexity": lambda cfg: (data.WIKITEXT2_TEST,),
    "zeroshot": lambda cfg: tuple(f for t in cfg.zeroshot.tasks for f in data.ZEROSHOT_FILES[t][0])
    if cfg.zeroshot.source == "local" else (),
}
# what a stage is told but does not compute from: the earlier state it may spill once its own result exists
UNKEYED = frozenset({"spill"})
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "gguf")  # every stage: kernels, model code, tokenization
MORE_LIBRARIES = {"zeroshot": ("lm_eval",), "speed": ("onnxruntime",)}


def cache_key(stage: str, params: dict[str, Any]) -> str:
    """Key of ``stage`` called with ``params`` (the task's bound arguments)."""
    cell: CellSpec = params["cell"]
    cfg = cell.config.model_dump(mode="json")
    params = {k: v for k, v in params.items() if k not in UNKEYED}
    own = {k: v for k, v in params.items() if k != "cell" and not isinstance(v, Ref) and v is not None}
    inputs = {k: v for k, v in params.items() if isinstance(v, Ref)}
    inputs["model"] = cell.model_sha256
    # a cache record is only valid for the store its Ref points into
    inputs["store"] = artifacts_url()
    if stage in FILES:
        inputs["data"] = data.files_sha256(FILES[stage](cell.config))
    if stage == "zeroshot":
        inputs["tasks"] = _task_files_hash()
    inputs["libraries"] = library_versions(stage)
    return stage_key(stage, f"{METHOD_VERSION}/{STAGE_VERSION}", {**{f: cfg[f] for f in FIELDS[stage]}, **own},
                     inputs)


@functools.lru_cache(maxsize=1)
def _task_files_hash() -> str:
    """Content hash of the lm-eval task files (prompts, choices, metrics)."""
    import hashlib

    from losa.evaluate import TASKS_DIR

    h = hashlib.sha256()
    for path in sorted([*TASKS_DIR.glob("*.yaml"), *TASKS_DIR.glob("*.py")]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def library_versions(stage: str | None = None) -> dict[str, str]:
    """Versions of the libraries every stage's numbers depend on (and ``stage``'s own, e.g. lm-eval's)."""
    return {p: _version(p) for p in LIBRARIES + MORE_LIBRARIES.get(stage, ())}


@functools.lru_cache(maxsize=None)
def _version(package: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(package.replace("_", "-"))
    except md.PackageNotFoundError:
        return "missing"


def _store() -> ArtifactStore:
    return ArtifactStore()


def stage_task(stage: str, log_prints: bool = True):
    """A Prefect task for ``stage``: cache key from :func:`cache_key`, artifact store lookup before computing.

    ``log_prints=False`` for stages whose libraries capture stdout themselves (dill, under datasets and lm-eval,
    reads ``dis`` output through a swapped ``sys.stdout``; Prefect's print hook would log it instead)."""

    def wrap(fn: Callable[..., Ref]):
        @functools.wraps(fn)
        def body(*args, **kwargs):
            bound = inspect.signature(fn).bind(*args, **kwargs)
            bound.apply_defaults()
            key = cache_key(stage, {k: v for k, v in bound.arguments.items() if not k.startswith("_")})
            store = _store()
            if (hit := store.get(key)) is not None:  # computed before (another cell, another process)
                return hit
            return fn(*args, **kwargs, _key=key, _store=store)

        body.__signature__ = _without_private(fn)
        # cache policy and result storage depend on the state folder: bound per call by configured()
        return task(name=stage, persist_result=True, log_prints=log_prints,
                    task_run_name=f"{stage}" + "-{cell.config.method}")(body)

    return wrap


def configured(stage_task):
    """The task bound to the current state folder: its cache records, results and locks live there.

    ``refresh_cache``: Prefect never serves a hit from its own record (see the module docstring); the body's store
    lookup does, after the lock is held."""
    state = state_dir()
    policy = CacheKeyFnPolicy(cache_key_fn=lambda ctx, params: cache_key(stage_task.name, params)).configure(
        isolation_level="SERIALIZABLE", lock_manager=_lock_manager(state / "locks"))
    return stage_task.with_options(cache_policy=policy, result_storage=state / "prefect-results",
                                   result_serializer="json", refresh_cache=True)


@functools.lru_cache(maxsize=None)
def _lock_manager(folder):
    return LiveLockManager(folder)  # one per folder and process: one heartbeat renews all the locks it holds


def _without_private(fn):
    sig = inspect.signature(fn)
    return sig.replace(parameters=[p for n, p in sig.parameters.items() if not n.startswith("_")])


# --------------------------------------------------------------------------------------------- inputs and outputs


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _model(cell: CellSpec, state: Ref | None = None):
    """A fresh model holding ``state`` (None or the model Ref: the dense model)."""
    from losa.models import load_model

    model, _ = load_model(cell.model, device=cell.device)
    return model if state is None else _restore(cell, model, state)


# A stage stores what it adds: a prune by a masking rule its mask, a SparseGPT prune its weights, a fine-tuning step
# its adapter, a merge and a plain-LoRA merge nothing; each with the recipe (``DERIVED`` metadata: its base state and
# what to redo on it) that rebuilds its state bit for bit from the states it was computed from.
DERIVED = "derived"


def _recipe(parts: dict) -> str:
    """A recipe as JSON: the states it names by their Refs' identity, the rest as given."""
    refs = {k: v.model_dump(include={"stage", "key", "sha256"}) if isinstance(v, Ref) else v for k, v in parts.items()}
    return json.dumps(refs, sort_keys=True)


def _ref(part: dict | None) -> Ref | None:
    return None if part is None else Ref(**part)


def _restore(cell: CellSpec, model, ref: Ref):
    """``model`` (freshly loaded, dense) made to hold the state ``ref`` stores: its snapshot, or its base state
    rebuilt first and then what its stage added, redone exactly as the stage did it."""
    if ref.stage == "model":  # the dense model itself
        return model
    store, cfg = _store(), cell.config
    try:
        tensors, meta = store.tensors(ref)
    except Spilled as spilled:
        return _recompute(cell, model, ref, json.loads(spilled.recipe))
    if DERIVED not in meta:  # a full snapshot: a prune, or a masked LoSA merge (the final sparse model)
        return snapshot.restore(model, tensors, meta, cfg)
    recipe = json.loads(meta[DERIVED])
    model = _restore(cell, model, _ref(recipe["base"]))
    if ref.stage == "finetune":  # the start of DSA steps 5–6 again (the previous adapter, unmerged), then the adapter
        if (previous := _ref(recipe["previous"])) is not None:
            model = snapshot.restore(model, *store.tensors(previous), cfg, merged=True)
        model, _ = stages.adapt(model, cfg, recipe["ranks"])
        return snapshot.load_adapter(model, tensors)
    if ref.stage == "lora":  # the plain adapter on the pruned weights
        return snapshot.restore(model, tensors, meta, cfg)
    if ref.stage == "prune":  # a masking rule's: the base state's weights where kept
        return snapshot.apply_kept(model, tensors)
    if ref.stage == "merge":  # the weights only (as a plain model): the adapter lives on in the state merged
        return stages.merge(model).unload()
    if ref.stage == "finalize":  # a plain-LoRA merge: dense, so recomputed from the pruned weights and the adapter
        return stages.finalize(model, recipe["patterns"])[0]
    raise ValueError(f"no recipe for a {ref.stage} artifact")


def _recompute(cell: CellSpec, model, ref: Ref, recipe: dict):
    """``model`` holding a spilled SparseGPT prune again: its base state rebuilt and pruned as its stage pruned it
    (the same calibration, rates and patterns; the weights do not depend on the reference its errors were measured
    against), taken back by the store only if it hashes to what it was."""
    clock = _clock()
    model = _restore(cell, model, _ref(recipe["base"]))
    stages.prune(model, _ids(_ref(recipe["calib"])), cell.config, recipe["rates"], recipe["patterns"], None,
                 progress=False)
    _store().unspill(ref, *snapshot.snapshot(model, adapter=False), seconds=clock())
    return model


def load_state(cell: CellSpec, state: Ref | None):
    """(model, tokenizer) holding a stored state (None or the model Ref: the dense model)."""
    return _model(cell, state), _tokenizer(cell.model)


def _ids(ref: Ref | None):
    return _store().tensors(ref)[0]["ids"] if ref is not None else None


def _put(store: ArtifactStore, stage: str, key: str, clock, info: dict, tensors: dict, meta: dict,
         recipe: dict | None = None, redo: dict | None = None, spill: Ref | None = None) -> Ref:
    """Store a state: its tensors (a snapshot, a mask, or none) and the recipe that rebuilds the rest from the
    states it names (whose keys the manifest lists as what reading it needs); ``redo``: the recipe that computes
    the tensors again from the states it names, should they be spilled. ``spill``: an earlier state spilled just
    before these tensors are written."""
    if spill is not None:
        store.spill(spill)
    return store.put(stage, key, info, tensors, {**meta, DERIVED: _recipe(recipe)} if recipe else meta, seconds=clock,
                     needs=_needs(recipe), redo=None if redo is None else (_recipe(redo), _needs(redo)))


def _needs(recipe: dict | None) -> list[str]:
    return [v.key for v in (recipe or {}).values() if isinstance(v, Ref) and v.stage != "model"]


def _clock():
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


# --------------------------------------------------------------------------------------------- the stages


@stage_task("calibration")
def calibration(cell: CellSpec, _key: str = "", _store: ArtifactStore | None = None) -> Ref:
    """C4 calibration windows (method.md §1) as the cell's tokenizer cuts them."""
    from losa import data

    clock, cfg = _clock(), cell.config
    ids = data.calibration_windows(_tokenizer(cell.model), cfg.nsamples, cfg.seqlen, seed=cfg.seed)
    return _store.put("calibration", _key, {"shape": list(ids.shape)}, {"ids": ids}, seconds=clock)


@stage_task("train_tokens")
def train_tokens(cell: CellSpec, _key: str = "", _store: ArtifactStore | None = None) -> Ref:
    """The plain-text fine-tuning token stream (tokenized once per tokenizer)."""
    clock = _clock()
    ids = stages.token_stream(_tokenizer(cell.model))
    return _store.put("train_tokens", _key, {"tokens": int(ids.numel())}, {"ids": ids}, seconds=clock)


@stage_task("importance")
def importance(cell: CellSpec, state: Ref, calib: Ref, _key: str = "", _store: ArtifactStore | None = None) -> Ref:
    """LSR's CKA matrix and layer importances of the merged model (method.md §2)."""
    clock = _clock()
    result = stages.importance(_model(cell, state), _ids(calib), cell.config)
    return _store.put("importance", _key, stages.info(result), seconds=clock)


@stage_task("prune")
def prune(cell: CellSpec, state: Ref, calib: Ref, reference: Ref | None, rates: list, patterns: list[str],
          spill: Ref | None = None, _key: str = "", _store: ArtifactStore | None = None) -> Ref:
    """Prune the state's weights block by block to ``rates``/``patterns`` (method.md §1); info = the PruneReport.

    ``reference``: the dense model (its Ref) whose block outputs L_l is measured against (method.md §3): computed
    again block by block beside the pruning pass rather than stored (at 7B they would outweigh the final model 13×).
    ``spill``: the previous step's SparseGPT prune, which ``state`` was computed from: spilled before these weights
    are written, so a cell never holds two steps' full weights (a crash in between only costs recomputing it).
    """
    from losa.models import load_model

    clock = _clock()
    model, ids = _model(cell, state), _ids(calib)
    outputs = None
    if reference is not None:  # the dense model waits in host memory; its blocks visit the compute device in turn
        weight = next(model.parameters())
        dense, _ = load_model(cell.model, device="cpu", dtype=weight.dtype)
        outputs = stages.dense_outputs(dense, ids, cell.config, device=weight.device, lazy=True)
    report = stages.prune(model, ids, cell.config, rates, patterns, outputs, progress=False)
    if get_rule(cell.config.pruner).masks_only:  # the pruned state is the input state where kept: store the mask
        return _put(_store, "prune", _key, clock, report.to_dict(), snapshot.kept(model), {}, recipe={"base": state})
    return _put(_store, "prune", _key, clock, report.to_dict(), *snapshot.snapshot(model, adapter=False),
                redo={"base": state, "calib": calib, "rates": list(rates), "patterns": list(patterns)}, spill=spill)


@stage_task("finetune")
def finetune(cell: CellSpec, pruned: Ref, previous: Ref | None, tokens: Ref | None, ranks: list[int], t: int,
             _key: str = "", _store: ArtifactStore | None = None) -> Ref:
    """DSA steps 5–7 (method.md §4): the adapter on the new mask with SRA's ranks, fine-tuned. At t > 1 the model
    holds ``previous``'s adapter, merged into the ``pruned`` weights (the state steps 2–4 left)."""
    clock, cfg = _clock(), cell.config
    model = _model(cell, pruned)
    if previous is not None:
        model = snapshot.restore(model, *_store.tensors(previous), cfg, merged=True)
    model, trained = stages.finetune(model, _tokenizer(cell.model), cfg, ranks, t, stream=_ids(tokens), progress=False)
    return _put(_store, "finetune", _key, clock, stages.info(trained), *snapshot.snapshot(model, weights=False),
                recipe={"base": pruned, "previous": previous, "ranks": list(ranks)})


@stage_task("lora")
def lora(cell: CellSpec, pruned: Ref, tokens: Ref | None, _key: str = "", _store: ArtifactStore | None = None) -> Ref:
    """The baseline's standard LoRA, trained on the pruned model with the same budget."""
    clock = _clock()
    model, trained = stages.lora(_model(cell, pruned), _tokenizer(cell.model), cell.config, stream=_ids(tokens),
                                 progress=False)
    return _put(_store, "lora", _key, clock, stages.info(trained), *snapshot.snapshot(model, weights=False),
                recipe={"base": pruned})


@stage_task("merge")
def merge(cell: CellSpec, state: Ref, _key: str = "", _store: ArtifactStore | None = None) -> Ref:
    """DSA step 2: the adapter merged into the masked weights. Stores only its recipe: the sum is redone on load."""
    clock = _clock()
    return _put(_store, "merge", _key, clock, {}, {}, {}, recipe={"base": state})


@stage_task("finalize")
def finalize(cell: CellSpec, state: Ref, patterns: list[str], spill: Ref | None = None, _key: str = "",
             _store: ArtifactStore | None = None) -> Ref:
    """Merge and unload; a masked adapter's merge is verified (raises MergeVerificationError, nothing stored).

    A masked merge is the final sparse model: stored (``spill``: the last SparseGPT prune, spilled first). A plain
    LoRA's merge is dense (its update has no mask): stored as its recipe, the pruned weights and the adapter it is
    the sum of."""
    from losa.adapter import masked_layers

    clock, model = _clock(), _model(cell, state)
    plain = not list(masked_layers(model))
    model, result = stages.finalize(model, patterns)
    if plain:
        return _put(_store, "finalize", _key, clock, stages.info(result), {}, {},
                    recipe={"base": state, "patterns": list(patterns)})
    return _put(_store, "finalize", _key, clock, stages.info(result), *snapshot.snapshot(model, adapter=False),
                spill=spill)


@stage_task("perplexity")
def perplexity(cell: CellSpec, state: Ref, _key: str = "", _store: ArtifactStore | None = None) -> Ref:
    """WikiText-2 perplexity of the state (with its adapter, if it has one)."""
    clock = _clock()
    ppl = stages.perplexity(_model(cell, state), _tokenizer(cell.model), cell.config, progress=False)
    return _store.put("perplexity", _key, {"ppl": ppl}, seconds=clock)


@stage_task("zeroshot", log_prints=False)
def zeroshot(cell: CellSpec, state: Ref, _key: str = "", _store: ArtifactStore | None = None) -> Ref:
    """Zero-shot accuracy of the state through lm-eval (method.md §6); info = task -> lm-eval's numbers."""
    clock = _clock()
    model = _model(cell, state)
    result = stages.zero_shot(model, _tokenizer(cell.model), cell.config)
    return _store.put("zeroshot", _key, stages.jsonable(result), seconds=clock)


@stage_task("export")
def export(cell: CellSpec, state: Ref, _key: str = "", _store: ArtifactStore | None = None) -> Ref:
    """The state's compact sparse form (method.md §6; ``losa export`` writes it out as folders); info = its bytes."""
    clock = _clock()
    tensors, sizes = stages.sparse_form(_model(cell, state), cell.config)
    return _store.put("export", _key, sizes, tensors, seconds=clock)


@stage_task("speed")
def speed(cell: CellSpec, state: Ref, dense: Ref, _key: str = "", _store: ArtifactStore | None = None) -> Ref:
    """Prefill/decode latency of the state and of the dense model per engine (method.md §6); measured once."""
    clock = _clock()
    result = stages.speed(_model(cell, state), _model(cell), cell.config, workdir=state_dir())
    return _store.put("speed", _key, stages.jsonable(result), seconds=clock)


def model_ref(cell: CellSpec) -> Ref:
    """The dense model as a stage input: its content hash (the root of every key)."""
    return Ref(stage="model", key=cell.model_sha256, sha256=cell.model_sha256, info={"path": cell.model})
