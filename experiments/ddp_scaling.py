"""Data-parallel training throughput on this CPU: 1 against 2 processes (gloo), with and without cross-rank
in-batch negatives (`train.gather_negatives`), and DeepSpeed ZeRO-2 over the same 2 processes.

    nice python experiments/ddp_scaling.py                         # MiniLM, 64-token users; ≈ 3 min on 2 cores
    python experiments/ddp_scaling.py --tiny --steps 4 --output /tmp/ddp.json   # smoke test (seconds)

writes results/benchmarks/ddp_scaling.json: `rows` [{processes, gather_negatives, examples_per_s, …}] and
`deepspeed` {ran_on: "cpu" | "gpu" | null, reason, …}. Each configuration launches its processes (this script, as a
worker) on 127.0.0.1; every process builds the same seeded two-tower and runs the module's real training step
(`TwoTowerModule.training_step`) under torch's DistributedDataParallel (or `deepspeed.initialize`, ZeRO-2) with
AdamW and gradient clipping, `--batch-size` examples per process per step (weak scaling: 2 processes train twice
the examples per step). After `--warmup` steps, `--steps` steps are timed; examples/s = all processes' examples /
wall time. The cores are split between the processes (2 processes × 1 thread on 2 cores, 1 process × 2 threads).
Nothing is cached: it trains for seconds. GPU numbers come from experiments/gpu_check.py.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "benchmarks" / "ddp_scaling.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_encoder(folder: Path) -> str:
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer, for the smoke test."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from recsys.models.encoder import resolve_model_path
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# --- one process of a configuration -------------------------------------------------------------------------
def worker(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from recsys.config import DataConfig, TrainConfig
    from recsys.data.registry import load_data
    from recsys.models.datamodule import RecDataModule
    from recsys.models.encoder import load_tokenizer, resolve_model_path
    from recsys.models.two_tower import TwoTowerModule
    from recsys.tracking.quiet import quiet_third_party
    quiet_third_party()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = DataConfig(user_max_tokens=args.user_tokens, item_max_tokens=32)
    tcfg = TrainConfig(batch_size=args.batch_size, gather_negatives=args.gather, zero_stage=2, grad_clip=1.0)
    ds, split = load_data(data)
    dm = RecDataModule(ds, split, load_tokenizer(resolve_model_path(args.encoder)), data, tcfg)
    torch.manual_seed(0)
    np.random.seed(rank)
    module = TwoTowerModule(model={"encoder": args.encoder}, train=asdict(tcfg))

    class Step(torch.nn.Module):  # the module's real training step as a forward (DDP, DeepSpeed wrap forwards)
        def __init__(self, m):
            super().__init__()
            self._forward_module = m

        def forward(self, batch):
            return self._forward_module.training_step(batch, 0)

    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.01)
    if args.deepspeed:
        import deepspeed

        from recsys.recipes.deepspeed import deepspeed_config
        deepspeed.init_distributed(dist_backend="gloo")
        step, opt, _, _ = deepspeed.initialize(model=Step(module), optimizer=opt,
                                               config=deepspeed_config(replace(tcfg, precision="32")))
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP
        step = DDP(Step(module))
    pairs = dm.examples(0)
    bs, n = args.batch_size, args.warmup + args.steps
    batches = [dm.collate_train(pairs[(s * world + rank) * bs:(s * world + rank + 1) * bs]) for s in range(n)]
    losses = []
    for s, batch in enumerate(batches):
        if s == args.warmup:
            dist.barrier()
            t0 = time.perf_counter()
        loss = step(batch)
        if args.deepspeed:
            step.backward(loss)
            step.step()
        else:
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
        losses.append(float(loss))
    dist.barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        Path(args.out).write_text(json.dumps({"seconds": seconds, "examples": args.steps * bs * world,
                                              "threads_per_process": torch.get_num_threads(),
                                              "last_loss": losses[-1]}))
    dist.destroy_process_group()


def launch(processes: int, gather: bool, deepspeed: bool, args) -> dict:
    """One configuration: its processes launched and waited for; what rank 0 measured."""
    out = Path(tempfile.mkdtemp(prefix="ddp-scaling-")) / "out.json"
    port = str(_free_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(processes),
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    cmd = [sys.executable, __file__, "--worker", "--encoder", args.encoder, "--batch-size", str(args.batch_size),
           "--user-tokens", str(args.user_tokens), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--out", str(out), *(["--gather"] if gather else []), *(["--deepspeed"] if deepspeed else [])]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(processes)]
    logs = [p.communicate()[0] for p in procs]
    failed = [log for p, log in zip(procs, logs, strict=True) if p.returncode != 0]
    if failed:
        raise RuntimeError(failed[0][-2000:])
    r = json.loads(out.read_text())
    return {"processes": processes, "gather_negatives": gather, "examples_per_s": r["examples"] / r["seconds"],
            "seconds": r["seconds"], "examples": r["examples"], "threads_per_process": r["threads_per_process"],
            "last_loss": r["last_loss"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--tiny", action="store_true", help="a tiny random BERT instead (smoke test)")
    ap.add_argument("--batch-size", type=int, default=32, help="examples per process per step")
    ap.add_argument("--user-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--output", default=str(OUT))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gather", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from common import write_benchmark
    if args.tiny:
        args.encoder = tiny_encoder(Path(tempfile.mkdtemp(prefix="tiny-bert-")))
    rows = []
    for processes, gather in ((1, False), (2, False), (2, True)):
        print(f"== {processes} process(es), gather_negatives={gather}", flush=True)
        rows.append(launch(processes, gather, False, args))
        print(f"   {rows[-1]['examples_per_s']:.1f} examples/s", flush=True)
    print("== DeepSpeed ZeRO-2, 2 processes, gathered negatives (deepspeed.initialize over gloo)", flush=True)
    try:
        import deepspeed  # noqa: F401
        ds = {"ran_on": "cpu", "reason": "DeepSpeed's CPU accelerator over gloo (no oneCCL): deepspeed.initialize "
                                         "with ZeRO-2; Lightning's DeepSpeed strategy itself needs CUDA",
              **launch(2, True, True, args)}
        print(f"   {ds['examples_per_s']:.1f} examples/s", flush=True)
    except ImportError:
        ds = {"ran_on": None, "reason": "deepspeed is not installed (pip install -e '.[deepspeed]')"}
    except RuntimeError as e:
        ds = {"ran_on": None, "reason": f"ZeRO-2 on this CPU failed: {str(e).strip().splitlines()[-1][:200]}"}
    one = rows[0]["examples_per_s"]
    for r in rows:
        r["speedup_vs_1"] = r["examples_per_s"] / one
    gpu = Path(args.output).with_name("gpu_check.json")
    write_benchmark(Path(args.output), {
        "rows": rows, "deepspeed": ds, "encoder": "tiny random BERT" if args.tiny else args.encoder,
        "batch_size_per_process": args.batch_size, "user_max_tokens": args.user_tokens, "timed_steps": args.steps,
        "gpu": json.loads(gpu.read_text()) if gpu.is_file() else None})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
