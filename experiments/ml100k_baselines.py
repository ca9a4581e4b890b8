"""Reproduce results/benchmarks/ml100k_baselines.json: baselines and a MiniLM two-tower (3 seeds) on ML-100K.

    python experiments/ml100k_baselines.py --data-dir ../shared/datasets            # ~1 hour on 2 CPU cores
    python experiments/ml100k_baselines.py --dataset amazon2018:Gift_Cards --path ../shared/datasets/amazon-gift-cards

Resumable: a seed whose run folder already holds metrics.json is not trained again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from common import train_or_reuse, write_benchmark

from recsys.config import load_config
from recsys.data.registry import dataset_slug
from recsys.errors import RecsysError
from recsys.recipes.baselines import run_baselines
from recsys.retrieval.metrics import METRIC_COLUMNS

METRICS = ["ndcg@10", "recall@10", "ndcg@20", "recall@20", "mrr@10"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml100k.yaml")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--path", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=None, help="default: results/benchmarks/<dataset>_baselines.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    over = list(args.overrides)
    for flag, key in (("dataset", "data.name"), ("path", "data.path"), ("data_dir", "data.data_dir")):
        if getattr(args, flag):
            over.append(f"{key}={getattr(args, flag)}")
    try:
        cfg = load_config(args.config, over)
        slug = dataset_slug(cfg.data)
        base_file = Path(cfg.tracking.results_dir) / "baselines" / slug / "baselines.json"
        if base_file.is_file():
            baselines = json.loads(base_file.read_text())["models"]
        else:
            baselines = run_baselines(cfg, progress=False)
        runs = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            run = train_or_reuse(args.config, over + [f"train.seed={seed}"], f"{slug}-bench-seed{seed}",
                                 cfg.tracking.results_dir)
            runs.append(json.loads((run / "metrics.json").read_text()))
            print(f"seed {seed}: " + ", ".join(f"{m} {runs[-1]['test'][m]:.4f}" for m in METRICS), flush=True)
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    two_tower = {m: float(np.mean([r["test"][m] for r in runs])) for m in METRICS}
    two_tower["std"] = {m: float(np.std([r["test"][m] for r in runs], ddof=1)) if len(runs) > 1 else 0.0
                        for m in METRICS}
    two_tower["seeds"] = [int(s) for s in args.seeds.split(",")]
    two_tower["per_seed"] = [r["test"] for r in runs]
    two_tower["train_minutes"] = float(np.mean([r["train_minutes"] for r in runs]))
    two_tower["train_examples_per_s"] = float(np.mean([r["train_examples_per_s"] for r in runs]))
    two_tower["config"] = cfg.to_dict()
    models = {k: {m: v[m] for m in METRICS} | {h: v[h] for h in ("k", "lambda", "encoder") if h in v}
              for k, v in baselines.items()}
    models["two_tower"] = two_tower
    out = {"dataset": cfg.data.name,
           "protocol": {"split": "leave-last-out (timestamp, ties by file order)", "ranking": "full, all items",
                        "masking": "train items (+ validation item at test)", "ties": "ascending item index",
                        "metrics_stage": "test", "selection": "validation NDCG@10"},
           "models": models}
    path = Path(args.out or f"results/benchmarks/{slug.replace('-', '')}_baselines.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_benchmark(path, out)
    print(f"wrote {path}")
    for k, v in models.items():
        print(f"{k:12s} " + "  ".join(f"{m} {v[m]:.4f}" for m in METRIC_COLUMNS if m in v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
