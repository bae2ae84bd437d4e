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
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError

from losa.config import LosaConfig
from losa.config import FinetuneConfig
from losa.patterns import Pattern

PROJECT_ROOT = Path(__file__).resolve().parents[1]
GRIDS_DIR = PROJECT_ROOT / "experiments"

Table = Literal["table1", "zeroshot", "nm", "ablation", "steps", "seeds"]
ABLATION_ORDER = ("lsr", "sra", "dsa")
NESTED = {"finetune": FinetuneConfig}  # LosaConfig fields that are models themselves
DENSE_IGNORES = ("pruner", "pattern", "ablate")  # reset to LosaConfig defaults (plus sparsity 0, steps 1)


class GridSpecError(ValueError):
    """A grid file that cannot be loaded: the message names the file, the key path and what is allowed."""


class Published(BaseModel):
    """A published number for one cell setting (``../shared/docs/published-numbers.md``).

    ``metric``: ``ppl`` (WikiText-2 perplexity), or a published difference such as ``ppl_reduction`` (pruned minus
    adapted perplexity) or ``zeroshot_mean_gain`` (accuracy points).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    method: Literal["dense", "pruned", "lora", "losa"]
    pruner: str | None = None
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
        text = json.dumps({"model": self.model, "config": self.config.model_dump(mode="json")}, sort_keys=True,
                          separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """Table row label: ``dense``, ``pruned``, ``+LoRA``, ``+LoSA``, or the ablations (``-LSR``, ``-LSR-SRA``)."""
        return _label(self.config.method, self.config.ablate)

    def params(self) -> dict[str, str]:
        """The flattened config as MLflow parameters: dotted keys for nested models, JSON text for non-strings."""
        out = {"model": self.model}
        for key, value in _flatten(self.config.model_dump(mode="json")).items():
            out[key] = value if isinstance(value, str) else json.dumps(value)
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Cell:
        """Inverse of :meth:`params` (e.g. to rebuild a cell from an MLflow run)."""
        str_keys = {k for k, v in _flatten(LosaConfig().model_dump(mode="json")).items() if isinstance(v, str)}
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


class Grid(BaseModel):
    """A grid of cells as one YAML file states it. :meth:`cells` expands, canonicalises and validates it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    table: Table = "table1"
    models: list[str] = Field(min_length=1)
    fixed: dict = {}
    per_model: dict[str, dict] = {}  # settings for one model only, over ``fixed`` (e.g. a shorter eval context)
    axes: dict[str, list] = {}
    include: list[dict] = []
    exclude: list[dict] = []
    published: list[Published] = []
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
        cell = _make_cell(model, _canonical(settings, origins, where), where)
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
            for k, v in sub.items():
                sub_at = at if tail else f"{at}.{k}"
                values.setdefault(head, {})[k] = _value(NESTED[head], k, v, sub_at, where)
                origins[f"{head}.{k}"] = sub_at
        elif key in LosaConfig.model_fields and not tail:
            values[key] = _value(LosaConfig, key, value, at, where)
            origins[key] = at
        else:
            raise GridSpecError(f"{where}: {at}: unknown setting; allowed keys: {', '.join(allowed)}")
    return values, origins


def _allowed_keys() -> list[str]:
    return list(LosaConfig.model_fields) + [f"{n}.{k}" for n, m in NESTED.items() for k in m.model_fields]


def _value(model: type[BaseModel], key: str, value: Any, path: str, where: str) -> Any:
    """One setting checked against its field (type, bounds, allowed values); returns the coerced value."""
    if model.model_fields.get(key) is None:
        raise GridSpecError(f"{where}: {path}: unknown setting; allowed keys: {', '.join(model.model_fields)}")
    if model is LosaConfig and key == "pattern":
        if isinstance(value, int):
            raise GridSpecError(f"{where}: {path}: got the number {value}; quote N:M patterns (YAML reads an "
                                f"unquoted 2:4 as the base-60 number 124); allowed: {_PATTERNS}")
        if not isinstance(value, str):
            raise GridSpecError(f"{where}: {path}: must be a string; allowed: {_PATTERNS}")
        try:
            _parse_pattern(value)
        except ValueError as err:
            raise GridSpecError(f"{where}: {path}: {err}; allowed: {_PATTERNS}") from None
        return _canonical_pattern(value)
    try:
        return _adapter(model, key).validate_python(value)
    except ValidationError as err:
        e = err.errors()[0]
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"])
        choices = _literal_values(model.model_fields[key].annotation)
        hint = f"; allowed: {', '.join(map(str, choices))}" if choices else ""
        raise GridSpecError(f"{where}: {path}{loc}: {e['msg']} (got {value!r}){hint}") from None


_PATTERNS = "'unstructured', 'N:M' with 0 < N < M (N weights kept of every M, e.g. '2:4'), 'mixed-N:M'"


@cache
def _adapter(model: type[BaseModel], key: str) -> TypeAdapter:
    field = model.model_fields[key]
    return TypeAdapter(Annotated[field.annotation, field])


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
            if any(_norm(sub.get(k, getattr(getattr(default, key), k))) != _norm(v) for k, v in want.items()):
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

def _parse_pattern(text: str) -> tuple[str, Pattern]:
    t = text.strip().lower()
    if t.startswith("mixed-"):
        p = Pattern.parse(t[len("mixed-"):])
        if not p.is_nm:
            raise ValueError(f"mixed patterns need an N:M base, got {text!r}")
        return "mixed", p
    p = Pattern.parse(t)
    return ("nm" if p.is_nm else "unstructured"), p


def _canonical_pattern(text: str) -> str:
    try:
        kind, p = _parse_pattern(text)
    except ValueError:
        return text
    return f"mixed-{p}" if kind == "mixed" else str(p)


def _canonical(settings: dict, origins: dict, where: str) -> dict:
    """Settings in the one form equal experiments share (so they get one id and one cache entry).

    - ``dense`` evaluates only: pruner, pattern and ablate go back to their defaults, sparsity 0, steps 1.
    - N:M and mixed N:M patterns fix the sparsity (1 - N/M); a different explicit sparsity is an error.
    - ``pruned`` and ``lora`` never ablate; ``pruned`` has one step. ``lora`` keeps ``steps``: with text data its
      training budget is that of a T-step LoSA run (losa/stages.py). Both baselines prune uniformly, so
      ``mixed-N:M`` becomes ``N:M`` for them.
    - Ablations are listed in the order lsr, sra, dsa.
    """
    s = dict(settings)
    method = s.get("method", LosaConfig.model_fields["method"].default)
    if method == "dense":
        for key in DENSE_IGNORES:
            s.pop(key, None)
        s["sparsity"], s["steps"] = 0.0, 1
        return s
    kind, p = _parse_pattern(s.get("pattern", "unstructured"))
    if p.is_nm:
        if "sparsity" in s and abs(s["sparsity"] - p.sparsity) > 1e-9:
            raise GridSpecError(f"{where}: {origins['sparsity']} = {s['sparsity']} contradicts {origins['pattern']} = "
                                f"{s['pattern']!r}, which implies sparsity {p.sparsity:g}; "
                                "drop the sparsity for N:M cells")
        s["sparsity"] = p.sparsity
    if method in ("pruned", "lora"):
        s["ablate"] = ()
        if kind == "mixed":
            s["pattern"] = str(p)
        if method == "pruned":
            s["steps"] = 1
    else:
        s["ablate"] = tuple(sorted(s.get("ablate", ()), key=ABLATION_ORDER.index))
    return s


def _make_cell(model: str, settings: dict, where: str) -> Cell:
    try:
        return Cell(model=model, config=LosaConfig(**settings))
    except ValidationError as err:
        raise GridSpecError(f"{where}: cell '{_describe(model, settings)}': {_pydantic_message(err)}") from None


def _pydantic_message(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"]).lstrip(".")
    msg = e["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


# --- labels ------------------------------------------------------------------------------------------------------

def _label(method: str, ablate: tuple | list) -> str:
    if method == "losa" and ablate:
        return "".join(f"-{a.upper()}" for a in sorted(ablate, key=ABLATION_ORDER.index))
    return {"dense": "dense", "pruned": "pruned", "lora": "+LoRA", "losa": "+LoSA"}[method]


def _describe(model: str, settings: Mapping[str, Any]) -> str:
    d = LosaConfig.model_fields
    get = lambda k: settings.get(k, d[k].default)  # noqa: E731
    method, seed = get("method"), get("seed")
    if method == "dense":
        return f"{model} dense seed {seed}"
    parts = [model, get("pruner"), f"{float(get('sparsity')) * 100:g}%", str(get("pattern")),
             _label(method, tuple(get("ablate")))]
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
