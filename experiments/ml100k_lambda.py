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

from recsys.config import load_config
from recsys.efficiency.cost import online_cost
from recsys.efficiency.latency import environment, exclusive, interleaved, retrieval_call, threads, user_tower_call
from recsys.efficiency.materialize import materialize
from recsys.efficiency.predictor import load_or_build, predict
from recsys.errors import RecsysError
from recsys.tracking.records import write_json
from recsys.train import dataset_slug, load_data, load_run, train

# gated runs: name → overrides on configs/ml100k_lambda.yaml (plus model.init_from=<dense run>)
FAST = ["compress.gate_init=3.0", "compress.gate_lr=0.5", "compress.lagrangian_lr=1.0", "compress.budget_warmup=0.4"]
RUNS: dict[str, list[str]] = {
    # the dense model trained on with the same recipe and examples, no gates: the fair accuracy reference
    "dense-ft": ["compress.gates=[]"],
    "params-1": ["compress.lambda_params=1.0"],
    "budget-latency-0.2": ["compress.budget_metric=latency", "compress.budget_target=0.2"],
    "budget-latency-0.33": ["compress.budget_metric=latency", "compress.budget_target=0.33"],
    # asymmetric: a small user tower (latency budget) and a dense item tower in the same embedding space
    "asymmetric-0.2": ["model.shared_towers=false", "compress.budget_metric=latency", "compress.budget_target=0.2",
                       "compress.item_weight=0"],
    # twice the examples and faster gates/multipliers, then recovery fine-tuning with the structure frozen
    "budget-latency-0.2-long": ["compress.budget_metric=latency", "compress.budget_target=0.2",
                                "train.examples_per_user=12", *FAST],
    "budget-latency-0.2-long-recovered": ["model.init_from=results/runs/ml-100k-lambda-budget-latency-0.2-long",
                                          "compress.freeze_gates=true"],
    "latency-20": ["compress.lambda_latency=20.0", *FAST[:2]],
    "flops-20": ["compress.lambda_flops=20.0", *FAST[:2]],
    # more λ per penalty, between "nothing moves" (1) and "everything closes" (20), with in-run recovery
    "params-5": ["compress.lambda_params=5.0", *FAST[:2], "compress.recovery=0.3"],
    "latency-2": ["compress.lambda_latency=2.0", *FAST[:2], "compress.recovery=0.3"],
    "latency-5": ["compress.lambda_latency=5.0", *FAST[:2], "compress.recovery=0.3"],
    "flops-2": ["compress.lambda_flops=2.0", *FAST[:2], "compress.recovery=0.3"],
    "flops-5": ["compress.lambda_flops=5.0", *FAST[:2], "compress.recovery=0.3"],
    # distillation from the dense run while the structure is learned (issue 6's teacher), then fixed
    "budget-latency-0.2-distill": ["compress.budget_metric=latency", "compress.budget_target=0.2",
                                   "train.examples_per_user=12", *FAST, "compress.recovery=0.3",
                                   "distill.teacher=results/runs/ml-100k-bench-seed0", "distill.hidden_weight=1.0"],
}


def _lambda(over: list[str], key: str) -> float:
    return next((float(o.split("=")[1]) for o in over if o.startswith(f"compress.{key}=")), 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml100k_lambda.yaml")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dense", default="results/runs/ml-100k-bench-seed0", help="the dense fine-tuned run")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    ap.add_argument("--out", default="results/benchmarks/ml100k_lambda.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    over = list(args.overrides) + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    names = [n for n in args.runs.split(",") if n]
    try:
        unknown = [n for n in names if n not in RUNS]
        if unknown:
            raise RecsysError(f"--runs: unknown run {unknown[0]!r} (known: {', '.join(RUNS)})")
        cfg = load_config(args.config, over)
        root = Path(cfg.tracking.results_dir) / "runs"
        prefix = f"{dataset_slug(cfg.data)}-lambda"
        dense_dir = Path(args.dense)
        if not (dense_dir / "metrics.json").is_file():
            raise RecsysError(f"--dense: {dense_dir} is not a finished run (run experiments/ml100k_baselines.py)")
        run_dirs = {"dense": dense_dir} | {name: root / f"{prefix}-{name}" for name in names}
        for name in names:
            if (run_dirs[name] / "metrics.json").is_file():
                continue
            print(f"== training {name}", flush=True)
            train(load_config(args.config, over + [f"model.init_from={dense_dir}", *RUNS[name],
                                                   f"tracking.run_name={run_dirs[name].name}",
                                                   "tracking.progress_bar=false"]))
        towers, rows = {}, []
        for name, run_dir in run_dirs.items():
            run_cfg, module = load_run(run_dir)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            towers[name] = materialize(module.user_tower)
            lam = {f"lambda_{k}": _lambda(RUNS.get(name, []), f"lambda_{k}") for k in ("params", "flops", "latency")}
            rows.append({"name": name, "run": str(run_dir), **lam,
                         "budget": metrics.get("structure", {}).get("budget"),
                         "asymmetric": not run_cfg.model.shared_towers,
                         "ndcg@10": metrics["test"]["ndcg@10"], "recall@10": metrics["test"]["recall@10"],
                         "val_ndcg@10": metrics["val"]["ndcg@10"], "train_minutes": metrics["train_minutes"]})
        seq, n_items = cfg.data.user_max_tokens, load_data(cfg.data)[1].n_items
        dense_shape = towers["dense"].encoder.shape.replace(seq_len=seq, batch=1)
        tables = load_or_build(dense_shape, anchor=True)
        calls = {}
        for name, tower in towers.items():
            user, search = user_tower_call(tower, seq), retrieval_call(n_items, tower.dim)
            calls[name] = lambda user=user, search=search: search_of(user, search)
        print("== measuring online latency, interleaved", flush=True)
        with threads(None), exclusive():
            timing = interleaved(calls, rounds=20, per_round=5)
        for row in rows:
            tower = towers[row["name"]]
            shape = tower.encoder.shape.replace(seq_len=seq, batch=1, output_dim=tower.dim if tower.projection
                                                else None)
            c = online_cost(shape, n_items)
            t = timing[row["name"]]
            row.update({"params": c["user_params"], "flops": c["flops"],
                        "predicted_ms": predict(tables, shape, n_items), "measured_ms_median": t.p50,
                        "measured_ms_p90": t.p90, "shape": shape.to_dict()})
        dense = next(r for r in rows if r["name"] == "dense")
        for row in rows:
            row["speedup_vs_dense"] = dense["measured_ms_median"] / row["measured_ms_median"]
            row["ndcg_vs_dense"] = row["ndcg@10"] / dense["ndcg@10"]
        env = environment()
        write_json(Path(args.out), {"dataset": cfg.data.name, "hardware": env["hardware"], "threads": env["threads"],
                                    "versions": env["versions"], "seq_len": seq, "n_items": n_items,
                                    "config": args.config, "runs": rows})
        for row in rows:
            print(f"{row['name']:22s} ndcg@10 {row['ndcg@10']:.4f}  {row['measured_ms_median']:6.2f} ms "
                  f"(pred {row['predicted_ms']:6.2f})  ×{row['speedup_vs_dense'] or 0:.2f}  "
                  f"params {row['params'] / 1e6:.2f} M", flush=True)
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def search_of(user, search):
    """One request: encode the user, then score the catalog (the retrieval input is fixed; only time matters)."""
    user()
    return search()


if __name__ == "__main__":
    sys.exit(main())
