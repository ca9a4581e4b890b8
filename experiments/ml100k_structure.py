"""Reproduce results/benchmarks/ml100k_structure.json: the fastest searched model (fp32, structure only) whose
validation NDCG@10 is ≥ 97% of the tuned dense model's, retrained with 3 seeds and reported on test, against the
dense model given the same training without gates.

    python experiments/ml100k_pareto.py --data-dir ../shared/datasets      # the λ study it picks from
    python experiments/ml100k_structure.py --data-dir ../shared/datasets   # ≈ 30 min on 2 CPU cores, resumable

Selection reads only validation: the study's completed trials (those measured undisturbed), against the dense
reference at the input length chosen on validation. The chosen trial's settings (budget target, token budget,
history items) are trained again with seeds 0–2 (`results/runs/structure-best-seed<k>`); "dense" is the dense
run trained the same number of steps with the same recipe and no gates, at the reference's input length
(`results/runs/structure-dense-seed<k>`). Every run's online request (user tower at batch 1 + exact retrieval,
each at its own token budget) is measured interleaved in one process; speed-up = dense ms / best ms.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from common import time_requests, train_or_reuse, tuned_input, write_benchmark

from recsys.config import load_config
from recsys.errors import RecsysError
from recsys.search.objectives import disturbed, reference_costs
from recsys.search.study import load_sweep, open_study

STRUCTURE = ("compress.gates=", "compress.budget_", "compress.importance_", "compress.lambda_", "compress.recovery")


def candidates(cfg, ref: dict, share: float) -> dict:
    """A study's completed, undisturbed trials against the reference on validation: the fastest with NDCG@10 ≥
    share × the reference's ("pick", None when no trial reaches it) and, for the record, the three closest to it."""
    from optuna.trial import TrialState

    study = open_study(cfg)
    ok = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
          if not disturbed(t.user_attrs.get("costs", {}), ref, cfg.max_reference_drift)]
    i_acc, i_lat = cfg.objectives.index("ndcg@10"), cfg.objectives.index("latency")

    def row(t) -> dict:
        return {"trial": t.number, "overrides": t.user_attrs["overrides"], "val_ndcg@10": t.values[i_acc],
                "share_of_dense_val": t.values[i_acc] / ref["ndcg@10"], "val_latency_ms": t.values[i_lat],
                "speedup_val": ref["latency"] / t.values[i_lat]}

    good = [t for t in ok if t.values[i_acc] >= share * ref["ndcg@10"]]
    closest = sorted(ok, key=lambda t: -t.values[i_acc])[:3]
    pick = row(min(good, key=lambda t: t.values[i_lat])) if good else None
    return {"study": cfg.study, "pick": pick, "candidates": len(good), "completed": len(ok),
            "closest": [row(t) for t in closest]}


def missed(args, cfg, ref: dict, lam: dict) -> int:
    """No λ trial reaches the share on validation: nothing to retrain. Record that, the closest trials of both
    studies, and the dense reference (validation, and test at the same input length), instead of a pick."""
    from recsys.recipes.evaluate import evaluate_run
    from recsys.search.posthoc import posthoc_config

    post = candidates(posthoc_config(cfg), ref, args.share)
    test = evaluate_run(cfg.reference_run, "test", progress=False, overrides=cfg.reference_overrides).metrics
    why = (f"no completed trial of {cfg.study} reaches {args.share:.0%} of the dense validation NDCG@10 "
           f"({lam['completed']} trials; the closest keeps {lam['closest'][0]['share_of_dense_val']:.1%} at "
           f"{lam['closest'][0]['speedup_val']:.2f}x)" if lam["closest"] else f"{cfg.study} has no completed trial")
    out = {"dataset": "ml-100k", "best": None, "missed": why, "runs": [],
           "selection": {**lam, "share_of_dense": args.share, "dense_val_ndcg@10": ref["ndcg@10"], "stage": "val"},
           "posthoc_selection": post,
           "dense": {"run": cfg.reference_run, "val_ndcg@10": ref["ndcg@10"], "ndcg@10": test["ndcg@10"],
                     "recall@10": test["recall@10"], "measured_ms_median": ref["latency"], "n_seeds": 1,
                     "serving_overrides": cfg.reference_overrides},
           "precision": "fp32", "latency": "user tower batch 1 + exact retrieval, interleaved with the reference"}
    write_benchmark(args.out, out)
    print(f"missed: {why}; post-hoc: {post['candidates']} of {post['completed']} trials reach it → {args.out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sweeps/ml100k_recipe.yaml")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--share", type=float, default=0.97, help="validation NDCG@10 kept, as a share of dense")
    ap.add_argument("--out", default="results/benchmarks/ml100k_structure.json")
    args = ap.parse_args(argv)
    data = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    try:
        cfg = load_sweep(args.config, [], data)
        if cfg.tune_reference_input and not cfg.reference_overrides:  # as ml100k_pareto.py chose it
            cfg.reference_overrides = tuned_input(cfg.folder.parent, cfg.reference_run)
            if cfg.reference_overrides is None:
                tuned = cfg.folder.parent / f"reference-input-{Path(cfg.reference_run).name}.json"
                raise RecsysError(f"{tuned} missing: run experiments/ml100k_pareto.py first")
        ref = reference_costs(cfg)
        lam = candidates(cfg, ref, args.share)
        if lam["pick"] is None:
            return missed(args, cfg, ref, lam)
        pick = {**lam["pick"], "candidates": lam["candidates"], "completed": lam["completed"]}
        print(f"chosen: trial {pick['trial']} {pick['overrides']} (val {pick['val_ndcg@10']:.4f}, "
              f"{pick['val_latency_ms']:.2f} ms)", flush=True)
        dense_over = [o for o in cfg.overrides if not o.startswith(STRUCTURE)] + ["compress.gates=[]"]
        seeds = [int(s) for s in args.seeds.split(",")]
        runs = []
        for s in seeds:
            runs.append(("best", s, train_or_reuse(cfg.base_config, [*cfg.overrides, *pick["overrides"], *data,
                                                                     f"train.seed={s}"], f"structure-best-seed{s}",
                                                    cfg.results_dir)))
            runs.append(("dense", s, train_or_reuse(cfg.base_config, [*dense_over, *cfg.reference_overrides, *data,
                                                                      f"train.seed={s}"], f"structure-dense-seed{s}",
                                                    cfg.results_dir)))
        timing, costs = time_requests({f"{kind}-{s}": (run, None) for kind, s, run in runs}, rounds=20, per_round=3)
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for kind, s, run in runs:
        m = json.loads((run / "metrics.json").read_text())
        run_cfg = load_config(run / "config.yaml")
        t = timing[f"{kind}-{s}"]
        rows.append({"kind": kind, "seed": s, "run": str(run), "val": m["val"], "test": m["test"],
                     "measured_ms_median": t.p50, "measured_ms_p90": t.p90, "steps": m["steps"],
                     "train_minutes": m["train_minutes"], "user_max_tokens": run_cfg.data.user_max_tokens,
                     "history_items": run_cfg.data.history_items,
                     "shape": m.get("structure", {}).get("user_shape"), "online_flops": costs[f"{kind}-{s}"]["flops"]})

    def mean(kind, key):
        vals = [r["test"][key] if key != "ms" else r["measured_ms_median"] for r in rows if r["kind"] == kind]
        return float(np.mean(vals))

    dense_ms, best_ms = mean("dense", "ms"), mean("best", "ms")
    best_rows = [r for r in rows if r["kind"] == "best"]
    out = {"dataset": "ml-100k", "selection": {**pick, "share_of_dense_val": args.share,
                                               "dense_val_ndcg@10": ref["ndcg@10"], "stage": "val"},
           "dense": {"ndcg@10": mean("dense", "ndcg@10"), "recall@10": mean("dense", "recall@10"),
                     "measured_ms_median": dense_ms, "n_seeds": len(seeds),
                     "user_max_tokens": rows[1]["user_max_tokens"], "history_items": rows[1]["history_items"]},
           "best": {"ndcg@10": mean("best", "ndcg@10"), "recall@10": mean("best", "recall@10"),
                    "share_of_dense": mean("best", "ndcg@10") / mean("dense", "ndcg@10"),
                    "measured_ms_median": best_ms, "speedup": dense_ms / best_ms, "n_seeds": len(seeds),
                    "shape": [r["shape"] for r in best_rows], "user_max_tokens": best_rows[0]["user_max_tokens"],
                    "history_items": best_rows[0]["history_items"]},
           "runs": rows, "precision": "fp32", "latency": "user tower batch 1 + exact retrieval, interleaved"}
    write_benchmark(args.out, out)
    b = out["best"]
    print(f"best: NDCG@10 {b['ndcg@10']:.4f} ({b['share_of_dense']:.1%} of dense), {b['speedup']:.2f}× → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
