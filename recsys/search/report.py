"""A sweep's report: trials.csv, pareto.csv (Pareto trials tested once, after the search), the resolved sweep
config, hypervolume on normalised objectives, Optuna's figures (PNG + HTML) and a W&B summary table.

Normalisation for the hypervolume (minimisation, Optuna's `compute_hypervolume`): an accuracy objective v becomes
1 − v / v_ref, a cost c becomes c / c_ref, where the references are the dense `reference_run`'s (its validation
metrics and its measured online cost) — or, without one, the largest value seen in the study. The reference point
is (1, …, 1): zero accuracy, the reference's cost. A front's hypervolume is then the area it dominates in units
of (relative accuracy kept) × (relative cost saved); the reference point and values are written to summary.json.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from recsys.config import TrackingConfig, load_config, read_yaml
from recsys.recipes.evaluate import evaluate_run
from recsys.search.objectives import disturbed, reference_costs
from recsys.search.study import OBJECTIVES, SweepConfig, open_study
from recsys.tracking.records import hardware, write_json


def _reference(cfg: SweepConfig, ref: dict | None, trials) -> dict[str, float]:
    """Reference value of every objective (`ref`: the dense run's reference_costs; else the study's maximum)."""
    if ref is not None:
        return {o: float(ref[o]) for o in cfg.objectives}
    return {o: max(float(t.values[i]) for t in trials) or 1.0 for i, o in enumerate(cfg.objectives)}


def normalise(values, objectives: list[str], ref: dict[str, float]) -> list[float]:
    """Minimised, reference-relative objectives: accuracy 1 − v/ref, cost c/ref."""
    pairs = zip(values, objectives, strict=True)
    return [1 - v / ref[o] if OBJECTIVES[o] == "maximize" else v / ref[o] for v, o in pairs]


def hypervolume(points: list[list[float]], n_objectives: int) -> float:
    """Optuna's exact hypervolume of normalised (minimised) points against the reference point (1, …, 1)."""
    from optuna._hypervolume import compute_hypervolume

    pts = np.array([p for p in points if all(x < 1.0 for x in p)], dtype=float).reshape(-1, n_objectives)
    return float(compute_hypervolume(pts, np.ones(n_objectives))) if len(pts) else 0.0


def pareto_front(trials, directions: list[str]) -> list:
    """The trials no other trial dominates (Optuna's `study.best_trials`, over a subset of the trials)."""
    sign = np.array([1.0 if d == "maximize" else -1.0 for d in directions])
    vals = np.array([t.values for t in trials], dtype=float).reshape(len(trials), len(directions)) * sign
    return [t for t, v in zip(trials, vals, strict=True)
            if not any((w >= v).all() and (w > v).any() for w in vals)]


def test_metrics(run_dir: str) -> dict:
    """Test metrics of a Pareto trial: evaluated once (through its retrieval index when it has one, as it was
    searched), cached in its run folder."""
    path = Path(run_dir) / "test_metrics.json"
    if not path.is_file():
        index = read_yaml(Path(run_dir) / "config.yaml").get("retrieval", {}).get("index", "exact")
        if index != "exact":
            from recsys.recipes.retrieval_index import evaluate_run_index  # faiss: imported only when used
            res = evaluate_run_index(run_dir, None, "test", progress=False).index
        else:
            res = evaluate_run(run_dir, "test", progress=False)
        res.write_per_user(Path(run_dir) / "per_user_test.csv", res.user_ids)
        write_json(path, {**res.metrics, "hardware": hardware()})  # the machine that evaluated it, in the file
    metrics = json.loads(path.read_text())
    # the metrics alone (the machine, and where that record came from, are no test_* columns)
    return {k: v for k, v in metrics.items() if k not in ("hardware", "hardware_source")}


def write_report(cfg: SweepConfig, wall_seconds: float | None = None, workers: int = 1, since=None) -> dict:
    """Write the study's tables, summary and figures. `wall_seconds` (of the invocation that started at the
    datetime `since`, with `workers` processes) gives the sweep's overhead: the share of worker time not spent
    in its trials' own training, evaluation and measurement."""
    from optuna.trial import TrialState

    study = open_study(cfg)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    ref_costs = reference_costs(cfg) if done else None
    # a trial measured while something else used the cores (sweeps before the check, see run_trial) stays in
    # trials.csv with its reason and stays off the front
    excluded = {t.number: why for t in done
                if (why := disturbed(t.user_attrs.get("costs", {}), ref_costs, cfg.max_reference_drift))}
    folder = cfg.folder
    rows = []
    for t in trials:
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        row = {"trial": t.number, "state": t.state.name, "duration_s": duration,
               "run_dir": t.user_attrs.get("run_dir", ""), "fail_reason": t.user_attrs.get("fail_reason", ""),
               "worker": t.user_attrs.get("worker", ""), "excluded": excluded.get(t.number, ""),
               "retry_of": t.user_attrs.get("retry_of", t.system_attrs.get("failed_trial", ""))}
        row.update({f"value_{o}": (t.values[i] if t.values else None) for i, o in enumerate(cfg.objectives)})
        row.update(_params(cfg, t))
        if "index" in t.user_attrs:  # scored through its retrieval index: the index, and exact ranking beside it
            index = t.user_attrs["index"]
            row.update({"index": index["spec"], "index_recall@10_vs_exact": index.get("recall@10"),
                        "val_exact_ndcg@10": t.user_attrs.get("val_exact", {}).get("ndcg@10")})
        rows.append(row)
    _write_csv(folder / "trials.csv", rows)
    write_json(folder / "sweep.json", dataclasses.asdict(cfg))

    summary: dict = {"study": cfg.study, "machine": hardware(),  # where the report (and its latencies) came from
                     "n_trials": len(done), "requested": cfg.n_trials, "sampler": cfg.sampler,
                     "objectives": cfg.objectives, "directions": cfg.directions,
                     "failed": sum(t.state == TrialState.FAIL for t in trials),
                     "pruned": sum(t.state == TrialState.PRUNED for t in trials)}
    if done:
        ref = _reference(cfg, ref_costs, done)
        pareto = pareto_front([t for t in done if t.number not in excluded], cfg.directions)
        points = [normalise(t.values, cfg.objectives, ref) for t in pareto]
        prow = []
        for t, p in zip(pareto, points, strict=True):
            prow.append({"trial": t.number, **{f"val_{o}": t.values[i] for i, o in enumerate(cfg.objectives)},
                         **{f"norm_{o}": p[i] for i, o in enumerate(cfg.objectives)},
                         **{f"test_{k}": v for k, v in test_metrics(t.user_attrs["run_dir"]).items()},
                         **_params(cfg, t), "run_dir": t.user_attrs["run_dir"]})
        _write_csv(folder / "pareto.csv", prow)
        timed = [t for t in done if since is None or (t.datetime_start and t.datetime_start >= since)]
        own = sum(t.user_attrs.get("own_seconds", 0.0) for t in timed)
        summary.update({"reference": ref, "reference_run": cfg.reference_run,
                        "reference_point": [1.0] * len(cfg.objectives),
                        "normalisation": "accuracy: 1 - v/ref; cost: c/ref (minimised)",
                        "hypervolume": hypervolume(points, len(cfg.objectives)), "pareto": prow,
                        "excluded": [{"trial": n, "reason": why} for n, why in excluded.items()],
                        "trial_minutes": sum(r["duration_s"] for r in rows if r["state"] == "COMPLETE") / 60})
        if wall_seconds:
            summary["wall_minutes"] = wall_seconds / 60
            summary["overhead_fraction"] = max(0.0, 1 - own / (wall_seconds * workers)) if own else None
            summary["timed_trials"] = len(timed)
        _figures(study, cfg, ref, folder / "figures")
        _wandb_summary(cfg, rows, sweep_tracking(cfg))
    write_json(folder / "summary.json", summary)
    return summary


def _params(cfg, t) -> dict:
    """A trial's parameters as trained (a zero-reachable λ drawn below its range is 0), by column name."""
    return {f"param_{k}": cfg.params[k].applied(v) if k in cfg.params else v for k, v in t.params.items()}


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _figures(study, cfg: SweepConfig, ref: dict[str, float], out: Path) -> None:
    """Optuna's Pareto front, hypervolume history and parameter importances, as HTML (plotly) and PNG
    (matplotlib). A figure Optuna cannot draw for this study (too few trials) is skipped with a note."""
    import warnings

    try:
        import matplotlib
        import optuna.visualization as vis
        import optuna.visualization.matplotlib as vmpl

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"note: figures skipped ({e}; pip install '.[notebooks]')", file=sys.stderr)
        return

    out.mkdir(parents=True, exist_ok=True)
    names = cfg.objectives
    # raw-space reference point for the hypervolume history: zero accuracy, the reference cost
    raw_ref = [0.0 if OBJECTIVES[o] == "maximize" else ref[o] for o in names]
    kinds = {"importances": (lambda m: m.plot_param_importances(study, target=lambda t: t.values[0],
                                                                target_name=names[0]))}
    if len(names) > 1:
        kinds["pareto_front"] = lambda m: m.plot_pareto_front(study, target_names=names)
        kinds["hypervolume_history"] = lambda m: m.plot_hypervolume_history(study, raw_ref)
    for kind, draw in kinds.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                draw(vis).write_html(str(out / f"{kind}.html"))
                ax = draw(vmpl)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.savefig(out / f"{kind}.png", dpi=120, bbox_inches="tight")
                plt.close(fig)
        except (ImportError, ValueError, RuntimeError, ZeroDivisionError) as e:
            print(f"note: figure {kind} skipped ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)


def sweep_tracking(cfg: SweepConfig) -> TrackingConfig:
    """The tracking settings the study's trials run with (the base config's, with the sweep's tracking.*
    overrides)."""
    return load_config(cfg.base_config, [o for o in cfg.overrides if o.startswith("tracking.")]).tracking


def _wandb_summary(cfg: SweepConfig, rows: list[dict], tracking: TrackingConfig) -> None:
    """The trials table as a W&B run in the study's group, in the trials' tracking.wandb mode and
    tracking.wandb_project ($WANDB_MODE wins)."""
    import os

    mode = os.environ.get("WANDB_MODE", tracking.wandb)
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(project=tracking.wandb_project, group=cfg.study, name=f"{cfg.study}-summary",
                     job_type="sweep-summary", dir=str(cfg.folder), mode=mode, reinit="finish_previous")
    run.log({"trials": wandb_table(rows)})
    run.finish()


def wandb_table(rows: list[dict]):
    """The trials as a W&B table. W&B types each column by its values; a column mixing types (e.g. `retry_of`:
    "" for most trials, a trial number for a retried one) is written as text."""
    import wandb

    def kind(v) -> str:
        return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__

    keys = list(dict.fromkeys(k for r in rows for k in r))
    mixed = {k for k in keys if len({kind(r[k]) for r in rows if r.get(k) is not None}) > 1}
    data = [[str(r.get(k, "")) if k in mixed else r.get(k) for k in keys] for r in rows]
    return wandb.Table(columns=keys, data=data)


def compare_fronts(lambda_cfg: SweepConfig, posthoc_cfg: SweepConfig) -> dict | None:
    """Both fronts' hypervolumes (same normalisation and reference) and their ratio, written next to the
    post-hoc study as comparison.json; None until the λ study has a report."""
    paths = [c.folder / "summary.json" for c in (lambda_cfg, posthoc_cfg)]
    if not all(p.is_file() for p in paths):
        return None
    lam, post = (json.loads(p.read_text()) for p in paths)
    if "hypervolume" not in lam or "hypervolume" not in post:
        return None
    out = {"lambda_search": lam["hypervolume"], "posthoc": post["hypervolume"],
           "ratio": lam["hypervolume"] / post["hypervolume"] if post["hypervolume"] else float("inf"),
           "reference_point": post["reference_point"], "reference": post.get("reference"),
           "reference_run": post.get("reference_run"), "same_reference": lam.get("reference") == post.get("reference"),
           "lambda_pareto": lam["pareto"], "posthoc_pareto": post["pareto"]}
    path = posthoc_cfg.folder / "comparison.json"
    write_json(path, out)
    return {**out, "path": str(path)}
