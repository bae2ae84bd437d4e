"""The ``losa`` command. It validates arguments and data before any compute, then calls into the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import get_args

from losa.config import ABLATIONS, METHODS, PRUNERS, Propagation
from tasks.state import PROJECT_ROOT, state_dir

DEFAULT_MODEL = PROJECT_ROOT / "testbed" / "model"
DEFAULT_RECIPE = PROJECT_ROOT / "testbed" / "recipe.json"


def _state_env() -> None:
    """Keep every cache this process may write under the project state folder (nothing in HOME or TMPDIR)."""
    os.environ.setdefault("HF_HOME", str(state_dir() / "hf"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(state_dir() / "torchinductor"))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _testbed_build(args) -> int:
    from losa import data, testbed

    recipe = testbed.load_recipe(args.recipe)
    data.require(*recipe.corpus, data.WIKITEXT2_TEST)
    if args.steps is not None:
        recipe = recipe.model_copy(update={"steps": args.steps})
    work = Path(args.work_dir) if args.work_dir else state_dir() / "testbed-build"
    testbed.build(recipe, Path(args.out), work)
    return 0


def _resolve_model(args) -> str:
    """``--model`` as a local folder (``testbed`` and packaged names such as ``smollm2-135m`` resolve, see
    :mod:`losa.zoo`); a missing path that is not a hub id-like name fails here, before any compute."""
    from losa import zoo

    folder = zoo.model_folder(args.model)
    if not Path(folder).is_dir() and (Path(folder).is_absolute() or folder.startswith(".") or folder.count("/") > 1):
        raise FileNotFoundError(f"--model {args.model}: no such folder (nor 'testbed' or a packaged model: "
                                f"{', '.join(zoo.PACKAGED)})")
    args.model = folder
    return folder


def _load(args):
    """Model, tokenizer, WikiText-2 test text and calibration windows, as the arguments ask."""
    from losa import data, load_model

    model, tokenizer = load_model(args.model, device=args.device)
    calib = data.calibration_windows(tokenizer, args.nsamples, args.seqlen, seed=args.seed)
    return model, tokenizer, data.wikitext2_test_text(), calib


def _prune(args) -> int:
    from losa import Pattern, data
    from losa.pruners import METHODS

    # validate everything before loading anything heavy
    try:
        pattern = Pattern.parse(args.pattern)
        rates = [float(x) for x in args.sparsity.split(",")] if args.sparsity else [None if pattern.is_nm else 0.5]
        if args.method not in METHODS:
            raise ValueError(f"unknown method {args.method!r}; choose one of {sorted(METHODS)}")
        for r in rates:
            pattern.resolve_sparsity(r)
        if args.nsamples < 1 or args.seqlen < 2 or args.eval_seqlen < 2:
            raise ValueError("--nsamples must be >= 1 and --seqlen/--eval-seqlen >= 2")
        data.require(data.C4_CALIBRATION, data.WIKITEXT2_TEST)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(_resolve_model(args))
        if len(rates) > 1 and len(rates) != config.num_hidden_layers:
            raise ValueError(f"--sparsity has {len(rates)} rates for {config.num_hidden_layers} blocks")
    except (ValueError, OSError) as err:
        raise SystemExit(f"losa prune: {err}") from None

    from rich.console import Console
    from rich.table import Table

    from losa import prune_model
    from losa.evaluate import perplexity

    console = Console()
    model, tokenizer, text, calib = _load(args)

    def ppl() -> float:
        return perplexity(model, tokenizer, text, args.eval_seqlen, args.batch_size, args.eval_windows, progress=True)

    dense = ppl()
    report = prune_model(model, calib, args.method, rates[0] if len(rates) == 1 else rates, pattern,
                         batch_size=args.calib_batch_size, propagation=args.propagation, progress=True)
    pruned = ppl()
    windows = "all windows" if args.eval_windows is None else f"first {args.eval_windows} windows"
    table = Table(title=f"{args.model}: {args.method} {pattern}")
    for col in ("model", "sparsity (achieved)", f"WikiText-2 ppl (seqlen {args.eval_seqlen}, {windows})"):
        table.add_column(col, justify="right")
    table.add_row("dense", "0.0000", f"{dense:.3f}")
    table.add_row(f"{args.method} {pattern}", f"{report.sparsity:.4f}", f"{pruned:.3f}")
    console.print(table)
    t = report.timings
    console.print(f"prune {t['total']:.1f} s (statistics {t['statistics']:.1f}, prune {t['prune']:.1f}, "
                  f"propagate {t['propagate']:.1f}); Cholesky retries: {report.cholesky_retries}")
    if args.json:
        Path(args.json).write_text(json.dumps({"dense_ppl": dense, "ppl": pruned, **report.to_dict()}, indent=2))
    return 0


def _table(args) -> int:
    from losa import Pattern, data
    from losa.pruners import METHODS

    try:
        methods = args.methods.split(",")
        for m in methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; choose from {sorted(METHODS)}")
        settings = []  # (sparsity or None, pattern)
        for item in args.settings.split(","):
            pattern = Pattern.parse(item) if ":" in item else Pattern()
            rate = None if pattern.is_nm else float(item)
            pattern.resolve_sparsity(rate)
            settings.append((rate, pattern))
        data.require(data.C4_CALIBRATION, data.WIKITEXT2_TEST)
        _resolve_model(args)
    except (ValueError, OSError) as err:
        raise SystemExit(f"losa table: {err}") from None

    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from losa import prune_model
    from losa.evaluate import perplexity

    console = Console()
    model, tokenizer, text, calib = _load(args)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def ppl() -> float:
        return perplexity(model, tokenizer, text, args.eval_seqlen, args.batch_size, args.eval_windows)

    rows = [{"method": "dense", "setting": "-", "sparsity": 0.0, "ppl": ppl(), "prune_s": 0.0}]
    console.print(f"dense: ppl {rows[0]['ppl']:.2f}")
    for method in methods:
        for rate, pattern in settings:
            model.load_state_dict(dense_state)
            report = prune_model(model, calib, method, rate, pattern, batch_size=args.calib_batch_size)
            setting = str(pattern) if pattern.is_nm else f"{rate:.0%}"
            rows.append({"method": method, "setting": setting, "sparsity": report.sparsity, "ppl": ppl(),
                         "prune_s": report.timings["total"]})
            console.print(f"{method} {setting}: sparsity {report.sparsity:.4f}, ppl {rows[-1]['ppl']:.2f} "
                          f"(pruned in {report.timings['total']:.1f} s)")
    df = pd.DataFrame(rows)
    df["vs_dense"] = df["ppl"] / rows[0]["ppl"]
    windows = "all windows" if args.eval_windows is None else f"first {args.eval_windows} windows"
    table = Table(title=f"WikiText-2 perplexity, {args.model} (eval seqlen {args.eval_seqlen}, {windows}; "
                        f"calibration {args.nsamples} x {args.seqlen} C4)")
    for col in ("method", "setting", "sparsity", "ppl", "x dense", "prune s"):
        table.add_column(col, justify="right")
    for r in df.itertuples():
        table.add_row(r.method, r.setting, f"{r.sparsity:.4f}", f"{r.ppl:.2f}", f"{r.vs_dense:.2f}", f"{r.prune_s:.1f}")
    console.print(table)
    if args.csv:
        df.to_csv(args.csv, index=False)
        console.print(f"written {args.csv}")
    return 0


_RUN_OPTIONS = ("method", "pruner", "sparsity", "pattern", "ablate", "steps", "nsamples", "seqlen", "eval_seqlen",
                "eval_windows", "seed", "train_steps", "final_train_steps", "physical_rank")  # LosaConfig fields


def _run(args) -> int:
    from flows.spec import GridSpecError, make_cell
    from losa import data

    settings = {k: getattr(args, k) for k in _RUN_OPTIONS if getattr(args, k) is not None}
    try:
        # the path every grid cell takes: canonical, validated once, errors naming the option
        cfg = make_cell(args.model, settings, "losa run", {k: f"--{k.replace('_', '-')}" for k in settings}).config
        data.require(data.C4_CALIBRATION, data.WIKITEXT2_TEST,
                     *([data.ALPACA] if cfg.train_data == "alpaca" else [data.C4_CALIBRATION]))
        from transformers import AutoConfig

        AutoConfig.from_pretrained(_resolve_model(args))
    except GridSpecError as err:
        raise SystemExit(str(err)) from None
    except (ValueError, OSError) as err:
        raise SystemExit(f"losa run: {err}") from None

    from rich.console import Console
    from rich.table import Table

    from losa import load_model, run_losa

    console = Console()
    model, tokenizer = load_model(args.model, device=args.device)
    report = run_losa(model, tokenizer, cfg)
    if report.steps:
        table = Table(title=f"{cfg.method} {cfg.pruner} {cfg.pattern} -> {cfg.sparsity:g}" +
                      (f" (without {', '.join(cfg.ablate)})" if cfg.ablate else ""))
        for col in ("t", "theta", "rates (min-max)", "ranks", "L_l (mean)", "loss first -> last", "s"):
            table.add_column(col, justify="right")
        for st in report.steps:
            rates = [r for r in st.rates if r is not None]
            table.add_row(str(st.t), f"{st.theta:.3f}",
                          f"{min(rates):.3f}-{max(rates):.3f}" if rates else ",".join(st.patterns),
                          ",".join(map(str, st.applied_ranks)), f"{sum(st.errors) / len(st.errors):.4f}",
                          f"{st.train_losses[0]:.3f} -> {st.train_losses[-1]:.3f}",
                          f"{sum(st.timings.values()):.0f}")
        console.print(table)
    line = f"WikiText-2 ppl {report.ppl:.3f} (seqlen {cfg.eval_seqlen}); sparsity {report.sparsity:.4f}"
    if report.ppl_unmerged is not None:
        line += f"; unmerged ppl {report.ppl_unmerged:.3f} at sparsity {report.sparsity_before_merge:.4f}"
    if report.ppl_pruned is not None:
        line += f"; pruned before fine-tuning {report.ppl_pruned:.3f}"
    console.print(line + f"; trainable params {report.trainable_params:,}; {report.timings['total']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


def _grid_or_exit(name: str, command: str):
    from flows.spec import GridSpecError, load_grid

    try:
        return load_grid(name)
    except GridSpecError as err:
        raise SystemExit(f"losa {command}: {err}") from None


def _preflight_or_exit(spec, command: str, resources: bool = True) -> None:
    """The grid against its models and this machine (flows.preflight), before anything is written."""
    from flows.preflight import PreflightError, require

    try:
        require(spec, resources=resources)
    except PreflightError as err:
        raise SystemExit(f"losa {command}: " + f"\nlosa {command}: ".join(str(err).splitlines())) from None


def _prefect_env() -> None:
    """Flows started from the CLI keep Prefect's state under the project state folder too."""
    os.environ.setdefault("PREFECT_HOME", str(state_dir() / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def _temporary_server() -> None:
    """Without ``PREFECT_API_URL`` each process runs flows on its own temporary Prefect server, all on one database;
    two first launches at once would race its migrations, so starting it is serialised by a file lock."""
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.client.orchestration import get_client

        from tasks.state import file_lock

        with file_lock("prefect-server"), get_client(sync_client=True) as client:
            client.api_healthcheck()  # starts this process's temporary server (and migrates its database) now


def _grid(args) -> int:
    spec = _grid_or_exit(args.grid, "grid")  # validated before any compute
    _preflight_or_exit(spec, "grid", resources=args.dispatch == "local")
    _prefect_env()
    _temporary_server()
    from flows.grid import losa_grid

    state = losa_grid(args.grid, concurrency=args.concurrency, dispatch=args.dispatch, return_state=True)
    print(f"grid {spec.name}: {state.name}")
    return 0 if state.is_completed() else 1


def _check(args) -> int:
    from rich.console import Console
    from rich.table import Table

    spec = _grid_or_exit(args.grid, "check")
    cells = spec.cells()
    console = Console()
    console.print(f"grid {spec.name} ({spec.path}): valid, {len(cells)} cells, table layout {spec.table}")
    if args.no_cache:
        return 0
    from flows.cell import cached_stages, cell_key, cell_spec
    from tasks import retention
    from tasks.store import ArtifactStore

    store = ArtifactStore()
    table = Table(title="cached stages (artifact store)" + (", re-hashed" if args.verify else ""))
    for col in ("cell", "id", "stages cached", "complete") + (("corrupt (removed)",) if args.verify else ()):
        table.add_column(col)
    total = done = 0
    for cell in cells:
        keys: list[str] = []
        before = set(store.removed)
        try:
            spec_ = cell_spec(cell, as_task=False)
            if (record := retention.done(store, cell_key(spec_))) is not None:
                # finished; the retention policy may have dropped its intermediates
                keys = [k for k in record.info["stages"] if store.get(k) is not None]
                found, complete = len(keys), True
            else:
                found, complete = cached_stages(spec_, keys)
            if args.verify:
                store.verify(list(dict.fromkeys(keys)))
        except FileNotFoundError as err:
            raise SystemExit(f"losa check: {err}") from None
        bad = set(store.removed) - before  # by the lookups' cheap checks or by re-hashing
        if bad:
            found, complete = cached_stages(spec_)[0], False
        total, done = total + found, done + complete
        table.add_row(cell.describe(), cell.id, str(found), "yes" if complete else "",
                      *((str(len(bad)) if bad else "",) if args.verify else ()))
    console.print(table)
    console.print(f"{done} of {len(cells)} cells complete; {total} stage artifacts cached")
    if store.removed:
        console.print(f"{len(store.removed)} corrupt artifacts found and removed (the next `losa grid {spec.name}` "
                      "rebuilds them)")
    elif args.verify:
        console.print("every cached artifact matches its checksum")
    return 1 if store.removed else 0


def _gc(args) -> int:
    from flows.spec import GRIDS_DIR
    from flows.storage import apply, store_bytes

    names = args.grids or sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))
    grids, skipped = [], []
    for name in names:
        grid = _grid_or_exit(name, "gc")
        try:
            for cell in {c.model for c in grid.cells()}:
                _resolve_model_quietly(cell)
        except (FileNotFoundError, OSError, ValueError) as err:
            print(f"losa gc: skipping grid {grid.name}: its model is not available here ({err})")
            skipped.append(grid.name)
            continue
        grids.append(grid)
    if args.orphans and skipped and not args.grids:
        # what a skipped grid reaches cannot be told here: its artifacts would count as orphans
        raise SystemExit(f"losa gc --orphans: cannot tell what {', '.join(skipped)} reach (model not here), so their "
                         "artifacts would count as orphans; name the grids whose artifacts to keep: "
                         "losa gc --orphans <grid> ...")
    before = store_bytes()
    dropped, freed = apply(grids, args.retain, dry_run=args.dry_run, orphans=args.orphans)
    verb = "would free" if args.dry_run else "freed"
    what = "intermediate snapshots and artifacts no cell reaches" if args.orphans else "intermediate snapshots"
    print(f"store: {before / 2**30:.2f} GiB; retain={args.retain} over {len(grids)} grids: {len(dropped)} "
          f"{what}, {verb} {sum(dropped.values()) / 2**30:.2f} GiB")
    return 0


def _export(args) -> int:
    from flows.export import NotFinished, export_cell

    spec = _grid_or_exit(args.grid, "export")
    try:
        spec.cell(args.cell)
    except (KeyError, ValueError) as err:
        raise SystemExit(f"losa export: {err}") from None
    out = Path(args.out) if args.out else state_dir() / "exports" / spec.name / args.cell
    try:
        r = export_cell(spec, args.cell, out, args.dtype, check=not args.no_check)
    except NotFinished as err:
        raise SystemExit(f"losa export: {err}") from None
    print(f"{out}/hf: Hugging Face folder ({args.dtype}), {r['files']['hf'] / 2**20:.1f} MiB")
    print(f"{out}/sparse: sparse-bitmask form, {r['files']['sparse'] / 2**20:.1f} MiB = {r['file_ratio']:.3f}x; "
          f"prunable linears {r['bytes_sparse_prunable'] / 2**20:.1f} of {r['bytes_dense_prunable'] / 2**20:.1f} MiB "
          f"= {r['ratio_prunable']:.3f}x ({r['sparsity_config']['global_sparsity'] * 100:.1f}% zeros); "
          f"restores the weights bit for bit")
    if "ppl_exported" in r:
        print(f"perplexity: exported folder {r['ppl_exported']:.4f}, cell {r['ppl_cell']:.4f}")
    return 0


def _resolve_model_quietly(model: str) -> None:
    from tasks.model import resolve_model

    resolve_model.fn(model)


def _tables(args) -> int:
    _grid_or_exit(args.grid, "tables")
    _prefect_env()
    from flows.grid import losa_tables

    losa_tables(args.grid, out_dir=args.out)
    return 0


def _claims(args) -> int:
    from flows.claims import write_report

    path = write_report(args.prefix, Path(args.out) if args.out else None)
    print(path.read_text())
    print(f"written to {path}")
    return 0


def _baseline(args) -> int:
    if args.perf:
        from flows import perf
        from flows.grid import PERF_BASELINE

        data = perf.write_baseline(PERF_BASELINE, repeats=args.repeats)
        for k, b in data["ratios"].items():
            print(f"{k:<28} {b['mean']:.3f} ± {b['band']:.3f}  (sd {b['sd']:.3f}, n={b['n']})")
        print(f"speed baseline written to {PERF_BASELINE}")
        return 0
    _grid_or_exit(args.grid, "baseline")
    from flows.grid import write_baseline

    print(f"baseline written to {write_baseline(args.grid)}")
    return 0


def _up(args) -> int:
    _prefect_env()
    from flows import service

    info = service.up(workers=args.workers, gpu_workers=args.gpu_workers)
    print(json.dumps(info, indent=1, default=str))
    print(f"Prefect UI: {service.base_url()}  -  run a grid: PREFECT_API_URL={service.base_url()}/api "
          "prefect deployment run losa-grid/testbed --watch  -  stop: losa down")
    return 0


def _launch(args) -> int:
    """The deployment path: server + worker (``losa up``), ``prefect deployment run losa-grid/<grid> --watch``."""
    import subprocess

    spec = _grid_or_exit(args.grid, "launch")
    _prefect_env()
    from flows import service

    if f"losa-grid/{spec.name}" not in service.deployments() or not service.healthy():
        service.up()
    cmd = [str(Path(sys.executable).with_name("prefect")), "deployment", "run", f"losa-grid/{spec.name}", "--watch"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    stop = _follow_worker_logs(state_dir() / "logs")  # the cells' one-line results, as they finish
    try:
        rc = subprocess.run(cmd, env={**os.environ, **service.service_env()}, cwd=PROJECT_ROOT,
                            stdout=subprocess.DEVNULL if not args.events else None).returncode
    finally:
        stop()
    out = state_dir() / "outputs" / spec.name
    if (out / "tables.md").exists():
        print((out / "tables.md").read_text())
        print(f"tables, plots and results of grid {spec.name}: {out}")
    print(f"Prefect UI {service.base_url()} (stop with `losa down`); MLflow: .venv/bin/mlflow ui "
          f"--backend-store-uri sqlite:///{state_dir() / 'mlflow.db'}")
    return rc


def _follow_worker_logs(folder: Path):
    """Print the grid's progress lines from the workers' logs while a deployment runs; returns a stop function."""
    import re
    import threading
    import time

    wanted = re.compile(r" - (grid |.*: ppl |\d+ cells up to date|.*cells failed)")
    offsets = {p: p.stat().st_size for p in folder.glob("worker-*.log")}
    done = threading.Event()

    def follow() -> None:
        while not done.wait(1.0):
            for p in folder.glob("worker-*.log"):
                with open(p, errors="replace") as f:
                    f.seek(offsets.get(p, 0))
                    for line in f:
                        if wanted.search(line):
                            print("  " + line.rstrip(), flush=True)
                    offsets[p] = f.tell()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()

    def stop() -> None:
        time.sleep(1.5)  # let the last lines arrive
        done.set()
        thread.join()

    return stop


def _down(args) -> int:
    _prefect_env()
    from flows import service

    stopped = service.down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="testbed",
                   help="testbed, smollm2-135m (packaged), a local folder, or a hub id when online")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="calibration window length (tokens)")
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    p.add_argument("--eval-windows", type=int, default=None, help="score only the first N windows (quick checks)")
    p.add_argument("--calib-batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="losa", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    tb = sub.add_parser("testbed", help="the CPU testbed model").add_subparsers(dest="action", required=True)
    b = tb.add_parser("build", help="train the testbed from its recipe (resumable)")
    b.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    b.add_argument("--out", default=str(DEFAULT_MODEL))
    b.add_argument("--work-dir", default=None, help="scratch + checkpoints (default: $LOSA_HOME/testbed-build)")
    b.add_argument("--steps", type=int, default=None, help="override the recipe's step count (for trials)")
    b.set_defaults(func=_testbed_build)

    pr = sub.add_parser("prune", help="prune a model and print perplexity before and after")
    _common_model_args(pr)
    pr.add_argument("--method", default="wanda")
    pr.add_argument("--sparsity", default=None, help="one rate, or one per block separated by commas "
                    "(default 0.5; implied by an N:M pattern)")
    pr.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M with N kept, e.g. 2:4")
    pr.add_argument("--propagation", choices=get_args(Propagation), default="pruned")
    pr.add_argument("--json", default=None, help="also write the report here")
    pr.set_defaults(func=_prune)

    run = sub.add_parser("run", help="one LoSA cell: dense, pruned, +LoRA or LoSA (with ablations)")
    _common_model_args(run)
    run.add_argument("--method", choices=METHODS, default=None)
    run.add_argument("--pruner", choices=PRUNERS, default=None)
    run.add_argument("--sparsity", type=float, default=None)
    run.add_argument("--pattern", default=None, help="unstructured, N:M, or mixed-N:M")
    run.add_argument("--ablate", action="append", choices=ABLATIONS)
    run.add_argument("--steps", type=int, default=None, help="T")
    run.add_argument("--train-steps", type=int, default=None, help="optimiser steps per DSA step 1..T-1")
    run.add_argument("--final-train-steps", type=int, default=None, help="optimiser steps at step T / for LoRA")
    run.add_argument("--physical-rank", type=int, default=None, help="LoRA matrix rank (8 = official cut)")
    run.add_argument("--json", default=None, help="also write the report here")
    run.set_defaults(func=_run, nsamples=None, seqlen=None, eval_seqlen=None, seed=None)

    tab = sub.add_parser("table", help="perplexity of several pruners and sparsities on one model, as a table")
    _common_model_args(tab)
    tab.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    tab.add_argument("--settings", default="0.5,0.7,2:4", help="sparsities and/or N:M patterns, comma-separated")
    tab.add_argument("--csv", default=None, help="also write the table as CSV")
    tab.set_defaults(func=_table)

    g = sub.add_parser("grid", help="run a grid (experiments/<name>.yaml or a path) locally, with progress")
    g.add_argument("grid", nargs="?", default="testbed")
    g.add_argument("--concurrency", type=int, default=1, help="cells at once, each in its own process")
    g.add_argument("--dispatch", choices=("local", "deployment"), default="local",
                   help="'deployment': each cell a losa-cell flow run on a work pool (see `losa up`)")
    g.set_defaults(func=_grid)

    c = sub.add_parser("check", help="validate a grid; print its cells and how many stages are already cached")
    c.add_argument("grid", nargs="?", default="testbed")
    c.add_argument("--no-cache", action="store_true", help="only validate (no model hashing, no store lookups)")
    c.add_argument("--verify", action="store_true",
                   help="re-hash every cached artifact of the grid; remove the corrupt ones (rebuilt by the next run)")
    c.set_defaults(func=_check)

    gc = sub.add_parser("gc", help="free the artifact store: drop finished cells' intermediate snapshots")
    gc.add_argument("grids", nargs="*", help="grids whose cells count (default: every shipped grid)")
    gc.add_argument("--retain", choices=("shared", "final"), default="shared",
                    help="'shared': keep snapshots two cells use; 'final': keep only each cell's final model")
    gc.add_argument("--dry-run", action="store_true", help="only report what would be freed")
    gc.add_argument("--orphans", action="store_true",
                    help="also drop what no cell of these grids reaches (e.g. artifacts under keys an upgrade moved)")
    gc.set_defaults(func=_gc)

    ex = sub.add_parser("export", help="a finished cell's model as a Hugging Face folder and its sparse-bitmask form")
    ex.add_argument("grid")
    ex.add_argument("cell", help="the cell id (see `losa check <grid>`)")
    ex.add_argument("--out", default=None, help="output folder (default: $LOSA_HOME/exports/<grid>/<cell>)")
    ex.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    ex.add_argument("--no-check", action="store_true", help="skip the perplexity check of the exported folder")
    ex.set_defaults(func=_export)

    t = sub.add_parser("tables", help="a grid's tables and plots from MLflow (Markdown, CSV, parquet, LaTeX, PNG)")
    t.add_argument("grid", nargs="?", default="testbed")
    t.add_argument("--out", default=None, help="output folder (default: $LOSA_HOME/outputs/<grid>)")
    t.set_defaults(func=_tables)

    cl = sub.add_parser("claims", help="check the paper's claims on a model's grids (<prefix>-seeds, -steps, -nm, "
                        "-table1-ppl) from MLflow; writes docs/<prefix>-claims.md")
    cl.add_argument("prefix", nargs="?", default="smollm2")
    cl.add_argument("--out", default=None, help="report path (default: docs/<prefix>-claims.md)")
    cl.set_defaults(func=_claims)

    bl = sub.add_parser("baseline", help="record a grid's current results as its regression baseline")
    bl.add_argument("grid", nargs="?", default="testbed")
    bl.add_argument("--perf", action="store_true", help="record the speed ratios' baseline instead (flows/perf.py)")
    bl.add_argument("--repeats", type=int, default=5, help="--perf: measurements that set the noise band")
    bl.set_defaults(func=_baseline)

    u = sub.add_parser("up", help="start a local Prefect server and worker, and deploy prefect.yaml")
    u.add_argument("--workers", type=int, default=1)
    u.add_argument("--gpu-workers", type=int, default=0, help="workers on the losa-gpu pool, one per GPU")
    u.set_defaults(func=_up)
    la = sub.add_parser("launch", help="run a grid through the deployment path (server, worker, "
                        "`prefect deployment run losa-grid/<grid>`), then show its tables")
    la.add_argument("grid", nargs="?", default="testbed")
    la.add_argument("--events", action="store_true", help="also show Prefect's event stream (--watch)")
    la.set_defaults(func=_launch)
    d = sub.add_parser("down", help="stop what `losa up` started")
    d.set_defaults(func=_down)
    return p


def main(argv: list[str] | None = None) -> int:
    _state_env()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
