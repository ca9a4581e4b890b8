"""The end of `make demo`: what the framework is for, on the synthetic default — dense, pruned and int8, accuracy
beside measured speed-up.

    recsys train --config configs/synthetic.yaml          # the dense two-tower (make demo runs it first)
    python experiments/demo_tradeoff.py                   # ≈ 4 min on 2 CPU cores

Rows: the dense run; the same model pruned by importance (half its heads and FFN neurons, the post-hoc baseline
of the sweeps) with a short recovery fine-tuning; the dense model served by int8 kernels (ONNX Runtime, post-
training quantization: nothing trained); the pruned model in int8. Test NDCG@10 of each as it is served, and
its online request (user tower at batch 1 + exact retrieval over the catalog) timed interleaved in one process.
Writes results/demo/tradeoff.json and results/demo/tradeoff.png.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from common import time_requests, train_or_reuse, write_benchmark

from recsys.config import load_config
from recsys.errors import RecsysError
from recsys.recipes.evaluate import evaluate_run
from recsys.tracking.records import markdown_table

INT8 = ["compress.precision=int8", "compress.int8_backend=onnxruntime"]


def figure(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in rows:
        ax.scatter(r["speedup"], r["ndcg@10"], s=40)
        ax.annotate(r["model"], (r["speedup"], r["ndcg@10"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("measured speed-up of the online request over dense")
    ax.set_ylabel("test NDCG@10 (as served)")
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/synthetic.yaml")
    ap.add_argument("--prune-ratio", type=float, default=0.5)
    ap.add_argument("--out", default="results/demo")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        results = cfg.tracking.results_dir
        dense = Path(results) / "runs" / cfg.tracking.run_name
        if not (dense / "metrics.json").is_file():
            raise RecsysError(f"{dense}: train the dense run first (recsys train --config {args.config})")
        stale = Path(results) / "runs" / f"{cfg.tracking.run_name}-pruned"
        if (stale / "metrics.json").is_file() and \
                (stale / "metrics.json").stat().st_mtime < (dense / "metrics.json").stat().st_mtime:
            shutil.rmtree(stale)  # pruned from an earlier dense run: this demo's own artifact, made again
        pruned = train_or_reuse(args.config, [*args.overrides, f"model.init_from={dense}",
                                              "compress.gates=[heads,ffn]", "compress.ffn_group=32",
                                              f"compress.prune_ratio={args.prune_ratio}", "train.examples_per_user=2"],
                                f"{cfg.tracking.run_name}-pruned", results)
        served = {"dense fp32": (dense, None), f"pruned {args.prune_ratio:.0%} fp32": (pruned, None),
                  "dense int8 (PTQ)": (dense, INT8), f"pruned {args.prune_ratio:.0%} int8": (pruned, INT8)}
        accuracy = {name: evaluate_run(run, "test", progress=False, overrides=over, served=True).metrics
                    for name, (run, over) in served.items()}
        timing, _ = time_requests(served, rounds=10, per_round=5)
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base_ms, base_ndcg = timing["dense fp32"].p50, accuracy["dense fp32"]["ndcg@10"]
    rows = [{"model": name, "ndcg@10": accuracy[name]["ndcg@10"], "recall@10": accuracy[name]["recall@10"],
             "% of dense": 100 * accuracy[name]["ndcg@10"] / base_ndcg, "ms": timing[name].p50,
             "speedup": base_ms / timing[name].p50} for name in served]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_benchmark(out / "tradeoff.json", {"dataset": cfg.data.name, "rows": rows})
    figure(rows, out / "tradeoff.png")
    print("\naccuracy–efficiency trade-off (test split; online request = user tower at batch 1 + exact retrieval):")
    print(markdown_table(rows, ["model", "ndcg@10", "recall@10", "% of dense", "ms", "speedup"], ".3f"))
    print(f"→ {out / 'tradeoff.json'}, {out / 'tradeoff.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
