"""Reproduce results/benchmarks/serving_routes.json: every serving route of the MiniLM user tower (batch 1,
128 tokens) measured interleaved in one process, with its embeddings' cosine similarity to fp32 eager.

    python experiments/serving_routes.py            # ≈ 5 minutes on 2 CPU cores (compiling included)

Routes (recsys/serving/quantize.py): fp32 eager, fp32 torch.compile (freezing), bf16 + compile, torchao int8
(per-channel weights, per-token dynamic activations) + compile, ONNX Runtime fp32 and int8 (quantize_dynamic).
The cosine (over 8 inputs of random token ids) is a numerical check of each route; the accuracy that matters,
NDCG@10, is measured by experiments/ml100k_compression.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from recsys.efficiency.latency import environment, exclusive, interleaved, threads, tower_inputs
from recsys.models.encoder import BertEncoder
from recsys.models.tower import Tower
from recsys.serving.quantize import ROUTES, serve
from recsys.tracking.records import write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--routes", default=",".join(ROUTES))
    ap.add_argument("--out", default="results/benchmarks/serving_routes.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    enc = BertEncoder.from_pretrained(args.encoder)
    tower = Tower(enc, enc.shape.hidden).eval()
    example = tower_inputs(1, args.seq_len)
    checks = [tower_inputs(1, args.seq_len, seed=s) for s in range(1, 9)]
    with torch.inference_mode():
        ref = [tower(**x) for x in checks]
    calls, cos, failed = {}, {}, {}
    with threads(None):
        for route in args.routes.split(","):
            print(f"== building {route}", flush=True)
            try:
                run = serve(tower, route, example)
            except Exception as e:  # a route this machine cannot build is recorded, not fatal
                failed[route] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            calls[route] = lambda run=run: run(example)
            cos[route] = min(float(torch.nn.functional.cosine_similarity(run(x), r).min())
                             for x, r in zip(checks, ref, strict=True))
        print("== measuring, interleaved", flush=True)
        with exclusive():
            timing = interleaved(calls, rounds=20, per_round=5)
    base = timing["fp32"].p50
    best_fp32 = min(t.p50 for r, t in timing.items() if r in ("fp32", "fp32-compile", "ort-fp32"))
    rows = [{"route": r, **timing[r].as_dict(), "speedup_vs_fp32_eager": base / timing[r].p50,
             "speedup_vs_best_fp32": best_fp32 / timing[r].p50, "min_cosine_vs_fp32": cos[r]} for r in calls]
    env = environment()
    write_json(Path(args.out), {"encoder": args.encoder, "batch": 1, "seq_len": args.seq_len,
                                "hardware": env["hardware"], "threads": env["threads"], "versions": env["versions"],
                                "bf16_supported_by_cpu": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                "rows": rows, "failed": failed})
    for r in rows:
        print(f"{r['route']:14s} {r['median_ms']:7.2f} ms  ×{r['speedup_vs_fp32_eager']:.2f} vs fp32 eager  "
              f"×{r['speedup_vs_best_fp32']:.2f} vs best fp32  cos ≥ {r['min_cosine_vs_fp32']:.4f}", flush=True)
    for r, why in failed.items():
        print(f"{r:14s} failed: {why}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
