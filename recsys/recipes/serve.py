"""`recsys serve RUN [RUN …]`: trained runs of a front behind a real server (`recsys.serving.server`, LitServe),
ordered by accuracy, with the controller that moves along them to hold a p99 latency SLO.

A run is a run folder, optionally with serving overrides after a colon — `results/runs/dense:data.user_max_tokens=48,
data.history_items=5` serves the run at another input length (its weights unchanged) — or, with `--from-study`,
every Pareto trial of a sweep (`<study folder>/pareto.csv`). Runs are ordered by validation NDCG@10 (recorded in
metrics.json; a run with serving overrides is evaluated on validation as served, at start-up), most accurate
first: the controller starts there and moves to faster ones under load. All runs must rank the same catalog.

Each run is loaded as `recsys.recipes.profile.online_request` serves it (`load_run`, materialized user tower,
`compress.precision`'s route) and searched as `recsys.recipes.retrieval_index.run_index` builds it (the catalog
embeddings cached in memory and on disk; `--index SPEC` or the run's own `retrieval.index`).
"""
from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from recsys.config import ServeConfig, parse_index_spec
from recsys.errors import RecsysError
from recsys.runs import run_config, run_paths


@dataclass(frozen=True)
class ServedRun:
    """A run folder and the serving overrides it is served with; `name` is how answers and metrics call it."""

    path: str
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        base = Path(self.path).name
        return f"{base}:{','.join(self.overrides)}" if self.overrides else base


def parse_run(text: str) -> ServedRun:
    """`RUN` or `RUN:key=value,key=value` (a colon followed by dotted overrides)."""
    path, sep, rest = text.partition(":")
    if sep and "=" in rest:
        overrides = tuple(o.strip() for o in rest.split(",") if o.strip())
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise RecsysError(f"{text}: serving override {bad[0]!r} is not section.key=value")
        return ServedRun(path, overrides)
    return ServedRun(text)


def study_runs(folder: str | Path) -> list[ServedRun]:
    """The Pareto trials of a sweep (`<folder>/pareto.csv`, written by `recsys sweep`): their run folders."""
    path = Path(folder) / "pareto.csv" if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise RecsysError(f"--from-study: {path} not found (a study folder results/sweeps/<study>/ holds pareto.csv "
                          "once `recsys sweep` has reported)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "run_dir" not in rows[0]:
        raise RecsysError(f"--from-study: {path} has no Pareto trials (no rows with a run_dir column)")
    return [ServedRun(r["run_dir"]) for r in rows if r.get("run_dir")]


def validation_ndcg(run: ServedRun) -> float:
    """NDCG@10 on validation: recorded in metrics.json, or — with serving overrides — evaluated as served."""
    run_dir, _ = run_paths(run.path)
    if run.overrides:
        from recsys.recipes.evaluate import evaluate_run
        return float(evaluate_run(run_dir, "val", progress=False, overrides=list(run.overrides),
                                  served=True).metrics["ndcg@10"])
    metrics = run_dir / "metrics.json"
    try:
        return float(json.loads(metrics.read_text())["val"]["ndcg@10"])
    except (OSError, ValueError, KeyError, TypeError):
        raise RecsysError(f"{metrics}: no validation ndcg@10 (is the run finished?)") from None


def front_order(runs: list[ServedRun]) -> list[tuple[ServedRun, float]]:
    """(run, validation NDCG@10), most accurate first."""
    names = [r.name for r in runs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise RecsysError(f"two runs are named {dup!r}: serve each run once (answers name the run that served them)")
    return sorted(((r, validation_ndcg(r)) for r in runs), key=lambda x: -x[1])


def catalog_of(runs: list[ServedRun]):
    """The catalog every run ranks (`recsys.serving.requests.Catalog`: item and user ids, each user's known history
    — train + validation items); a run over another catalog is an error."""
    from recsys.data.registry import load_data
    from recsys.serving.requests import Catalog

    first, catalog = None, None
    for run in runs:
        ds, split = load_data(run_config(run_paths(run.path)[0]).data)
        if catalog is None:
            first = run.name
            histories = [split.history(u, "test") if split.test[u] >= 0 else split.train[u]
                         for u in range(split.n_users)]
            catalog = Catalog(list(ds.item_ids), list(ds.user_ids), histories)
        elif list(ds.item_ids) != catalog.item_ids or list(ds.user_ids) != catalog.user_ids:
            raise RecsysError(f"{run.name} ranks another catalog than {first} ({ds.n_items} items, {ds.n_users} users "
                              f"vs {catalog.n_items}, {len(catalog.user_ids)}): serve runs of one dataset")
    return catalog


def load_recommender(run: ServedRun, index: str | None = None):
    """One run as served (`recsys.serving.recommender.Recommender`): materialized user tower by its route, its
    catalog searched exactly or through `index` (else its own retrieval.index)."""
    from recsys.models.encoder import load_tokenizer, resolve_model_path
    from recsys.recipes.retrieval_index import run_index
    from recsys.runs import check_lengths, load_run
    from recsys.serving.materialize import materialize
    from recsys.serving.quantize import route_for
    from recsys.serving.recommender import Recommender, TextInput

    overrides = list(run.overrides) or None
    cfg, module = load_run(run.path, overrides)
    check_lengths(cfg, module)
    cfg, module, ds, _, _, keys, item_index = run_index(run.path, index, progress=False, overrides=overrides,
                                                        loaded=(cfg, module))
    tower = materialize(module.user_tower)
    route = route_for(cfg.compress.precision, cfg.compress.int8_backend)
    if module.sequence:
        return Recommender(run.name, tower, item_index, route, cfg.compress.quantize_layers, keys=keys)
    text = TextInput(load_tokenizer(resolve_model_path(cfg.model.encoder)), ds.item_texts, cfg.data.history_items,
                     cfg.data.user_max_tokens)
    return Recommender(run.name, tower, item_index, route, cfg.compress.quantize_layers, text=text)


def load_front(runs: tuple[ServedRun, ...], index: str | None, threads: int | None) -> list:
    """Every run of the front, in order (what the server's worker calls at start-up)."""
    from recsys.serving.index_route import set_faiss_threads

    set_faiss_threads(threads)
    return [load_recommender(r, index) for r in runs]


def serve(runs: list[str], cfg: ServeConfig, index: str | None = None, from_study: str | None = None,
          port: int = 8000, inject_delay_ms: dict[str, float] | None = None) -> None:
    """Serve `runs` (and a study's Pareto trials) on 127.0.0.1:`port` until SIGTERM (drained) or Ctrl-C.
    `inject_delay_ms`: {run name: ms} added to each batch that run serves (fault injection, for tests and drills)."""
    from recsys.serving.index_route import set_blas_coretype
    try:
        from recsys.serving.server import run_server
    except ImportError as e:
        if e.name not in ("litserve", "fastapi", "uvicorn"):
            raise
        raise RecsysError("recsys serve needs LitServe: pip install 'recsys[serve]'") from None

    if not 1024 <= port <= 65535:
        raise RecsysError(f"--port: {port} is not a port from 1024 to 65535")
    served = [parse_run(r) for r in runs] + (study_runs(from_study) if from_study else [])
    if not served:
        raise RecsysError("recsys serve: give at least one RUN (a run folder) or --from-study")
    if len(served) > 1 and cfg.slo_ms is None:
        raise RecsysError("several runs are served by a latency SLO: give --slo-ms (the p99 target in ms)")
    if index is not None:
        parse_index_spec(index)  # one line on a bad spec, before anything loads
    for r in served:
        run_paths(r.path)
    ordered = front_order(served)
    names = [r.name for r, _ in ordered]
    unknown = sorted(set(inject_delay_ms or {}) - set(names))
    if unknown:
        raise RecsysError(f"--inject-delay-ms: no served run is named {unknown[0]!r} (served: {', '.join(names)})")
    catalog = catalog_of([r for r, _ in ordered])
    for i, (r, ndcg) in enumerate(ordered):
        print(f"{i}. {r.name}  val NDCG@10 {ndcg:.4f}", flush=True)
    set_blas_coretype()  # faiss's OpenBLAS kernels, in the worker this process spawns
    load = functools.partial(load_front, tuple(r for r, _ in ordered), index, cfg.threads)
    run_server(load, names, catalog, cfg, port, inject_delay_ms)

