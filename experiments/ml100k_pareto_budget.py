"""Reproduce results/benchmarks/ml100k_pareto_budget.json and results/figures/ml100k_pareto_budget.png: the λ-search
front against the post-hoc pruning front on MovieLens-100K at several training budgets (issue 27: when does learning
the structure pay?). At each budget both studies train every trial for the same number of optimisation steps, with
the same trial count, objectives and dense reference as experiments/ml100k_pareto.py (whose functions run them).

    python experiments/ml100k_baselines.py --data-dir ../shared/datasets     # the dense run both fronts start from
    python experiments/ml100k_pareto_budget.py --data-dir ../shared/datasets --budgets 59,240,480 --trials 24

Per budget: each front's hypervolume (reference point and normalisation as in ml100k_pareto.json), their ratio,
steps per trial, wall minutes, and per band of measured online speed-up (≥2×, ≥4×, ≥8× the dense reference) the
most accurate model of each front on validation with its test metrics. Across budgets: the HV ratio against
log2(steps), its slope per doubling and where it crosses 1.0 (measured, or labelled as an extrapolation).

The recipe is the sweep config (default configs/sweeps/ml100k_budget.yaml: the fair schedule, and prune-then-learn
as a searched option). Each budget's two studies live in journal files under results/sweeps/<study>-s<steps>[-posthoc];
re-running resumes them. `experiments/study_state.py save --config <it> --budgets <the same>` keeps their state.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from common import positive_ints, write_benchmark
from ml100k_pareto import draw_fronts, front_rows, prepare_reference, recipe_record, run_both, timing, training_steps

from recsys.config import load_config
from recsys.errors import RecsysError
from recsys.search.budget import BANDS, at_budget, hv_trend, speedup_bands, steps_per_epoch
from recsys.search.posthoc import posthoc_config
from recsys.search.study import load_sweep


def budget_entry(cfg, steps: int, per_epoch: int, both: dict, previous: dict | None) -> dict:
    """One budget's result (`cfg`: the λ sweep at `steps` per trial): both hypervolumes and their ratio, the steps
    both studies trained, timing, the per-band table and both fronts."""
    lam, post, post_cfg, cmp = both["lam"], both["post"], both["post_cfg"], both["cmp"]
    for c, summary in ((cfg, lam), (post_cfg, post)):
        if "pareto" not in summary:
            raise RecsysError(f"study {c.study}: no completed trial at {steps} steps (see {c.folder / 'trials.csv'})")
    pareto, posthoc = front_rows(lam, post)
    return {"steps_per_trial": steps, "epochs": -(-steps // per_epoch),
            "studies": {"lambda_search": cfg.study, "posthoc": post_cfg.study},
            "n_trials": {"lambda_search": lam["n_trials"], "posthoc": post["n_trials"]},
            "hypervolume": {"lambda_search": lam.get("hypervolume"), "posthoc": post.get("hypervolume"),
                            "ratio": cmp["ratio"] if cmp else None},
            "bands": speedup_bands(lam, post, cfg.objectives[0]),
            **timing(lam, post, both["wall"], previous),
            "trial_minutes": {"lambda_search": lam.get("trial_minutes"), "posthoc": post.get("trial_minutes")},
            "training_steps": {"lambda_search": training_steps(cfg), "posthoc": training_steps(post_cfg)},
            "excluded": {"lambda_search": lam.get("excluded", []), "posthoc": post.get("excluded", [])},
            "pareto": pareto, "posthoc": posthoc,
            "summaries": {"lambda_search": str(cfg.folder / "summary.json"),
                          "posthoc": str(post_cfg.folder / "summary.json")}}


def figure(entries: list[dict], trend: dict, largest: tuple[dict, dict], objectives: list[str], out: Path) -> None:
    """Left: the HV ratio (λ / post-hoc) against steps per trial, 1.0 marked, the fitted trend and — when the
    measured curve does not cross 1.0 — its extrapolated crossing, labelled so. Right: both fronts at the largest
    budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    pts = [(e["steps_per_trial"], e["hypervolume"]["ratio"]) for e in entries
           if e["hypervolume"]["ratio"] is not None and math.isfinite(e["hypervolume"]["ratio"])]
    left.axhline(1.0, color="grey", lw=1, ls=":")
    left.plot([s for s, _ in pts], [r for _, r in pts], "o-", color="tab:blue", label="measured")
    if trend["slope_per_doubling"] is not None:
        xs = [s for s, _ in pts]
        hi = max(xs + ([trend["crossing_steps"]] if trend["crossing_steps"] else []))
        lo = min(xs + ([trend["crossing_steps"]] if trend["crossing_steps"] else []))
        grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
        left.plot(grid, [trend["intercept"] + trend["slope_per_doubling"] * math.log2(g) for g in grid], "--",
                  color="tab:blue", alpha=0.5, label=f"fit: {trend['slope_per_doubling']:+.3f} per doubling")
        if trend["crossing_steps"]:
            extrapolated = trend["crossing"].startswith("extrapolation")
            left.scatter([trend["crossing_steps"]], [1.0], marker="x", s=80, color="tab:red",
                         label=f"{'extrapolation (not measured)' if extrapolated else 'crossing'}: "
                               f"≈ {trend['crossing_steps']:.0f} "
                               "steps")
    left.set_xscale("log", base=2)
    left.set_xlabel("training steps per trial")
    left.set_ylabel("HV(λ search) / HV(post-hoc)")
    left.legend(frameon=False)
    left.grid(alpha=0.3)
    draw_fronts(right, *largest, objectives)
    right.set_title(f"fronts at {entries[-1]['steps_per_trial']} steps per trial")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sweeps/ml100k_budget.yaml")
    ap.add_argument("--budgets", default="59,240,480", help="training steps per trial, one study pair each")
    ap.add_argument("--trials", default=None, help="trials per study at every budget (default: the sweep's n_trials)")
    ap.add_argument("--tune-tokens", default="16,24,32,48,64,96,128",
                    help="token budgets the dense reference is validated at")
    ap.add_argument("--tune-history", default="3,5,10", help="history sizes, likewise")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="results/benchmarks/ml100k_pareto_budget.json")
    ap.add_argument("--figure", default="results/figures/ml100k_pareto_budget.png")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    training = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    try:
        budgets = sorted(positive_ints(args.budgets, "--budgets"))
        trials = None
        if args.trials is not None:
            trials, *more = positive_ints(args.trials, "--trials")
            if more:
                raise RecsysError(f"--trials: one count for every budget and both methods, got {args.trials!r}")
        tokens = positive_ints(args.tune_tokens, "--tune-tokens")
        history = positive_ints(args.tune_history, "--tune-history")
        own = [o for o in args.overrides if "." not in o.partition("=")[0]]
        cfg = load_sweep(args.config, own, training + [o for o in args.overrides if o not in own])
        if "latency" not in cfg.objectives:
            raise RecsysError(f"{args.config}: objectives {cfg.objectives}: the speed-up bands need latency")
        reference_input = prepare_reference(cfg, tokens, history)
        per_epoch = steps_per_epoch(cfg)
        dataset = load_config(cfg.base_config, [*cfg.overrides, *(f"{k}={s.probe()}" for k, s in cfg.params.items())])
        previous = {}
        if Path(args.out).is_file():  # a resumed run keeps the timing of budgets it had nothing left to train for
            previous = {e["steps_per_trial"]: e for e in json.loads(Path(args.out).read_text()).get("budgets", [])}
        entries, summaries = [], []
        for steps in budgets:
            bcfg = at_budget(cfg, steps, per_epoch, trials)
            print(f"== budget {steps} steps per trial ({bcfg.n_trials} trials per study): {bcfg.study}", flush=True)
            both = run_both(bcfg, args.workers)
            entries.append(budget_entry(bcfg, steps, per_epoch, both, previous.get(steps)))
            summaries.append((both["lam"], both["post"]))
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trend = hv_trend([(e["steps_per_trial"], e["hypervolume"]["ratio"]) for e in entries])
    lam0 = summaries[0][0]
    recipe = recipe_record(cfg, posthoc_config(cfg), args.config, reference_input)
    out = {"dataset": dataset.data.name, "recipe": recipe,
           "steps_per_epoch": per_epoch, "bands": list(BANDS), "sampler": cfg.sampler, "objectives": cfg.objectives,
           "directions": cfg.directions, "reference_point": lam0.get("reference_point"),
           "reference": lam0.get("reference"), "normalisation": lam0.get("normalisation"),
           "budgets": entries, "trend": trend,
           "wall_minutes": sum(e["wall_minutes"] or 0 for e in entries)}
    write_benchmark(args.out, out)
    figure(entries, trend, summaries[-1], cfg.objectives, Path(args.figure))
    print(json.dumps({e["steps_per_trial"]: e["hypervolume"]["ratio"] for e in entries}),
          f"trend {trend['slope_per_doubling']} per doubling, crossing {trend['crossing_steps']} ({trend['crossing']})",
          f"→ {args.out}, {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
