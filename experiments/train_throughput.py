"""Training throughput (examples/s) of the two-tower in fp32 vs bf16 autocast, measured interleaved.

    python experiments/train_throughput.py --data-dir ../shared/datasets

writes results/benchmarks/train_throughput.json.

Real ML-100K batches (user text 64 tokens, items 64, batch 64) through the module's own training step
(`TwoTowerModule.training_step`: forward, in-batch softmax with the logQ correction, backward, AdamW step).
Precisions alternate A, B, A, B … in one process so machine drift affects both equally; the median step time of
each is reported.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from recsys.config import load_config
from recsys.data.registry import load_data
from recsys.errors import RecsysError
from recsys.models.datamodule import RecDataModule
from recsys.models.encoder import load_tokenizer, resolve_model_path
from recsys.runs import build_module
from recsys.tracking.records import environment_record, write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml100k.yaml")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of --steps steps per precision")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default="results/benchmarks/train_throughput.json")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, [f"data.data_dir={args.data_dir}"] if args.data_dir else [])
        ds, split = load_data(cfg.data)
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    module = build_module(cfg)
    dm = RecDataModule(ds, split, load_tokenizer(resolve_model_path(cfg.model.encoder)), cfg.data, cfg.train)
    examples = dm.examples(0)
    rng = np.random.default_rng(0)
    batches = [dm.collate_train([examples[i] for i in rng.choice(len(examples), cfg.train.batch_size)])
               for _ in range(args.steps)]
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5)
    module.train()

    def step(batch, bf16: bool) -> None:  # the module's own training step (logQ correction and all)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer
            loss = module.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    times = {"fp32": [], "bf16-autocast": []}
    for bf16 in (False, True):
        step(batches[0], bf16)  # warm-up
    for _ in range(args.rounds):
        for name, bf16 in (("fp32", False), ("bf16-autocast", True)):
            for b in batches:
                t = time.perf_counter()
                step(b, bf16)
                times[name].append(time.perf_counter() - t)
    bs = cfg.train.batch_size
    rows = {k: {"median_step_s": float(np.median(v)), "examples_per_s": bs / float(np.median(v)), "steps": len(v)}
            for k, v in times.items()}
    out = {"dataset": cfg.data.name, "batch_size": bs, "user_tokens": cfg.data.train_user_max_tokens,
           "item_tokens": cfg.data.item_max_tokens,
           "bf16_supported_by_cpu": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
           **environment_record(), "precisions": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), out)
    for k, v in rows.items():
        print(f"{k:14s} {v['examples_per_s']:.1f} examples/s (median step {v['median_step_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
