"""ItemKNN and EASE^R at catalog scale (issue 18 §6): the validation grid's time and peak memory on a generated
catalog of 50,000 users × 17,000 items → results/benchmarks/baselines_scale.json.

    python experiments/baselines_scale.py                      # ItemKNN's grid + EASE^R at one λ
    python experiments/baselines_scale.py --users 2000 --items 1500 --out /tmp/b.json   # smoke (seconds)

The catalog is the `synthetic` dataset at that size (topics, sessions; `recsys/data/synthetic.py`), split and
evaluated like every dataset. ItemKNN runs its whole validation grid (`recsys.retrieval.baselines.KNN_KS`, sparse
top-k neighbours, sparse × sparse scoring) then test; EASE^R states its cost (`check_ease`) and is timed at
`--ease-lambdas` (fit, validation scoring — sparse history rows × the dense N×N weights — and test), and its full
grid's time is estimated as |grid| × (fit + validation scoring): each λ is a new N³ solve. Times are wall-clock on
this machine; peak memory is the process's maximum resident set.
"""
from __future__ import annotations

import argparse
import resource
import time

from common import exit_with, write_benchmark

from recsys.config import load_config
from recsys.data.registry import load_data
from recsys.retrieval.baselines import EASE_LAMBDAS, check_ease, ease_weights, matrix_scorer, run_itemknn
from recsys.retrieval.evaluate import evaluate


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=17_000)
    ap.add_argument("--ease-lambdas", default="500", help="λ values EASE^R is timed at (comma-separated; '' = none)")
    ap.add_argument("--out", default="results/benchmarks/baselines_scale.json")
    args = ap.parse_args(argv)
    cfg = load_config(None, ["data.name=synthetic", f"data.synthetic_users={args.users}",
                             f"data.synthetic_items={args.items}"])
    t0 = time.perf_counter()
    ds, split = load_data(cfg.data)
    out = {"users": split.n_users, "items": split.n_items, "eval_users": int(len(split.eval_users)),
           "train_interactions": int(sum(len(s) for s in split.train)),
           "data_seconds": time.perf_counter() - t0}
    print(f"{out['users']:,} users × {out['items']:,} items, {out['train_interactions']:,} train interactions "
          f"({out['data_seconds']:.0f} s)", flush=True)
    t0 = time.perf_counter()
    test, info = run_itemknn(split, progress=False)
    out["itemknn"] = {"grid_and_test_seconds": time.perf_counter() - t0, "peak_rss_gb_after": peak_gb(),
                      "chosen_k": info["k"], "val_ndcg@10": info["val"]["ndcg@10"], "test_ndcg@10":
                      test.metrics["ndcg@10"]}
    print(f"itemknn: grid + test {out['itemknn']['grid_and_test_seconds']:.0f} s, peak {peak_gb():.2f} GB", flush=True)
    out["ease"] = {"stated": check_ease(split.n_items, max_items=max(split.n_items, 1)), "runs": []}
    print(out["ease"]["stated"], flush=True)
    for lam in [float(x) for x in args.ease_lambdas.split(",") if x]:  # as run_ease's grid does, one λ timed
        t0 = time.perf_counter()
        weights = ease_weights(split.matrix("val"), lam)  # fitted on the validation-stage input, as in the grid
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        val = evaluate(matrix_scorer(split, "val", weights), split, "val", progress=False)
        val_s = time.perf_counter() - t0
        test = evaluate(matrix_scorer(split, "test", weights), split, "test", progress=False)
        del weights
        out["ease"]["runs"].append({"lambda": lam, "fit_seconds": fit_s, "val_scoring_seconds": val_s,
                                    "fit_val_test_seconds": fit_s + val_s + (time.perf_counter() - t0),
                                    "val_ndcg@10": val.metrics["ndcg@10"], "test_ndcg@10": test.metrics["ndcg@10"],
                                    "peak_rss_gb_after": peak_gb()})
        r = out["ease"]["runs"][-1]
        print(f"ease λ={lam}: fit {fit_s:.0f} s, val scoring {val_s:.0f} s, fit+val+test "
              f"{r['fit_val_test_seconds']:.0f} s, peak {peak_gb():.2f} GB", flush=True)
    if out["ease"]["runs"]:  # the full grid is one fit and one validation pass per λ
        r = out["ease"]["runs"][0]
        out["ease"]["grid_estimate_seconds"] = len(EASE_LAMBDAS) * (r["fit_seconds"] + r["val_scoring_seconds"])
        out["ease"]["grid_size"] = len(EASE_LAMBDAS)
    out["peak_rss_gb"] = peak_gb()
    write_benchmark(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    exit_with(main)
