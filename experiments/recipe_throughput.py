"""Training steps per CPU-minute of a gated trial, before and after the recipe's speed-ups, through the real
training step (`recsys.recipes.train.train`, Lightning; the Throughput callback times optimisation steps only).

    python experiments/recipe_throughput.py --data-dir ../shared/datasets

writes results/benchmarks/recipe_throughput.json. Variants, each a budget-mode gated run from the dense run
(64-token users, batch 64), alternated A, B, C, A, B, C … in one process so machine drift hits all alike:
`items_trained` (the first recipe: shared towers, item texts encoded in every step), `items_frozen` (item tower
frozen, catalog embeddings cached and looked up), `items_frozen_distill` (plus KL distillation from the dense run,
as the recipe trains).
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np
from common import write_benchmark

from recsys.config import load_config
from recsys.errors import RecsysError
from recsys.recipes.train import train

DENSE = "results/runs/ml-100k-bench-seed0"
COMMON = ["compress.budget_metric=latency", "compress.budget_target=0.5", "compress.importance_init=true",
          "data.user_max_tokens=64", "data.train_user_max_tokens=null", "train.examples_per_user=1",
          "tracking.progress_bar=false", "tracking.wandb=disabled"]
VARIANTS = {
    "items_trained": [],
    "items_frozen": ["model.freeze_item_tower=true"],
    "items_frozen_distill": ["model.freeze_item_tower=true", f"distill.teacher={DENSE}"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml100k_lambda.yaml")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="results/benchmarks/recipe_throughput.json")
    args = ap.parse_args(argv)
    base = [f"model.init_from={DENSE}", *COMMON] + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    rates: dict[str, list[float]] = {k: [] for k in VARIANTS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for name, extra in VARIANTS.items():
                    cfg = load_config(args.config, [*base, *extra, f"tracking.results_dir={tmp}",
                                                    f"tracking.run_name={name}-{r}"])
                    out = train(cfg, test=False)
                    rates[name].append(out["train_examples_per_s"])
                    print(f"{name} round {r}: {out['train_examples_per_s']:.1f} examples/s", flush=True)
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch = cfg.train.batch_size
    rows = {k: {"examples_per_s": float(np.median(v)), "steps_per_minute": float(np.median(v)) * 60 / batch,
                "rounds": v} for k, v in rates.items()}
    first = rows["items_trained"]["examples_per_s"]
    for row in rows.values():
        row["speedup_vs_items_trained"] = row["examples_per_s"] / first
    write_benchmark(args.out, {"dataset": "ml-100k", "batch_size": batch, "user_tokens": 64, "variants": rows})
    print({k: round(v["speedup_vs_items_trained"], 2) for k, v in rows.items()}, f"→ {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
