"""Reproduce results/benchmarks/lagrangian_schedule.json and results/figures/lagrangian_schedule.png: the expected
cost of the λ run against the training step under the fair schedule (`compress.target_by`, issue 27 §2), for three
budget targets — measured from each run's per-step training log, not assumed.

    python experiments/ml100k_baselines.py --data-dir ../shared/datasets       # the dense run the λ runs start from
    python experiments/lagrangian_schedule.py --data-dir ../shared/datasets    # 3 runs of 59 steps

Each run trains with the budget sweep's recipe (default configs/sweeps/ml100k_budget.yaml: its base config and fixed
overrides; the input length the dense reference was tuned to, if experiments/ml100k_pareto*.py cached it, else each
searched dimension's first value), one target each, logging every step. Per target the JSON gives the curve (step,
expected cost ratio, ramped target), the first step within the budget tolerance of the target and its fraction of
training, the step the structure was fixed at, and the hard shape's ratio then and at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import train_or_reuse, tuned_input, write_benchmark

from recsys.errors import RecsysError
from recsys.runs import run_config, training_log
from recsys.search.study import load_sweep


def schedule_record(run: str | Path) -> dict:
    """A budget run's schedule as trained: per logged step its expected cost ratio (`cost/user_<metric>`, the
    cost model at the gates' open probabilities) and ramped target, up to the step its structure was fixed (rows
    after it repeat stale values); the first step within `compress.budget_tolerance` of the target; the hard
    shape's ratio when fixed and at the end."""
    cfg = run_config(Path(run))
    c = cfg.compress
    if c.budget_metric is None:
        raise RecsysError(f"{run}: not a budget run (compress.budget_metric is unset)")
    metrics = json.loads((Path(run) / "metrics.json").read_text())
    structure = metrics.get("structure", {})
    fixed = structure.get("fixed_at_step")
    key = f"cost/user_{c.budget_metric}"
    rows = [r for r in training_log(run, (key, "budget/target")) if fixed is None or r["step"] < fixed]
    reached = next((int(r["step"]) for r in rows if abs(r[key] - c.budget_target) <= c.budget_tolerance), None)
    steps = metrics["steps"]
    return {"run": str(run), "metric": c.budget_metric, "target": c.budget_target, "tolerance": c.budget_tolerance,
            "target_by": c.target_by, "steps": steps, "fixed_at_step": fixed,
            "reached_at_step": reached, "reached_fraction": None if reached is None else reached / steps,
            "fixed_ratios": structure.get("fixed_ratios"),
            "final_ratio": structure.get("user_ratios", {}).get(c.budget_metric),
            "met": structure.get("budget", {}).get("met"),
            "curve": [[int(r["step"]), r[key], r["budget/target"]] for r in rows]}


def figure(records: list[dict], out: Path) -> None:
    """Expected cost ratio against the step, one colour per target: the curve, its ramped target (dashed), the
    hard shape's ratio when fixed (marker), the step the structure was fixed at (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for rec, color in zip(records, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"), strict=False):
        steps = [s for s, _, _ in rec["curve"]]
        ax.plot(steps, [r for _, r, _ in rec["curve"]], color=color, label=f"target {rec['target']}")
        ax.plot(steps, [t for _, _, t in rec["curve"]], color=color, ls="--", alpha=0.5)
        if rec["fixed_at_step"] is not None:
            ax.axvline(rec["fixed_at_step"], color=color, ls=":", alpha=0.5)
            if rec["fixed_ratios"]:
                ax.scatter([rec["fixed_at_step"]], [rec["fixed_ratios"]["hard"]], color=color, marker="s")
    metric = records[0]["metric"]
    ax.set_xlabel(f"training step (of {records[0]['steps']})")
    ax.set_ylabel(f"expected {metric} / dense (cost model)")
    ax.set_title("fair schedule: expected cost (solid), ramped target (dashed), hard shape when fixed (■)",
                 fontsize=9)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecsysError(f"--targets: expected comma-separated numbers in (0, 1], got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise RecsysError(f"--targets: expected numbers in (0, 1] (cost fractions of dense), got {text!r}")
    return values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sweeps/ml100k_budget.yaml", help="the sweep whose recipe runs")
    ap.add_argument("--targets", default="0.25,0.5,0.75", help="budget targets, one run each")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--out", default="results/benchmarks/lagrangian_schedule.json")
    ap.add_argument("--figure", default="results/figures/lagrangian_schedule.png")
    ap.add_argument("overrides", nargs="*", help="training overrides for every run (e.g. train.max_steps=240)")
    args = ap.parse_args(argv)
    try:
        targets = _floats(args.targets)
        cfg = load_sweep(args.config, [], [f"data.data_dir={args.data_dir}"] if args.data_dir else [])
        inputs = (tuned_input(cfg.folder.parent, cfg.reference_run) if cfg.reference_run else None) or []
        fixed = {o.partition("=")[0] for o in [*inputs, *args.overrides]}
        probes = [f"{k}={s.probe()}" for k, s in cfg.params.items()
                  if k not in fixed and k not in ("compress.budget_target", "compress.prune_init")]
        records = []
        for t in targets:
            over = [*cfg.overrides, *probes, *inputs, f"compress.budget_target={t}", "compress.prune_init=false",
                    "tracking.log_every_steps=1", *args.overrides]
            run = train_or_reuse(cfg.base_config, over, f"schedule-{cfg.study}-t{t:g}", args.results_dir)
            records.append(schedule_record(run))
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_benchmark(args.out, {"sweep_config": args.config, "base_config": cfg.base_config,
                               "overrides": [*cfg.overrides, *probes, *inputs, *args.overrides], "targets": records})
    figure(records, Path(args.figure))
    for r in records:
        print(f"target {r['target']}: within {r['tolerance']} at step {r['reached_at_step']} of {r['steps']} "
              f"(fixed at {r['fixed_at_step']}), hard ratio {r['final_ratio']:.3f}")
    print(f"→ {args.out}, {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
