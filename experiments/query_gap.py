"""The training side of the query gap (issue 26 §4): does the contrastive temperature bring a two-tower model's
user vectors closer to its item vectors — better recall at the same nprobe — without costing NDCG@10?

    python experiments/query_gap.py --data-dir ../shared/datasets     # ≈ 12-15 min on 2 CPU cores (3 runs)
    python experiments/query_gap.py --temperatures 0.05 --out /tmp/qg.json    # one temperature, ≈ 4 min

→ results/benchmarks/query_gap.json. No timings: accuracy and recall only.

Per temperature (`model.temperature`, default 0.05 — the config's — 0.1 and 0.2) the ML-100K sequence tower
(`--config`, default configs/ml100k_sequence.yaml, seed 0; its step budget and early stopping) is trained or
reused (results/runs/<prefix>-t<T>-seed0), then measured on its users:
- test NDCG@10, exact;
- the gap: median best cosine of a test user to any item (and of an item to its nearest other item);
- IVF (nlist = N/39) recall@10 against exact on the test users at nprobe 1, 2, 4, 8 (the index's own top 10);
- the nprobe tuned to recall@10 `--target` on validation users, and test NDCG@10 through it; the same for the
  query-aware IVF (`probe=queries`).
A row is the answer: a temperature that closes the gap raises recall at equal nprobe (or lowers the tuned nprobe)
at no cost in exact NDCG. A run whose time cap fired (`stopped_by: time_cap`) is marked.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import exit_with, train_or_reuse, write_benchmark  # noqa: E402
from retrieval_scale import similarity_gap  # noqa: E402

from recsys.config import parse_index_spec  # noqa: E402
from recsys.recipes.retrieval_index import evaluate_run_index, open_search  # noqa: E402
from recsys.retrieval.index import exact_topk, recall_at, set_search_params  # noqa: E402


def measure(run: Path, target: float) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    n = int(metrics["catalog_items"])
    nlist = max(4, n // 39)
    r = open_search(run, f"ivf,nlist={nlist},nprobe=1", progress=False)
    test = r.queries("test")
    truth = exact_topk(test, r.keys.float(), 10).numpy()
    curve = {p: recall_at(set_search_params(r.index, parse_index_spec(f"ivf,nlist={nlist},nprobe={p}"))
                          .search(test, 10)[1], truth, 10) for p in (1, 2, 4, 8) if p <= nlist}
    row = {"run": str(run), "temperature": None, "stopped_by": metrics.get("stopped_by"),
           "time_capped": metrics.get("stopped_by") == "time_cap", "steps": metrics.get("steps"),
           "ndcg@10": metrics["test"]["ndcg@10"], "val_ndcg@10": metrics["val"]["ndcg@10"], "n_items": n,
           "nlist": nlist, **similarity_gap(r.keys.float().numpy(), test.numpy(), n=len(test)),
           "ivf_recall@10_test_users": {str(p): v for p, v in curve.items()}}
    for name, spec in (("ivf_tuned", f"ivf,nlist={nlist},recall={target}"),
                       ("ivf_probe_queries_tuned", f"ivf,nlist={nlist},probe=queries,recall={target}")):
        res = evaluate_run_index(run, spec, "test", progress=False)
        row[name] = {"spec": res.spec, "nprobe": res.tuning["value"], "val_recall@10": res.tuning["recall"],
                     "test_recall@10": res.ann_recall, "ndcg@10": res.index.metrics["ndcg@10"],
                     "ndcg_vs_exact": res.index.metrics["ndcg@10"] / max(res.exact.metrics["ndcg@10"], 1e-12)}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml100k_sequence.yaml")
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--temperatures", default="0.05,0.1,0.2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefix", default="ml100k-sequence")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every run, e.g. train.max_minutes=null")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/benchmarks/query_gap.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for t in (float(x) for x in args.temperatures.split(",")):
        run = train_or_reuse(args.config, [f"data.data_dir={args.data_dir}", f"model.temperature={t}",
                                           f"train.seed={args.seed}", *args.overrides],
                             f"{args.prefix}-t{t:g}-seed{args.seed}")
        row = {**measure(run, args.target), "temperature": t}
        rows.append(row)
        print(f"temperature {t:g}: NDCG@10 {row['ndcg@10']:.4f}; user→item median best cosine "
              f"{row['user_to_item_median_best_cosine']:.3f}; IVF recall@10 "
              + ", ".join(f"nprobe {p}: {v:.3f}" for p, v in row["ivf_recall@10_test_users"].items())
              + f"; tuned to {args.target}: nprobe {row['ivf_tuned']['nprobe']} (NDCG "
              f"{row['ivf_tuned']['ndcg_vs_exact']:.1%} of exact), probe=queries nprobe "
              f"{row['ivf_probe_queries_tuned']['nprobe']}"
              + (" [time cap fired]" if row["time_capped"] else ""), flush=True)
    write_benchmark(args.out, {"rows": rows, "config": args.config, "target": args.target, "dataset": "ml-100k",
                               "queries": "test users (tuning: validation users)"})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    exit_with(main)
