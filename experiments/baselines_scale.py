"""ItemKNN and EASE^R at catalog scale (issue 18 §6): the validation grid's time and peak memory on a generated
catalog of 50,000 users × 17,000 items → results/benchmarks/baselines_scale.json.

    python experiments/baselines_scale.py                      # ItemKNN's grid + EASE^R at one λ
    python experiments/baselines_scale.py --users 2000 --items 1500 --out /tmp/b.json   # smoke (seconds)

The catalog is the `synthetic` dataset at that size (topics, sessions; `recsys/data/synthetic.py`), split and
evaluated like every dataset. ItemKNN runs its whole validation grid (`recsys.retrieval.baselines.KNN_KS`, sparse
top-k neighbours, sparse × sparse scoring) then test; EASE^R states its cost (`check_ease`) and is timed at
`--ease-lambdas` (its full grid is 9 λ, each a new N³ solve). Times are wall-clock on this machine; peak memory is
the process's maximum resident set.
"""
from __future__ import annotations

import argparse
import resource
import time

from common import exit_with, write_benchmark

from recsys.config import load_config
from recsys.data.registry import load_data
from recsys.retrieval.baselines import check_ease, run_ease, run_itemknn


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
    for lam in [float(x) for x in args.ease_lambdas.split(",") if x]:
        t0 = time.perf_counter()
        test, _ = run_ease(split, grid=(lam,), progress=False)
        out["ease"]["runs"].append({"lambda": lam, "fit_val_test_seconds": time.perf_counter() - t0,
                                    "test_ndcg@10": test.metrics["ndcg@10"], "peak_rss_gb_after": peak_gb()})
        print(f"ease λ={lam}: {out['ease']['runs'][-1]['fit_val_test_seconds']:.0f} s, peak {peak_gb():.2f} GB",
              flush=True)
    out["peak_rss_gb"] = peak_gb()
    write_benchmark(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    exit_with(main)
