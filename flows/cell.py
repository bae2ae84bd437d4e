"""The ``losa-cell`` flow: one grid cell, one Prefect task per stage (tasks/stages.py), logged to MLflow.

The cell's control flow is :func:`losa.dsa.drive`, the same function ``run_losa`` runs in memory; here its stages are
cached Prefect tasks (:class:`TaskStages`), so cells sharing a prefix (calibration, dense outputs, a one-shot prune,
LSR of the dense model) compute it once and a rerun resumes after the last finished stage.
"""

from __future__ import annotations

import resource
import time

from prefect import flow, get_run_logger

from flows import tracking
from flows.spec import Cell, load_grid
from losa import METHOD_VERSION
from losa.calibration import PruneReport
from losa.stages import Finalized, Importance, Trained
from tasks import retention
from tasks import stages as T
from tasks.model import resolve_model
from tasks.stages import STAGE_VERSION, CellSpec
from tasks.store import ArtifactStore, Ref


class TaskStages:
    """:class:`losa.stages.Stages` where every stage is a cached task and every handle an artifact Ref."""

    def __init__(self, cell: CellSpec, spill: bool = False):
        """``spill``: spill each SparseGPT prune of the DSA loop once the next full weights are written (the next
        step's prune, or the final merge): a cell then holds one step's full weights at a time."""
        from transformers import AutoConfig

        from losa.pruners import get_rule

        self.cell = cell
        self.refs: list[Ref] = []  # every stage this cell read or wrote, in order (its record: tasks.retention)
        self._prunes = 0  # DSA steps begun, to name the task runs ("prune t=2/3")
        cfg = cell.config
        self.spill = spill and cfg.method == "losa" and not get_rule(cfg.pruner).masks_only
        self._weights: Ref | None = None  # the DSA loop's latest SparseGPT prune (what the next full state spills)
        self.n_blocks = AutoConfig.from_pretrained(cell.model).num_hidden_layers
        self.calib = self._call(T.calibration) if cfg.method != "dense" else None
        text = cfg.method in ("lora", "losa") and cfg.train_data == "text"
        self.tokens = self._call(T.train_tokens) if text else None

    def _call(self, stage, **params) -> Ref:
        ref = T.configured(stage).with_options(task_run_name=self._run_name(stage.name, params))(cell=self.cell,
                                                                                                   **params)
        self.refs.append(ref)
        return ref

    def _run_name(self, stage: str, params: dict) -> str:
        """Prefect's task-run name: the stage, and for LoSA's per-step stages the step (``prune t=2/3``)."""
        cfg = self.cell.config
        steps = cfg.effective_steps
        if cfg.method != "losa" or stage not in ("merge", "importance", "prune", "finetune"):
            return stage if stage != "finalize" else "merge+verify"
        t = params.get("t", self._prunes + (0 if stage == "finetune" else 1))
        if stage == "prune":
            self._prunes += 1
        return f"{stage} t={t}/{steps}"

    def dense(self) -> Ref:
        return T.model_ref(self.cell)

    def dense_outputs(self) -> Ref:
        return T.model_ref(self.cell)  # recomputed by each prune, block by block (tasks.stages.prune)

    def importance(self, state: Ref) -> Importance:
        return Importance(**self._call(T.importance, state=state, calib=self.calib).info)

    def prune(self, state: Ref, rates, patterns, reference: Ref | None) -> tuple[Ref, PruneReport]:
        ref = self._call(T.prune, state=state, calib=self.calib, reference=reference, rates=list(rates),
                         patterns=list(patterns), spill=self._weights)
        self._weights = ref if self.spill else None
        return ref, PruneReport.from_dict(ref.info)

    def finetune(self, pruned: Ref, previous: Ref | None, ranks, t: int) -> tuple[Ref, Trained]:
        ref = self._call(T.finetune, pruned=pruned, previous=previous, tokens=self.tokens, ranks=list(ranks), t=t)
        return ref, Trained(**ref.info)

    def lora(self, pruned: Ref) -> tuple[Ref, Trained]:
        ref = self._call(T.lora, pruned=pruned, tokens=self.tokens)
        return ref, Trained(**ref.info)

    def merge(self, state: Ref) -> Ref:
        return self._call(T.merge, state=state)

    def finalize(self, state: Ref, patterns) -> tuple[Ref, Finalized]:
        ref = self._call(T.finalize, state=state, patterns=list(patterns), spill=self._weights)
        return ref, Finalized(**ref.info)

    def perplexity(self, state: Ref) -> float:
        return self._call(T.perplexity, state=state).info["ppl"]

    def zero_shot(self, state: Ref) -> dict:
        return self._call(T.zeroshot, state=state).info

    def export(self, state: Ref) -> dict:
        return self._call(T.export, state=state).info

    def speed(self, state: Ref, dense: Ref) -> dict:
        return self._call(T.speed, state=state, dense=dense).info


class _Missing(Exception):
    pass


class CachedStages(TaskStages):
    """Walks a cell's stages through the artifact store only, counting those already computed (``losa check``)."""

    def __init__(self, cell: CellSpec, keys: list[str] | None = None):
        self.found, self.refs = 0, []
        self.keys = [] if keys is None else keys
        self.store = ArtifactStore()
        super().__init__(cell)

    def _call(self, stage, **params) -> Ref:
        ref = self.store.get(T.cache_key(stage.name, {"cell": self.cell, **params}))
        if ref is None:
            raise _Missing(stage.name)
        self.found += 1
        self.keys.append(ref.key)
        self.refs.append(ref)
        return ref


def cached_stages(spec: CellSpec, keys: list[str] | None = None) -> tuple[int, bool]:
    """(stages of this cell already in the store, whether the whole cell is); ``keys`` collects their keys."""
    stages, complete = walk(spec, keys)
    return stages.found, complete


def walk(spec: CellSpec, keys: list[str] | None = None) -> tuple[CachedStages, bool]:
    """Follow a cell's stages through the store as far as they are cached: (the walker, with its ``refs``, and
    whether the whole cell is cached)."""
    from losa.dsa import drive

    # built in two steps so the walker (its count and refs, set before TaskStages' own lookups) survives a miss
    # inside the constructor
    stages = CachedStages.__new__(CachedStages)
    try:
        stages.__init__(spec, keys)
        drive(spec.config, stages)
        return stages, True
    except _Missing:
        return stages, False


def cell_spec(cell: Cell, as_task: bool = True) -> CellSpec:
    """The cell's settings on its resolved model (``as_task``: as a Prefect task, i.e. inside a flow)."""
    path, sha = (resolve_model if as_task else resolve_model.fn)(cell.model)
    return CellSpec(model=path, model_sha256=sha, config=cell.config)


def cell_key(spec: CellSpec) -> str:
    """A cell's identity: model, settings, code versions and the versions of the libraries that compute it (a
    finished cell is not reused under another torch, as no stage of it would be)."""
    libraries = ",".join(f"{p}={v}" for p, v in T.library_versions().items())
    return tracking.cell_key(spec.model_sha256, spec.config.identity(), f"{METHOD_VERSION}/{STAGE_VERSION}/{libraries}")


def run_cell(cell: Cell, grid: str, parent_run_id: str | None = None, spill: bool = True) -> dict:
    """Run (or resume, or find cached) one cell, log it, return a summary row. ``spill``: see :class:`TaskStages`
    (off under ``retain: all``, which keeps every intermediate).

    A cell that fails (diverged training, a failed merge check, any error) is logged as a FAILED run with the
    reason and raises; one whose stored input turns out corrupt (removed by the store on read) is run once more,
    which rebuilds what was removed."""
    from losa.dsa import drive
    from tasks.store import CorruptArtifact

    logger = get_run_logger()
    spec = cell_spec(cell)
    key = cell_key(spec)
    store = ArtifactStore()
    before = len(store.computed())
    started, clock = time.time(), time.perf_counter()
    try:
        for attempt in (1, 2):
            stages = TaskStages(spec, spill=spill)
            try:
                report = _evaluate_finished(spec, stages, store) or drive(spec.config, stages).to_dict()
                break
            except CorruptArtifact as err:
                if attempt == 2:
                    raise
                logger.warning(f"{cell.describe()}: {err}; running the cell again")
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        tracking.log_failed(key, grid, cell, parent_run_id, reason, started)
        logger.error(f"{cell.describe()}: failed ({reason})")
        raise
    wall = time.perf_counter() - clock
    computed = store.computed()[before:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    extra = {"peak_rss_mib": peak, "stages_computed": len(computed), "wall_s": wall,
             # SparseGPT's damped Cholesky retries over every prune of the cell: a numerically fragile Hessian
             "cholesky_retries": sum(r.info.get("cholesky_retries", 0) for r in stages.refs if r.stage == "prune")}
    run_id = tracking.log_cell(key, grid, cell, report, parent_run_id, timings=report["timings"], extra_metrics=extra,
                               started=started, ended=time.time(), extra_tags=_prefect_tags())
    _link_mlflow(run_id)
    retention.record_cell(store, key, stages.refs, run_id)  # the cell is done: its intermediates may go
    logger.info(f"{cell.describe()}: ppl {report['ppl']:.2f}, sparsity {report['sparsity']:.4f} "
                f"({len(computed)} stages computed, {wall:.1f} s)")
    return {"cell_id": cell.id, "key": key, "run_id": run_id, "ppl": report["ppl"], "wall_s": wall,
            "stages_computed": len(computed), "stage_seconds": sum(c["seconds"] or 0.0 for c in computed)}


def _evaluate_finished(spec: CellSpec, stages: TaskStages, store: ArtifactStore) -> dict | None:
    """A cell that only adds evaluation stages (zero-shot, export, speed) to a cell already finished here: its
    report (from that cell's MLflow run) and final model (from the store) are reused, and only the new stages run.
    Retention may have dropped the finished cell's intermediates, so walking its stages again would recompute
    them (deterministically, to the same final model). None when there is no such cell: ``drive`` runs."""
    from losa.config import EVALUATIONS
    from losa.dsa import LosaReport, evaluate

    cfg = spec.config
    if all(getattr(cfg, e) is None for e in EVALUATIONS):
        return None
    base = spec.model_copy(update={"config": cfg.model_copy(update={e: None for e in EVALUATIONS})})
    record = retention.done(store, cell_key(base))
    if record is None or not record.info.get("run_id"):
        return None
    try:
        logged = tracking.cell_report(record.info["run_id"])
    except Exception as err:  # noqa: BLE001 - a run that cannot be read: compute the cell instead
        get_run_logger().warning(f"finished cell {record.info['run_id']} unreadable ({err}); running the cell")
        return None
    final = store.get(record.info["final"]) if record.info["final"] is not None else T.model_ref(spec)
    if final is None:
        return None
    stages.refs += [ref for k in record.info["stages"] if (ref := store.get(k)) is not None]
    fields = LosaReport.__dataclass_fields__
    report = LosaReport(**{k: v for k, v in logged.items() if k in fields})
    report.config = cfg.identity()
    get_run_logger().info(f"{spec.config.label}: reusing finished cell {record.info['run_id']} (its final model "
                          f"{final.stage} {final.key[:12]}); running the evaluation stages only")
    return evaluate(cfg, stages, final, T.model_ref(spec), report).to_dict()


def _prefect_tags() -> dict[str, str]:
    """The Prefect flow run a cell's MLflow run came from (the link from MLflow to Prefect)."""
    from prefect.runtime import flow_run

    return {"losa.prefect_flow_run_id": str(flow_run.id or ""), "losa.prefect_flow_run": str(flow_run.name or "")}


def _link_mlflow(run_id: str) -> None:
    """A link artifact on the Prefect flow run pointing at the cell's MLflow run (the link back)."""
    from prefect.artifacts import create_link_artifact

    exp = tracking.setup().get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    try:
        create_link_artifact(link=f"{tracking.ui_url()}/#/experiments/{exp}/runs/{run_id}", link_text="MLflow run",
                             key="mlflow-run", description=f"MLflow run {run_id} of this cell")
    except Exception as err:  # noqa: BLE001 - a missing link must not fail a finished cell
        get_run_logger().warning(f"could not link the MLflow run: {err}")


def _cell_run_name() -> str:
    """Prefect's name for a cell's flow run: the cell's run name (``+LoSA wanda 70% T=3 · seed 0 · testbed``)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        return load_grid(params["grid"]).cell(params["cell_id"]).run_name
    except Exception:  # noqa: BLE001 - a name must not fail the run; the validation error comes from the body
        return f"cell {params.get('cell_id')}"


@flow(name="losa-cell", log_prints=True, flow_run_name=_cell_run_name)
def losa_cell(grid: str, cell_id: str, parent_run_id: str | None = None) -> dict:
    """One cell of a grid (by its id), e.g. submitted by ``losa-grid`` to a GPU work pool."""
    spec = load_grid(grid)
    row = run_cell(spec.cell(cell_id), spec.name, parent_run_id, spill=spec.retain != "all")
    if spec.retain != "all":  # this cell's private intermediates go now, so a grid's disk peak is about one cell
        from flows.storage import apply

        dropped, freed = apply([spec], spec.retain)
        get_run_logger().info(f"retain={spec.retain}: {len(dropped)} intermediate snapshots removed, "
                              f"{freed / 2**20:.1f} MiB freed")
        row["store_freed_bytes"] = freed
    return row
