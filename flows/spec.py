"""Experiment grids as data: read ``experiments/<name>.yaml``, expand it into validated, canonical cells. No compute.

A grid file names models, ``fixed`` settings, ``axes`` (a cartesian product), ``include``/``exclude`` entries and the
``published`` numbers its tables may put beside their own. Every key is a :class:`losa.config.LosaConfig` field (nested
fields as ``finetune: {lr: ...}`` or ``finetune.lr``). :func:`load_grid` validates the whole grid, every cell
included, so a bad grid fails before any compute starts. Plain pydantic + yaml: no prefect, no mlflow.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from losa.config import (ExportConfig, FinetuneConfig, LosaConfig, Method, Pruner, SettingsConflict, SpeedConfig,
                         ZeroShotConfig, canonical_pattern, label)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
GRIDS_DIR = PROJECT_ROOT / "experiments"

Layout = Literal["table1", "zeroshot", "nm", "ablation", "steps", "seeds"]  # the paper table layouts (flows.tables)
# LosaConfig fields that are models themselves (the optional evaluation stages: ``zeroshot: {}`` runs one)
NESTED = {"finetune": FinetuneConfig, "zeroshot": ZeroShotConfig, "export": ExportConfig, "speed": SpeedConfig}


class GridSpecError(ValueError):
    """A grid file that cannot be loaded: the message names the file, the key path and what is allowed."""


class Published(BaseModel):
    """A published number for one cell setting (``../shared/docs/published-numbers.md``).

    ``metric``: ``ppl`` (WikiText-2 perplexity), or a published difference such as ``ppl_reduction`` (pruned minus
    adapted perplexity) or ``zeroshot_mean_gain`` (accuracy points).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    method: Method
    pruner: Pruner | None = None
    sparsity: float | None = None
    pattern: str = "unstructured"
    eval_seqlen: int
    metric: str = "ppl"
    value: float
    source: str

    def matches(self, cell: Cell) -> bool:
        """Whether this number belongs beside ``cell`` (same model, method, pruner, sparsity, pattern, eval length)."""
        c = cell.config
        if (self.model, self.method, self.eval_seqlen) != (cell.model, c.method, c.eval_seqlen):
            return False
        if self.method == "dense":
            return True
        return (self.pruner == c.pruner and _canonical_pattern(self.pattern) == c.pattern
                and (self.sparsity is None or abs(self.sparsity - c.sparsity) < 1e-9))


class Cell(BaseModel):
    """One experiment: a grid model entry (``"testbed"``, a hub id or a local path) and its full configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    config: LosaConfig

    @property
    def id(self) -> str:
        """First 12 hex digits of the sha256 of the canonical JSON of (model, config): stable across processes."""
        text = json.dumps({"model": self.model, "config": self.config.identity()}, sort_keys=True,
                          separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """Table row label: ``dense``, ``pruned``, ``+LoRA``, ``+LoSA``, or the ablations (``-LSR``, ``-LSR-SRA``)."""
        return self.config.label

    def params(self) -> dict[str, str]:
        """The flattened config as MLflow parameters: dotted keys for nested models, JSON text for non-strings."""
        out = {"model": self.model}
        for key, value in _flatten(self.config.identity()).items():
            out[key] = value if isinstance(value, str) else json.dumps(value)
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Cell:
        """Inverse of :meth:`params` (e.g. to rebuild a cell from an MLflow run)."""
        every = LosaConfig(**{name: model() for name, model in NESTED.items()})  # every nested field present
        str_keys = {k for k, v in _flatten(every.model_dump(mode="json")).items() if isinstance(v, str)}
        nested: dict[str, Any] = {}
        for key, text in params.items():
            if key == "model":
                continue
            value = text if key in str_keys else json.loads(text)
            head, _, tail = key.partition(".")
            if tail:
                nested.setdefault(head, {})[tail] = value
            else:
                nested[key] = value
        return cls(model=params["model"], config=LosaConfig.model_validate(nested))

    def describe(self) -> str:
        """One line, e.g. ``testbed wanda 70% unstructured +LoSA T=3 seed 0``."""
        return _describe(self.model, self.config.model_dump())

    @property
    def run_name(self) -> str:
        """What differs first, for run tables: ``+LoSA wanda 70% T=3 · seed 0 · smollm2-135m`` (the pattern shown
        when not unstructured, T for LoSA only: the baselines run one step)."""
        cfg = self.config
        if cfg.method == "dense":
            head = "dense"
        else:
            head = f"{cfg.label} {cfg.pruner} " + (f"{cfg.pattern}" if cfg.pattern != "unstructured" else
                                                   f"{cfg.sparsity * 100:g}%")
            if cfg.method == "losa" and "dsa" not in cfg.ablate:
                head += f" T={cfg.steps}"
        return f"{head} · seed {cfg.seed} · {Path(self.model).name}"


class Grid(BaseModel):
    """A grid of cells as one YAML file states it. :meth:`cells` expands, canonicalises and validates it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # a file and folder name under the state folder (outputs/<name>): no separators, no "..", nothing outside it
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    description: str = ""
    table: Layout = "table1"
    models: list[str] = Field(min_length=1)
    fixed: dict = {}
    per_model: dict[str, dict] = {}  # settings for one model only, over ``fixed`` (e.g. a shorter eval context)
    axes: dict[str, list] = {}
    include: list[dict] = []
    exclude: list[dict] = []
    published: list[Published] = []
    # what the artifact store keeps once cells finish (tasks/retention.py): all | shared | final
    retain: Literal["all", "shared", "final"] = "shared"
    path: Path | None = None

    _cells: list[Cell] | None = PrivateAttr(None)

    def cells(self) -> list[Cell]:
        """Every cell: models x axes product minus ``exclude``, then ``include``; canonical, deduplicated, in order.

        No ``axes``: one cell from ``fixed``, or only the ``include`` cells when there are any.
        Order: for each model, the product (axes in file order, the last axis varying fastest), then the ``include``
        entries without a ``model``; then ``include`` entries naming a model. A duplicate keeps its first place.
        """
        if self._cells is None:
            self._cells = _expand(self)
        return list(self._cells)

    def cell(self, cell_id: str) -> Cell:
        for c in self.cells():
            if c.id == cell_id:
                return c
        ids = ", ".join(c.id for c in self.cells())
        raise GridSpecError(f"{_where(self)}: no cell with id {cell_id!r}; ids: {ids}")

    def published_for(self, cell: Cell) -> list[Published]:
        return [p for p in self.published if p.matches(cell)]


def list_grids() -> list[str]:
    """Names of the shipped grids (``experiments/*.yaml``, subfolders ignored), sorted."""
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml") if p.is_file())


def load_grid(name_or_path: str | Path) -> Grid:
    """Load and fully validate a shipped grid (``"testbed"``) or a ``.yaml`` file; raises :class:`GridSpecError`."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(name_or_path)
    else:
        path = GRIDS_DIR / f"{text}.yaml"
        if not path.is_file():
            shipped = ", ".join(list_grids())
            raise GridSpecError(f"unknown grid {text!r}; shipped grids: {shipped} (or give a .yaml path)")
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise GridSpecError(f"{path}: cannot read the grid file: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise GridSpecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise GridSpecError(f"{path}: a grid file must be a mapping with keys {', '.join(_TOP_KEYS)}")
    unknown = [k for k in raw if k not in _TOP_KEYS]
    if unknown:
        raise GridSpecError(f"{path}: unknown top-level key {unknown[0]!r}; allowed keys: {', '.join(_TOP_KEYS)}")
    name = raw.setdefault("name", path.stem)
    if name != path.stem:
        raise GridSpecError(f"{path}: name: {name!r} differs from the file name {path.stem!r}; make them equal")
    for key, kind in (("fixed", dict), ("per_model", dict), ("axes", dict), ("include", list), ("exclude", list),
                      ("published", list), ("models", list)):
        if key in raw and not isinstance(raw[key], kind):
            raise GridSpecError(f"{path}: {key}: must be a {'mapping' if kind is dict else 'list'}, "
                                f"got {type(raw[key]).__name__}")
    for key, value in raw.get("axes", {}).items():
        if not isinstance(value, list):
            raise GridSpecError(f"{path}: axes.{key}: must be a list of values, got {value!r}")
    for key in ("include", "exclude"):
        for i, entry in enumerate(raw.get(key, [])):
            if not isinstance(entry, dict):
                raise GridSpecError(f"{path}: {key}[{i}]: must be a mapping of settings, got {entry!r}")
    try:
        grid = Grid.model_validate({**raw, "path": path})
    except ValidationError as err:
        raise GridSpecError(f"{path}: {_pydantic_message(err)}") from None
    grid.cells()  # validate every cell now, before anyone computes anything
    return grid


# --- expansion ---------------------------------------------------------------------------------------------------

_TOP_KEYS = tuple(k for k in Grid.model_fields if k != "path")


def _where(grid: Grid) -> str:
    return str(grid.path) if grid.path is not None else f"grid {grid.name!r}"


def _expand(grid: Grid) -> list[Cell]:
    where = _where(grid)
    fixed = _settings(grid.fixed, "fixed", where)
    per_model = {}
    for model, entry in grid.per_model.items():
        if model not in grid.models:
            raise GridSpecError(f"{where}: per_model.{model}: not one of models: {', '.join(grid.models)}")
        per_model[model] = _settings(entry, f"per_model.{model}", where)
    axes: list[list[tuple[dict, dict]]] = []
    for key, values in grid.axes.items():
        if key == "model":
            raise GridSpecError(f"{where}: axes.model: list models under `models:`, not as an axis")
        if not values:
            raise GridSpecError(f"{where}: axes.{key}: empty list; give at least one value or drop the axis")
        if key not in _allowed_keys():
            raise GridSpecError(f"{where}: axes.{key}: unknown setting; allowed keys: {', '.join(_allowed_keys())}")
        options = [_settings({key: v}, f"axes.{key}[{i}]", where, axis=True) for i, v in enumerate(values)]
        for _, o in options:
            clash = sorted(set(o) & set(fixed[1]))
            if clash:
                raise GridSpecError(f"{where}: axes.{key}: {clash[0]} is also set in `fixed`; set it in one place")
        axes.append(options)
    include = [_settings(e, f"include[{i}]", where, allow_model=True) for i, e in enumerate(grid.include)]
    exclude = [_settings(e, f"exclude[{i}]", where, allow_model=True)[0] for i, e in enumerate(grid.exclude)]

    raw: list[tuple[str, dict, dict]] = []  # (model, settings, origin of each setting)
    used = [False] * len(exclude)
    for model in grid.models:
        base = _merge(fixed, per_model.get(model, ({}, {})))
        product = itertools.product(*axes) if axes or not include else ()  # include alone: only its cells
        for combo in product:
            settings, origins = base
            for option in combo:
                settings, origins = _merge((settings, origins), option)
            hits = [i for i, e in enumerate(exclude) if _matches(model, settings, e)]
            for i in hits:
                used[i] = True
            if not hits:
                raw.append((model, settings, origins))
        for s, o in include:
            if "model" not in s:
                raw.append((model, *_merge(base, (s, o))))
    for s, o in include:
        if "model" in s:
            m = s["model"]
            s = {k: v for k, v in s.items() if k != "model"}
            raw.append((m, *_merge(_merge(fixed, per_model.get(m, ({}, {}))), (s, o))))
    for i, hit in enumerate(used):
        if not hit:
            raise GridSpecError(f"{where}: exclude[{i}]: {grid.exclude[i]} matches no cell of the product (a typo?)")
    if not raw:
        raise GridSpecError(f"{where}: the grid is empty after `exclude`; nothing to run")

    cells: dict[str, Cell] = {}
    for model, settings, origins in raw:
        cell = make_cell(model, settings, where, origins)
        cells.setdefault(cell.id, cell)
    out = list(cells.values())
    for i, p in enumerate(grid.published):
        if not any(p.matches(c) for c in out):
            raise GridSpecError(f"{where}: published[{i}]: ({p.model}, {p.method}, {p.pruner}, {p.sparsity}, "
                                f"{p.pattern}, eval_seqlen {p.eval_seqlen}) matches no cell of the grid")
    return out


def _settings(entry: Mapping, path: str, where: str, allow_model: bool = False,
              axis: bool = False) -> tuple[dict, dict]:
    """Validate one partial mapping of settings; return (values, origin key path of each value).

    Nested fields come back as ``{"finetune": {...}}``; origins are keyed by dotted name (``finetune.lr``).
    ``axis``: ``entry`` is one value of an axis and ``path`` already names it (``axes.pruner[1]``).
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    allowed = (["model"] if allow_model else []) + _allowed_keys()
    for key, value in entry.items():
        if not isinstance(key, str):
            raise GridSpecError(f"{where}: {path}: keys must be strings, got {key!r}")
        head, _, tail = key.partition(".")
        at = path if axis else f"{path}.{key}"
        if key == "model" and allow_model:
            if not isinstance(value, str) or not value:
                raise GridSpecError(f"{where}: {path}.model: must be a model name or path, got {value!r}")
            values["model"] = value
            origins["model"] = f"{path}.model"
        elif head in NESTED and (tail or isinstance(value, dict)):
            sub = {tail: value} if tail else value
            values.setdefault(head, {})
            for k, v in sub.items():
                sub_at = at if tail else f"{at}.{k}"
                if k not in NESTED[head].model_fields:
                    raise GridSpecError(f"{where}: {sub_at}: unknown setting; allowed keys: "
                                        f"{', '.join(NESTED[head].model_fields)}")
                values.setdefault(head, {})[k] = v
                origins[f"{head}.{k}"] = sub_at
        elif key in LosaConfig.model_fields and not tail:
            values[key] = value
            origins[key] = at
        else:
            raise GridSpecError(f"{where}: {at}: unknown setting; allowed keys: {', '.join(allowed)}")
    return values, origins


def _allowed_keys() -> list[str]:
    return list(LosaConfig.model_fields) + [f"{n}.{k}" for n, m in NESTED.items() for k in m.model_fields]


def _literal_values(annotation: Any) -> list:
    """The allowed values of a Literal (also inside tuple[...] / X | None); [] when the field is not a choice."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return [v for arg in typing.get_args(annotation) if arg is not Ellipsis for v in _literal_values(arg)]


def _merge(a: tuple[dict, dict], b: tuple[dict, dict]) -> tuple[dict, dict]:
    """``b`` over ``a``; nested models merge key by key."""
    values = dict(a[0])
    for key, value in b[0].items():
        values[key] = {**values[key], **value} if key in NESTED and key in values else value
    return values, {**a[1], **b[1]}


def _matches(model: str, settings: dict, entry: dict) -> bool:
    """Whether a cell's settings (LosaConfig defaults for unset keys) agree with every key of an exclude entry."""
    default = LosaConfig()
    for key, want in entry.items():
        if key == "model":
            have = model
        elif key in NESTED:
            sub = settings.get(key, {})
            base = getattr(default, key) or NESTED[key]()
            if any(_norm(sub.get(k, getattr(base, k))) != _norm(v) for k, v in want.items()):
                return False
            continue
        else:
            have = settings.get(key, getattr(default, key))
        if _norm(have) != _norm(want):
            return False
    return True


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, str):
        return value.strip().lower()
    return value


# --- canonical form ----------------------------------------------------------------------------------------------

def _canonical_pattern(text: str) -> str:
    try:
        return canonical_pattern(text)
    except ValueError:
        return text


def make_cell(model: str, settings: Mapping[str, Any], where: str, origins: Mapping[str, str] | None = None) -> Cell:
    """One cell from (unvalidated) settings, the way a grid makes each of its cells: canonical
    (:meth:`LosaConfig.canonical`) and validated once. ``origins`` (setting -> where it was given, e.g.
    ``axes.pruner[1]`` or ``--pruner``) let a bad value's message name its source.

    Raises:
        GridSpecError: one line naming ``where``, the setting's origin and what is allowed.
    """
    origins = dict(origins or {})
    try:
        canon = LosaConfig.canonical_settings(settings)
    except SettingsConflict as err:
        given = " contradicts ".join(f"{origins.get(k, k)} = {v!r}" for k, v in zip(err.keys, err.values))
        raise GridSpecError(f"{where}: {given}, {err.reason}") from None
    try:
        return Cell(model=model, config=LosaConfig(**canon))
    except ValidationError as err:
        e = err.errors()[0]
        loc = list(e["loc"])
        if loc and loc[0] == "config":
            loc = loc[1:]
        if not loc:  # a cross-field check of the whole cell
            raise GridSpecError(f"{where}: cell '{_describe(model, canon)}': {_pydantic_message(err)}") from None
        head = str(loc[0])
        key = f"{head}.{loc[1]}" if head in NESTED and len(loc) > 1 else head
        rest = loc[2:] if head in NESTED and len(loc) > 1 else loc[1:]
        at = origins.get(key, key) + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in rest)
        field = (NESTED[head].model_fields.get(str(loc[1])) if key != head else LosaConfig.model_fields.get(head))
        choices = _literal_values(field.annotation) if field is not None else []
        hint = f"; allowed: {', '.join(map(str, choices))}" if choices else ""
        msg = e["msg"].removeprefix("Value error, ")
        got = _lookup(settings, key.split("."))
        raise GridSpecError(f"{where}: {at}: {msg} (got {got!r}){hint}") from None


def _lookup(settings: Mapping[str, Any], path: list[str]) -> Any:
    value: Any = settings
    for part in path:
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _pydantic_message(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"]).lstrip(".")
    msg = e["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


# --- labels ------------------------------------------------------------------------------------------------------

def _describe(model: str, settings: Mapping[str, Any]) -> str:
    d = LosaConfig.model_fields
    get = lambda k: settings.get(k, d[k].default)  # noqa: E731
    method, seed = get("method"), get("seed")
    if method == "dense":
        return f"{model} dense seed {seed}"
    parts = [model, get("pruner"), f"{float(get('sparsity')) * 100:g}%", str(get("pattern")),
             label(method, tuple(get("ablate")))]
    if method in ("lora", "losa"):
        parts.append(f"T={get('steps')}")
    return " ".join(parts) + f" seed {seed}"


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


if __name__ == "__main__":  # python -m flows.spec [grid ...]: list the cells of grids
    import sys

    for name in sys.argv[1:] or list_grids():
        g = load_grid(name)
        print(f"{g.name} ({g.table}, {len(g.cells())} cells): {g.description}")
        for c in g.cells():
            print(f"  {c.id}  {c.describe()}")
