"""Reproduce results/benchmarks/ml100k_compression.json: precision (bf16, PTQ and QAT int8), distillation and
the three stacked with structure, on MovieLens-100K.

    python experiments/ml100k_baselines.py --data-dir ../shared/datasets      # dense runs, seeds 0-2 (teachers)
    python experiments/ml100k_compression.py --data-dir ../shared/datasets    # ≈ 2.5 hours on 2 CPU cores, resumable

Runs (a run whose folder holds metrics.json is reused):
- `ft` / `qat`: one more epoch of 6 examples/user from each dense seed (configs/ml100k_lambda.yaml, no gates),
  in float / with int8 fake-quantisation (QAT) of `--int8-backend`'s scheme; `ft` is the fair accuracy reference
  for QAT's extra training.
- `student` / `student-distill`: a 3-layer MiniLM (layers 1, 3, 5 of the checkpoint) trained with the full recipe
  (configs/ml100k.yaml), without / with KL distillation from the dense seed of the same number.
- `stacked`: the distilled student, then a latency budget (structure) with distillation and QAT together.
Every row is evaluated on the test split with the model it serves (int8: torchao's real int8 kernels, or the
exact simulation of ONNX Runtime's; bf16: a bf16 cast), and its online request (user tower at batch 1 + exact
retrieval) measured interleaved with all others in one process, through the row's serving route; the dense
model is also measured through the other fp32 routes (compiled, ONNX Runtime) for the speed-up against the best.
int8 backend: onnxruntime by default — torchao's int8 kernels need VNNI/AMX (17× slower than fp32 on AVX2).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from common import train_or_reuse, write_benchmark

from recsys.config import load_config
from recsys.data.registry import load_data
from recsys.efficiency.latency import exclusive, interleaved, threads
from recsys.errors import RecsysError
from recsys.models.tower import tower_scorers
from recsys.retrieval.evaluate import evaluate
from recsys.retrieval.metrics import compare
from recsys.runs import load_run
from recsys.serving.materialize import materialize
from recsys.serving.quantize import BACKENDS, route_for, simulate_int8
from recsys.serving.routes import request_calls

SEEDS = (0, 1, 2)
STUDENT_LAYERS = "1,3,5"  # MiniLM's layers the 3-layer student starts from
DISTILL = ["distill.alpha=1.0", "distill.loss=kl", "distill.temperature=1.0"]
FT = ["compress.gates=[]", "train.examples_per_user=6"]


def runs(dense: str, backend: str, student: list[str]) -> dict[str, tuple[str, list[str]]]:
    """name → (config, overrides); `{seed}` is filled in per seed."""
    return {
        "ft-seed{seed}": ("configs/ml100k_lambda.yaml", [f"model.init_from={dense}", *FT]),
        f"qat-{backend}-seed{{seed}}": ("configs/ml100k_lambda.yaml",
                                        [f"model.init_from={dense}", *FT, *int8(backend), "compress.qat=true"]),
        "student-seed{seed}": ("configs/ml100k.yaml", [*student, "train.seed={seed}"]),
        "student-distill-seed{seed}": ("configs/ml100k.yaml", [*student, "train.seed={seed}",
                                                               f"distill.teacher={dense}", *DISTILL]),
    }


STACKED = ("configs/ml100k_lambda.yaml", ["compress.budget_metric=latency", "compress.budget_target=0.33",
                                          "compress.qat=true", *DISTILL])


def int8(backend: str) -> list[str]:
    return ["compress.precision=int8", f"compress.int8_backend={backend}"]


def _served(tower, precision: str, backend: str):
    """The tower a row serves, for evaluation (eager: compiled kernels compute the same numbers)."""
    t = materialize(tower)
    if precision == "int8":
        return simulate_int8(t, backend=backend)
    return t.to(torch.bfloat16) if precision == "bf16" else t


def _evaluate(module, precision: str, backend: str, data) -> tuple[dict, np.ndarray]:
    ds, split, tokenizer, data_cfg = data
    user = _served(module.user_tower, precision, backend)
    item = user if module.item_tower is module.user_tower else _served(module.item_tower, precision, backend)
    scorer = tower_scorers(user, item, tokenizer, ds.item_texts, split, data_cfg, ("test",), progress=False)["test"]
    res = evaluate(scorer, split, "test", progress=False)
    return res.metrics, res.per_user["ndcg@10"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dense", default="results/runs/ml-100k-bench-seed{seed}", help="dense run of each seed")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--int8-backend", default="onnxruntime", choices=BACKENDS,
                    help="int8 kernels: onnxruntime (any x86) or torchao (VNNI/AMX CPUs, GPUs)")
    ap.add_argument("--student-layers", default=STUDENT_LAYERS, help="encoder layers the student keeps")
    ap.add_argument("--out", default="results/benchmarks/ml100k_compression.json")
    ap.add_argument("overrides", nargs="*", help="training overrides for every run (tests: a tiny encoder)")
    args = ap.parse_args(argv)
    over = ([f"data.data_dir={args.data_dir}"] if args.data_dir else []) + args.overrides
    student = [f"model.layers=[{args.student_layers}]"]
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        cfg = load_config("configs/ml100k.yaml", over)
        results = cfg.tracking.results_dir
        dense = {s: Path(args.dense.format(seed=s)) for s in seeds}
        for d in dense.values():
            if not (d / "metrics.json").is_file():
                raise RecsysError(f"--dense: {d} is not a finished run (run experiments/ml100k_baselines.py)")
        trained: dict[str, dict[int, Path]] = {}
        for s in seeds:
            for name, (config, o) in runs(str(dense[s]), args.int8_backend, student).items():
                o = [x.format(seed=s) for x in o]
                run = train_or_reuse(config, over + o, name.format(seed=s), results)
                trained.setdefault(name.split("-seed")[0], {})[s] = run
        s0 = seeds[0]
        stacked = train_or_reuse(STACKED[0], over + [f"model.init_from={trained['student-distill'][s0]}",
                                                     f"distill.teacher={dense[s0]}", *student, *STACKED[1],
                                                     *int8(args.int8_backend)],
                                 f"stacked-{args.int8_backend}-seed{s0}", results)
        from recsys.models.encoder import load_tokenizer, resolve_model_path
        ds, split = load_data(cfg.data)
        data = (ds, split, load_tokenizer(resolve_model_path(cfg.model.encoder)), cfg.data)
        # rows: name → (precision served, {seed: run})
        table = {"dense_fp32": ("fp32", dense), "dense_bf16": ("bf16", dense), "ptq_int8": ("int8", dense),
                 "ft_fp32": ("fp32", trained["ft"]), "qat_int8": ("int8", trained[f"qat-{args.int8_backend}"]),
                 "student_nodistill": ("fp32", trained["student"]),
                 "student_distill": ("fp32", trained["student-distill"]),
                 "stacked": ("int8", {s0: stacked})}
        rows, towers, per_user = [], {}, {}
        for name, (precision, by_seed) in table.items():
            metrics, users = [], []
            for s, run in by_seed.items():
                print(f"== evaluating {name} seed {s}", flush=True)
                _, module = load_run(run)
                m, pu = _evaluate(module, precision, args.int8_backend, data)
                metrics.append(m)
                users.append(pu)
                if s == s0:
                    towers[name] = (materialize(module.user_tower), precision)
            per_user[name] = users
            rows.append({"name": name, "precision": precision, "seeds": list(by_seed),
                         "runs": [str(r) for r in by_seed.values()],
                         "ndcg@10": float(np.mean([m["ndcg@10"] for m in metrics])),
                         "ndcg@10_std": float(np.std([m["ndcg@10"] for m in metrics])),
                         "recall@10": float(np.mean([m["recall@10"] for m in metrics])),
                         "per_seed_ndcg@10": [m["ndcg@10"] for m in metrics]})
        seq, n_items = cfg.data.user_max_tokens, split.n_items
        served = {name: (tower, route_for(precision, args.int8_backend)) for name, (tower, precision) in towers.items()}
        for r in ("fp32-compile", "ort-fp32"):  # the other fp32 routes of the dense model
            served[f"dense_{r}"] = (towers["dense_fp32"][0], r)
        calls = {}
        for name, (tower, route) in served.items():
            user, search = request_calls(tower, seq, n_items, route)
            calls[name] = lambda user=user, search=search: (user(), search())
        print("== measuring online latency, interleaved", flush=True)
        with threads(None), exclusive():
            timing = interleaved(calls, rounds=20, per_round=5)
        base = timing["dense_fp32"].p50
        best_fp32 = min(base, timing["dense_fp32-compile"].p50, timing["dense_ort-fp32"].p50)
        for row in rows:
            t = timing[row["name"]]
            row.update({"measured_ms_median": t.p50, "measured_ms_p90": t.p90, "speedup": base / t.p50,
                        "speedup_vs_best_fp32": best_fp32 / t.p50,
                        "ndcg_vs_dense": row["ndcg@10"] / rows[0]["ndcg@10"]})
        routes = {r: timing[f"dense_{r}"].as_dict() for r in ("fp32", "fp32-compile", "ort-fp32")}  # fp32 routes
        a, b = (np.concatenate(per_user[n]) for n in ("student_nodistill", "student_distill"))
        distill_test = {"pooled_over_seeds": compare(a, b),
                        "per_seed": [compare(x, y) for x, y in zip(per_user["student_nodistill"],
                                                                      per_user["student_distill"], strict=True)]}
        write_benchmark(args.out, {"dataset": cfg.data.name, "seq_len": seq, "n_items": n_items,
                                   "best_fp32_ms": best_fp32, "dense_routes": routes,
                                   "distill_vs_nodistill": distill_test, "rows": rows})
        for row in rows:
            print(f"{row['name']:18s} ndcg@10 {row['ndcg@10']:.4f} ({row['ndcg_vs_dense']:.0%})  "
                  f"{row['measured_ms_median']:6.2f} ms  ×{row['speedup']:.2f} (×{row['speedup_vs_best_fp32']:.2f} "
                  "vs best fp32)", flush=True)
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
