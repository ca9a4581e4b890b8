"""One-GPU check (≤ 8 min on one H200): what this framework does on a CUDA device, measured.

    python experiments/gpu_check.py --data-dir ../shared/datasets      # → results/benchmarks/gpu_check.json

Without a CUDA device it exits at once with one line (exit code 2). On a GPU, in order:
1. `train_bf16`: training throughput of the MiniLM two-tower under bf16 autocast (64-token users, batch 256,
   AdamW, the module's real training step), examples/s over `--train-steps` steps after warm-up, timed with CUDA
   synchronisation. The issue's aim: ≥ 2,000 examples/s on one H200.
2. `deepspeed_zero2`: `recsys train` of the combined-loss model (gates on heads and FFN, a latency budget) with
   `train.strategy=deepspeed train.zero_stage=2 train.precision=bf16-mixed` on ML-100K, one epoch capped at
   `--zero-steps` steps; the run folder's consolidated fp32 checkpoint is then read back by `recsys evaluate`
   (`load_run`), whose test NDCG@10 must equal the run's.
3. `full_ranking`: `recsys evaluate` of that run on the GPU (`--device cuda`): seconds and test metrics.
4. `item_encoding`: the catalog encoded by the MiniLM item tower under bf16 autocast, items/s.
5. `faiss_gpu`: a GPU flat inner-product index over the catalog (search time, recall vs exact), when faiss has
   GPU support; else the reason.
The run goes to results/runs/gpu-check-zero2 (replaced on every call). Falls back to the synthetic dataset when
ML-100K is not under --data-dir (said in the JSON).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

OUT = Path("results/benchmarks/gpu_check.json")


def _timed(fn, steps: int, warmup: int) -> float:
    """Seconds for `steps` calls of fn after `warmup` calls, CUDA-synchronised."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def train_bf16(dm, steps: int, batch_size: int) -> dict:
    from recsys.config import TrainConfig
    from recsys.models.two_tower import TwoTowerModule
    tcfg = TrainConfig(batch_size=batch_size)
    module = TwoTowerModule(model={"encoder": "minilm"}, train=asdict(tcfg)).cuda()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    dm.train_cfg = tcfg
    pairs = dm.examples(0)
    batches = []
    for s in range(min(steps + 3, len(pairs) // batch_size)):
        b = dm.collate_train(pairs[s * batch_size:(s + 1) * batch_size])
        batches.append({k: ({kk: vv.cuda() for kk, vv in v.items()} if isinstance(v, dict)
                            else v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
    it = iter(range(10 ** 9))

    def step():
        batch = batches[next(it) % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = _timed(step, steps, 3)
    rate = steps * batch_size / seconds
    return {"examples_per_s": rate, "steps": steps, "batch_size": batch_size, "seconds": seconds,
            "user_max_tokens": dm.data_cfg.user_max_tokens, "aim_examples_per_s": 2000, "aim_met": rate >= 2000}


def deepspeed_zero2(data_overrides: list[str], steps: int) -> tuple[dict, Path]:
    from recsys.config import load_config
    from recsys.recipes.evaluate import evaluate_run
    from recsys.recipes.train import train
    cfg = load_config(None, [*data_overrides, "train.strategy=deepspeed", "train.zero_stage=2", "train.devices=1",
                             "train.accelerator=gpu", "train.precision=bf16-mixed", "train.batch_size=64",
                             "train.epochs=1", "train.max_minutes=3", "data.user_max_tokens=64",
                             "compress.gates=[heads,ffn]", "compress.budget_metric=flops",
                             "compress.budget_target=0.7", "tracking.run_name=gpu-check-zero2",
                             "tracking.overwrite=true", "tracking.wandb=disabled", "tracking.progress_bar=false",
                             f"train.examples_per_user={max(1, steps * 64 // 943)}"])
    t0 = time.perf_counter()
    out = train(cfg)
    run = Path(out["run_dir"])
    again = evaluate_run(run, "test", progress=False, device="cuda")
    return ({"steps": out["steps"], "train_minutes": out["train_minutes"], "wall_s": time.perf_counter() - t0,
             "examples_per_s": out["train_examples_per_s"], "test": out["test"],
             "checkpoint_is_plain_file": (run / "checkpoints" / "best.ckpt").is_file(),
             "reloaded_test_ndcg@10": again.metrics["ndcg@10"],
             "reload_matches": abs(again.metrics["ndcg@10"] - out["test"]["ndcg@10"]) < 1e-4,
             "structure": out.get("structure")}, run)


def full_ranking(run: Path) -> dict:
    from recsys.recipes.evaluate import evaluate_run
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = evaluate_run(run, "test", progress=False, device="cuda")
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "users": int(len(res.users)), "metrics": res.metrics}


def item_encoding(dm) -> dict:
    from recsys.config import ModelConfig
    from recsys.models.encoder import load_tokenizer, resolve_model_path
    from recsys.models.tower import encode_texts
    from recsys.models.two_tower import build_tower
    tower = build_tower("minilm", ModelConfig()).cuda().eval()
    tok = load_tokenizer(resolve_model_path("minilm"))
    texts = list(dm.item_texts) * max(1, 20000 // len(dm.item_texts))
    seconds = _timed(lambda: encode_texts(tower, tok, texts, 32, 1024, progress=False, autocast=True), 1, 1)
    return {"items_per_s": len(texts) / seconds, "items": len(texts), "batch": 1024, "max_tokens": 32,
            "dtype": "bf16 autocast", "note": "tokenization included"}


def faiss_gpu(n_items: int, dim: int = 384) -> dict:
    try:
        import faiss
    except ImportError:
        return {"ran": False, "reason": "faiss is not installed"}
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return {"ran": False, "reason": "this faiss build has no GPU support (faiss-cpu); install faiss-gpu"}
    g = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(n_items, dim, generator=g), dim=-1).numpy()
    users = torch.nn.functional.normalize(torch.randn(1024, dim, generator=g), dim=-1).numpy()
    index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), dim)
    index.add(items)
    t0 = time.perf_counter()
    _, found = index.search(users, 10)
    seconds = time.perf_counter() - t0
    exact = torch.topk(torch.from_numpy(users) @ torch.from_numpy(items).T, 10).indices.numpy()
    recall = float(sum(len(set(a) & set(b)) for a, b in zip(found, exact, strict=True)) / exact.size)
    return {"ran": True, "index": "GpuIndexFlatIP", "n_items": n_items, "queries": 1024,
            "ms_per_query": 1e3 * seconds / 1024, "recall@10_vs_exact": recall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--train-steps", type=int, default=50)
    ap.add_argument("--zero-steps", type=int, default=300)
    ap.add_argument("--output", default=str(OUT))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"error: gpu_check needs a CUDA device and torch {torch.__version__} sees none; the CPU numbers "
              f"come from experiments/ddp_scaling.py", file=sys.stderr)
        return 2
    from common import write_benchmark

    from recsys.config import load_config
    from recsys.data.registry import load_data
    from recsys.models.datamodule import RecDataModule
    from recsys.models.encoder import load_tokenizer, resolve_model_path
    ml100k = Path(args.data_dir) / "ml-100k"
    data = ["data.name=ml-100k", f"data.data_dir={args.data_dir}"] if ml100k.is_dir() else ["data.name=synthetic"]
    cfg = load_config(None, [*data, "data.user_max_tokens=64"])
    ds, split = load_data(cfg.data)
    dm = RecDataModule(ds, split, load_tokenizer(resolve_model_path("minilm")), cfg.data, cfg.train)
    t0 = time.perf_counter()
    out = {"device": torch.cuda.get_device_name(0), "dataset": cfg.data.name}
    print("== bf16 training throughput", flush=True)
    out["train_bf16"] = train_bf16(dm, args.train_steps, 256)
    print(f"   {out['train_bf16']['examples_per_s']:.0f} examples/s", flush=True)
    print("== item encoding", flush=True)
    out["item_encoding"] = item_encoding(dm)
    print("== faiss GPU index", flush=True)
    out["faiss_gpu"] = faiss_gpu(split.n_items)
    print("== DeepSpeed ZeRO-2 fit of the combined-loss model", flush=True)
    try:
        out["deepspeed_zero2"], run = deepspeed_zero2(data, args.zero_steps)
        print("== full-ranking evaluation on the GPU", flush=True)
        out["full_ranking"] = full_ranking(run)
    except Exception as e:  # recorded, not hidden: the JSON says what failed
        out["deepspeed_zero2"] = {"ran": False, "reason": f"{type(e).__name__}: {str(e)[:300]}"}
        out["full_ranking"] = None
    out["total_s"] = time.perf_counter() - t0
    write_benchmark(Path(args.output), out)
    print(f"wrote {args.output} ({out['total_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
