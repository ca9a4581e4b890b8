"""The λ search against post-hoc pruning as a function of the training budget (issue 27): a sweep moved to a budget
of optimisation steps per trial (its own study, the same for both methods: equal compute within a budget), the
most accurate model of each front per band of measured online speed-up, and the trend of the hypervolume ratio
against the steps (its slope per doubling and where it crosses 1, measured or, labelled so, extrapolated).

    cfg = at_budget(load_sweep("configs/sweeps/ml100k_budget.yaml"), steps=240, per_epoch=59, trials=12)
    sweep(cfg); sweep(posthoc_config(cfg))                          # studies ml100k-budget-s240[-posthoc]
    speedup_bands(lam_summary, posthoc_summary, "ndcg@10")           # per ≥2×, ≥4×, ≥8×: the best of each front
    hv_trend([(59, 0.70), (240, 0.85), (480, 0.93)])                 # slope per doubling, crossing of 1.0
"""
from __future__ import annotations

import math
from dataclasses import replace

from recsys.config import load_config
from recsys.errors import RecsysError
from recsys.search.study import SweepConfig

BANDS = (2.0, 4.0, 8.0)  # online speed-ups relative to the dense reference
BUDGET_KEYS = ("train.max_steps=", "train.epochs=", "train.check_val_every_n_epoch=")  # what a budget sets


def steps_per_epoch(cfg: SweepConfig) -> int:
    """Optimisation steps in one epoch of the sweep's training data: its users' (capped) training examples over the
    batch size, every epoch drawing as many (`recsys.models.datamodule`)."""
    from recsys.data.registry import load_data
    from recsys.models.datamodule import RecDataModule

    probes = [f"{k}={spec.probe()}" for k, spec in cfg.params.items()]  # the base alone may need a trial's params
    run = load_config(cfg.base_config, [*cfg.overrides, *probes])
    ds, split = load_data(run.data)
    examples = RecDataModule(ds, split, None, run.data, run.train, tokenize_items=False).examples(0)
    if not examples:
        raise RecsysError(f"{cfg.study}: the training data has no examples (data.{run.data.name})")
    return -(-len(examples) // run.train.batch_size)


def at_budget(cfg: SweepConfig, steps: int, per_epoch: int, trials: int | None = None) -> SweepConfig:
    """`cfg` at `steps` optimisation steps per trial: its own study `<study>-s<steps>` (and so its own journal under
    results/sweeps/), `train.max_steps=steps` over the epochs that hold them (`per_epoch` steps each, every epoch a
    fresh draw of examples), validated during the fit only at the end of its last epoch (gated trials keep their
    final model: a mid-fit validation decides nothing), and `trials` trials (default: the sweep's)."""
    if steps <= 0:
        raise RecsysError(f"budget: steps per trial must be > 0, got {steps}")
    if trials is not None and trials <= 0:
        raise RecsysError(f"budget: trials per study must be > 0, got {trials}")
    epochs = -(-steps // per_epoch)
    overrides = [o for o in cfg.overrides if not o.startswith(BUDGET_KEYS)]
    overrides += [f"train.max_steps={steps}", f"train.epochs={epochs}", f"train.check_val_every_n_epoch={epochs}"]
    return replace(cfg, study=f"{cfg.study}-s{steps}", overrides=overrides, n_trials=trials or cfg.n_trials)


def speedup_bands(lam: dict, post: dict, objective: str, bands: tuple[float, ...] = BANDS) -> list[dict]:
    """Per band (measured online speed-up ≥ b× the dense reference, `reference latency / trial latency`, both on
    the reference's time scale), the trial of each front (the studies' report summaries) most accurate on
    validation by `objective`, with its test metrics (every Pareto trial is tested once, after its search), its
    parameters and its share of the dense reference's validation accuracy; and which front is ahead on
    validation (and on test for the chosen ones). The most accurate trial at ≥ b× is always a Pareto trial."""
    ref = lam.get("reference") or {}
    if "latency" not in ref:
        raise RecsysError("speed-up bands need the latency objective and a reference run (objectives: [.., latency])")
    dense_ms, dense_acc = float(ref["latency"]), float(ref[objective])

    def best(summary: dict, band: float) -> dict | None:
        inside = [p for p in summary.get("pareto", []) if dense_ms / p["val_latency"] >= band]
        if not inside:
            return None
        p = max(inside, key=lambda p: p[f"val_{objective}"])
        return {"trial": p["trial"], "speedup": dense_ms / p["val_latency"], "latency_ms": p["val_latency"],
                "val": p[f"val_{objective}"], "test": p.get(f"test_{objective}"),
                "val_share_of_dense": p[f"val_{objective}"] / dense_acc if dense_acc else None,
                "params": {k[6:]: v for k, v in p.items() if k.startswith("param_")}}

    rows = []
    for band in bands:
        a, b = best(lam, band), best(post, band)
        row = {"min_speedup": band, "metric": objective, "lambda_search": a, "posthoc": b}
        for stage in ("val", "test"):
            if (a is None and b is None) or any(x is not None and x[stage] is None for x in (a, b)):
                row[f"ahead_{stage}"] = None
            elif a is None or b is None:
                row[f"ahead_{stage}"] = "lambda_search" if b is None else "posthoc"  # the other reaches no such model
            else:
                row[f"ahead_{stage}"] = "lambda_search" if a[stage] > b[stage] else "posthoc"
                row[f"margin_{stage}"] = a[stage] - b[stage]
        rows.append(row)
    return rows


def hv_trend(points: list[tuple[int, float | None]]) -> dict:
    """The HV ratio (λ / post-hoc) against log2(steps per trial): a least-squares line (slope = ratio gained per
    doubling of the steps), and where the curve crosses 1.0 — interpolated in log2(steps) between the two measured
    budgets that bracket it, or, when no measured pair does, where the fitted line would at more steps than were
    measured (an extrapolation; None, with a note, for a line that does not get there)."""
    pts = sorted((s, r) for s, r in points if r is not None and math.isfinite(r))
    out = {"fit": "hv_ratio = intercept + slope * log2(steps)", "points": [list(p) for p in pts],
           "slope_per_doubling": None, "intercept": None, "crossing_steps": None, "crossing": None}
    for (s0, r0), (s1, r1) in zip(pts, pts[1:], strict=False):
        if (r0 - 1) * (r1 - 1) <= 0 and r0 != r1:
            x0, x1 = math.log2(s0), math.log2(s1)
            out.update(crossing_steps=2 ** (x0 + (1 - r0) * (x1 - x0) / (r1 - r0)),
                       crossing="measured: interpolated between the budgets that bracket 1.0")
            break
    if len(pts) < 2 or len({s for s, _ in pts}) < 2:
        return out
    xs, ys = [math.log2(s) for s, _ in pts], [r for _, r in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    out.update(slope_per_doubling=slope, intercept=intercept)
    if out["crossing"] is None and slope != 0:
        x = (1 - intercept) / slope
        if x > max(xs):  # ahead of the measured budgets: the steps the trend says a crossing would need
            out.update(crossing_steps=2 ** x, crossing="extrapolation of the fitted line (not measured)")
        else:
            side = "above" if ys[0] > 1 else "below"
            out["note"] = f"{side} 1.0 at every measured budget, and the trend does not cross it at more steps"
    return out
