"""Reproduce results/benchmarks/ml100k_lambda.json: λ-penalised and budget-mode structure learning on ML-100K.

    python experiments/ml100k_baselines.py --data-dir ../shared/datasets     # dense runs (seed 0 is reused here)
    python experiments/ml100k_lambda.py --data-dir ../shared/datasets        # ~1 hour on 2 CPU cores

Every gated run starts from the dense fine-tuned run's weights (`--dense`, `model.init_from`; CoFi's recipe:
prune a fine-tuned model) and trains on the same examples with configs/ml100k_lambda.yaml. Then each run's user
tower is materialized and the online request (user tower at batch 1 + exact retrieval over the catalog) of every
run is measured interleaved in one process, next to its predicted latency. Resumable: a run whose folder holds
metrics.json is reused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import run_matrix, time_requests, train_or_reuse, write_benchmark

from recsys.config import load_config
from recsys.data.registry import dataset_slug, load_data
from recsys.efficiency.predictor import predict
from recsys.errors import RecsysError
from recsys.runs import load_run
from recsys.serving.latency_tables import load_or_build
from recsys.serving.materialize import materialize

MATRIX = "configs/experiments/ml100k_lambda.yaml"  # gated runs: name → overrides (+ model.init_from=<dense run>)


def _lambda(over: list[str], key: str) -> float:
    return next((float(o.split("=")[1]) for o in over if o.startswith(f"compress.{key}=")), 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml100k_lambda.yaml")
    ap.add_argument("--matrix", default=MATRIX, help="the runs: name → overrides")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dense", default="results/runs/ml-100k-bench-seed0", help="the dense fine-tuned run")
    ap.add_argument("--runs", default=None, help="comma-separated subset of the matrix's runs (default: all)")
    ap.add_argument("--out", default="results/benchmarks/ml100k_lambda.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    over = list(args.overrides) + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    try:
        runs = run_matrix(args.matrix)
        names = [n for n in (args.runs or ",".join(runs)).split(",") if n]
        unknown = [n for n in names if n not in runs]
        if unknown:
            raise RecsysError(f"--runs: unknown run {unknown[0]!r} (known: {', '.join(runs)})")
        cfg = load_config(args.config, over)
        prefix = f"{dataset_slug(cfg.data)}-lambda"
        dense_dir = Path(args.dense)
        if not (dense_dir / "metrics.json").is_file():
            raise RecsysError(f"--dense: {dense_dir} is not a finished run (run experiments/ml100k_baselines.py)")
        run_dirs = {"dense": dense_dir} | {
            name: train_or_reuse(args.config, over + [f"model.init_from={dense_dir}", *runs[name]], f"{prefix}-{name}",
                                 cfg.tracking.results_dir) for name in names}
        rows = []
        for name, run_dir in run_dirs.items():
            run_cfg = load_config(run_dir / "config.yaml")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            lam = {f"lambda_{k}": _lambda(runs.get(name, []), f"lambda_{k}") for k in ("params", "flops", "latency")}
            rows.append({"name": name, "run": str(run_dir), **lam,
                         "budget": metrics.get("structure", {}).get("budget"),
                         "asymmetric": not run_cfg.model.shared_towers,
                         "ndcg@10": metrics["test"]["ndcg@10"], "recall@10": metrics["test"]["recall@10"],
                         "val_ndcg@10": metrics["val"]["ndcg@10"], "train_minutes": metrics["train_minutes"]})
        seq, n_items = cfg.data.user_max_tokens, load_data(cfg.data)[1].n_items
        tables = load_or_build(materialize(load_run(dense_dir)[1].user_tower).encoder.shape.replace(
            seq_len=seq, batch=1), anchor=True)
        # every run served as the benchmark's config serves it (its token budget), fp32 eager
        timing, costs = time_requests({name: (run, [f"data.user_max_tokens={seq}"]) for name, run in run_dirs.items()},
                                      rounds=20, per_round=5)
        for row in rows:
            c, t = costs[row["name"]], timing[row["name"]]
            shape = c["shape"]
            row.update({"params": c["params"], "flops": c["flops"], "predicted_ms": predict(tables, shape, n_items),
                        "measured_ms_median": t.p50, "measured_ms_p90": t.p90, "shape": shape.to_dict()})
        dense = next(r for r in rows if r["name"] == "dense")
        for row in rows:
            row["speedup_vs_dense"] = dense["measured_ms_median"] / row["measured_ms_median"]
            row["ndcg_vs_dense"] = row["ndcg@10"] / dense["ndcg@10"]
        write_benchmark(args.out, {"dataset": cfg.data.name, "seq_len": seq, "n_items": n_items,
                                   "config": args.config, "matrix": args.matrix, "runs": rows})
        for row in rows:
            print(f"{row['name']:22s} ndcg@10 {row['ndcg@10']:.4f}  {row['measured_ms_median']:6.2f} ms "
                  f"(pred {row['predicted_ms']:6.2f})  ×{row['speedup_vs_dense'] or 0:.2f}  "
                  f"params {row['params'] / 1e6:.2f} M", flush=True)
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
