"""How close the dense encoder runs to this machine's GEMM rate (fp32 and bf16).

    python experiments/encoder_efficiency.py      # writes results/benchmarks/encoder_efficiency.json

GEMM rate = a large square torch.mm; item-encoding throughput = MiniLM item tower at batch 64 on ~22-token
texts (real ML-100K-like lengths, no padding), fp32 and bf16 autocast; achieved rate = counted FLOPs (the cost
model, matching torch's FLOP counter) per second; fraction = achieved / GEMM rate.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from recsys.efficiency.cost import cost
from recsys.efficiency.latency import environment, measure, tower_inputs
from recsys.efficiency.shape import Shape
from recsys.models.encoder import BertEncoder
from recsys.models.tower import Tower
from recsys.tracking.records import write_json


def gemm_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = measure(lambda: torch.mm(a, b), warmup=2, min_repeats=3, min_seconds=seconds)
    return 2 * n**3 / (t.p50 / 1e3) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=22)
    ap.add_argument("--out", default="results/benchmarks/encoder_efficiency.json")
    args = ap.parse_args(argv)
    enc = BertEncoder.from_pretrained("minilm")
    tower = Tower(enc, enc.shape.hidden).eval()
    shape: Shape = enc.shape.replace(batch=args.batch, seq_len=args.tokens)
    flops = cost(shape)["flops"]
    inputs = tower_inputs(args.batch, args.tokens)
    rows = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        gemm = gemm_gflops(dtype)

        def encode(dtype=dtype):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                return tower(**inputs)
        t0 = time.perf_counter()
        t = measure(encode, warmup=1, min_repeats=3, min_seconds=3.0)
        achieved = flops / (t.p50 / 1e3) / 1e9
        rows[name] = {"gemm_gflops": gemm, "items_per_s": args.batch / (t.p50 / 1e3), "encoder_gflops": achieved,
                      "fraction_of_gemm": achieved / gemm, "batch_ms": t.as_dict(),
                      "seconds": time.perf_counter() - t0}
        print(f"{name}: GEMM {gemm:.0f} GFLOP/s; MiniLM {rows[name]['items_per_s']:.0f} items/s = "
              f"{achieved:.0f} GFLOP/s = {100 * achieved / gemm:.0f}% of GEMM")
    out = {"batch": args.batch, "tokens": args.tokens, "flops_per_batch": flops,
           "bf16_supported_by_cpu": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), **environment(), **rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
