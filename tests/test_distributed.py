"""Data parallelism over 2 processes (gloo, 127.0.0.1): cross-rank in-batch negatives and sharded full-ranking
evaluation, each against one process on the same data; the DeepSpeed config and the run's bad inputs.

The multi-process tests launch this file as a script (`python tests/test_distributed.py WORKER RANK WORLD PORT
OUT MODEL`): each rank builds the same tiny real BERT two-tower, joins a real gloo process group and writes what
it measured to OUT; the test asserts on it.
"""
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_S

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(worker: str, out: Path, model: str, world: int = 2, timeout: int = HANG_S) -> None:
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, __file__, worker, str(r), str(world), port, str(out), model],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]


# --- workers (run in the launched processes) ----------------------------------------------------------------
def _setup(model: str, **train):
    """Synthetic data, its data module and a seeded tiny two-tower (dropout off: the ranks' forwards compare)."""
    from recsys.config import DataConfig, TrainConfig
    from recsys.data.registry import load_data
    from recsys.models.datamodule import RecDataModule
    from recsys.models.encoder import load_tokenizer

    data = DataConfig(synthetic_users=60, synthetic_items=80, user_max_tokens=24, item_max_tokens=12)
    tcfg = TrainConfig(eval_batch_size=16, **train)
    ds, split = load_data(data)
    dm = RecDataModule(ds, split, load_tokenizer(model), data, tcfg)
    return ds, split, dm, tcfg


def _module(model: str, tcfg, seed: int = 0):
    from dataclasses import asdict

    from recsys.models.two_tower import TwoTowerModule
    torch.manual_seed(seed)
    return TwoTowerModule(model={"encoder": model, "dropout": 0.0}, train=asdict(tcfg))


def _distiller(model: str, student, dm):
    from recsys.config import DistillConfig
    from recsys.models.teacher import Distiller
    teacher = _module(model, student.train_cfg, seed=1).eval()
    d = Distiller(DistillConfig(teacher="t", loss="kl", temperature=2.0, alpha=0.5), teacher, model, model,
                  student.user_tower.dim, student.user_tower.encoder.shape)
    d.cache_items(dm.item_texts, dm.tokenizer, dm.data_cfg.item_max_tokens)
    return d


class _Step(torch.nn.Module):
    """The module's real training step as a forward, so torch's DistributedDataParallel can wrap it."""

    def __init__(self, module):
        super().__init__()
        self._forward_module = module  # Lightning's name for it: its ZeRO checkpoints drop this prefix

    def forward(self, batch):
        return self._forward_module.training_step(batch, 0)


def worker_gather(rank: int, world: int, out: Path, model: str) -> None:
    """Per variant: this rank's half of 16 examples (9 | 7: unequal) through DDP with gathered negatives; rank 0
    also one process on the concatenated batch (gathering off). Loss = mean of the ranks' weighted losses."""
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    warnings.filterwarnings("ignore")  # self.log outside a Trainer
    variants = {"plain": {"logq_correction": False}, "logq_extra": {"extra_negatives": 3},
                "distill_kl": {"logq_correction": True}}
    result = {}
    for name, train in variants.items():
        _, _, dm, tcfg = _setup(model, **train)
        pairs = dm.examples(0)[::7][:16]
        halves = [pairs[:9], pairs[9:]]
        extra = tcfg.extra_negatives
        np.random.seed(11)  # extra negatives: the concatenated batch draws 2·M, rank r the r-th M of them
        if rank == 1 and extra:
            np.random.randint(0, dm.split.n_items, size=extra)
        batch = dm.collate_train(halves[rank])
        module = _module(model, tcfg)
        if name == "distill_kl":
            module.attach_distiller(_distiller(model, module, dm))
        ddp = DDP(_Step(module), find_unused_parameters=True)
        loss = ddp(batch)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        if rank == 0:
            np.random.seed(11)
            both = [dm.collate_train(h)["items"] for h in halves]  # what the two ranks drew
            np.random.seed(11)
            dm.train_cfg = replace(tcfg, extra_negatives=world * extra)  # the concatenated batch: both ranks' M
            full = dm.collate_train(pairs)
            assert sorted(full["items"].tolist()) == sorted(torch.cat(both).tolist())  # the same items
            one = _module(model, replace(tcfg, gather_negatives=False))
            if name == "distill_kl":
                one.attach_distiller(_distiller(model, one, dm))
            ref = one.training_step(full, 0)
            ref.backward()
            grads = {k: p.grad for k, p in one.named_parameters() if p.grad is not None}
            mine = {k: p.grad for k, p in module.named_parameters() if p.grad is not None}
            assert set(grads) == set(mine), set(grads) ^ set(mine)
            result[name] = {"loss": float(mean_loss), "reference_loss": float(ref),
                            "max_grad_diff": max(float((mine[k] - g).abs().max()) for k, g in grads.items()),
                            "max_grad": max(float(g.abs().max()) for g in grads.values()),
                            "n_grads": len(grads)}
        dist.barrier()
    if rank == 0:
        out.write_text(json.dumps(result))


def worker_evaluate(rank: int, world: int, out: Path, model: str) -> None:
    """Sharded evaluation of a tiny two-tower on every rank; rank 0 also one process's evaluation."""
    from recsys.models.tower import tower_scorers
    from recsys.recipes.evaluate import evaluate_module
    from recsys.retrieval.evaluate import evaluate

    _, split, dm, tcfg = _setup(model)
    module = _module(model, tcfg).eval()
    sharded = evaluate_module(module, dm, ("val", "test"), progress=False)
    res = {}
    if rank == 0:
        scorers = tower_scorers(module.user_tower, module.item_tower, dm.tokenizer, dm.item_texts, split,
                                dm.data_cfg, ("val", "test"), tcfg.eval_batch_size, progress=False)
        for stage, scorer in scorers.items():
            one = evaluate(scorer, split, stage, tcfg.eval_batch_size, progress=False)
            res[stage] = {"users_equal": bool(np.array_equal(one.users, sharded[stage].users)),
                          "ranks_equal": bool(np.array_equal(one.ranks, sharded[stage].ranks)),
                          "metrics": sharded[stage].metrics, "reference": one.metrics,
                          "n_users": int(len(one.users))}
    (out.parent / f"{out.name}.rank{rank}").write_text(json.dumps({k: v.metrics for k, v in sharded.items()}))
    if rank == 0:
        out.write_text(json.dumps(res))


def worker_deepspeed(rank: int, world: int, out: Path, model: str) -> None:
    """The same steps (seed, batches, AdamW, clipping, gathered negatives) under torch DDP and under DeepSpeed
    ZeRO-2 on the CPU (`deepspeed.initialize` over this gloo group); then the ZeRO checkpoint consolidated."""
    import warnings

    import deepspeed
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from recsys.recipes.deepspeed import consolidate, deepspeed_config
    warnings.filterwarnings("ignore")
    _, _, dm, tcfg = _setup(model, batch_size=8, grad_clip=1.0)
    pairs = dm.examples(0)
    batches = [dm.collate_train(pairs[(s * world + rank) * 8:(s * world + rank + 1) * 8]) for s in range(DS_STEPS)]
    losses = {}
    for kind in ("ddp", "zero2"):
        module = _module(model, tcfg)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.01)
        if kind == "ddp":
            step = DDP(_Step(module), find_unused_parameters=True)
        else:
            deepspeed.init_distributed(dist_backend="gloo")
            step, opt, _, _ = deepspeed.initialize(model=_Step(module), optimizer=opt,
                                                   config=deepspeed_config(replace(tcfg, zero_stage=2)))
        losses[kind] = []
        for batch in batches:
            loss = step(batch)
            if kind == "ddp":
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), tcfg.grad_clip)
                opt.step()
            else:
                step.backward(loss)
                step.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses[kind].append(float(mean) / world)
    ckpt = out.parent / "zero2.ckpt"
    step.save_checkpoint(str(ckpt), tag="checkpoint", client_state={"hyper_parameters": dict(module.hparams)})
    dist.barrier()
    if rank == 0:
        consolidate(ckpt, module)
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        fresh = _module(model, tcfg, seed=5)
        fresh.load_state_dict(state)  # strict: every weight, named as the module names it
        own = module.state_dict()
        out.write_text(json.dumps({"losses": losses, "is_file": ckpt.is_file(),
                                   "max_weight_diff": max(float((own[k] - v).abs().max()) for k, v in state.items()),
                                   "n_weights": len(state), "n_module_weights": len(own)}))


DS_STEPS = 6  # optimiser steps compared between DDP and DeepSpeed ZeRO-2
DS_LOSS_TOL = 1e-4  # |mean loss difference| allowed at every step: same math, other reduction order (measured 3e-7)


def _main(argv: list[str]) -> None:
    import torch.distributed as dist
    worker, rank, world, port, out, model = argv
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=int(rank), world_size=int(world))
    try:
        globals()[f"worker_{worker}"](int(rank), int(world), Path(out), model)
    finally:
        dist.destroy_process_group()


# --- tests --------------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_gathered_negatives_equal_one_process_on_the_concatenated_batch(tiny_model, tmp_path):
    out = tmp_path / "gather.json"
    _launch("gather", out, tiny_model)
    result = json.loads(out.read_text())
    assert set(result) == {"plain", "logq_extra", "distill_kl"}
    for name, r in result.items():
        assert r["loss"] == pytest.approx(r["reference_loss"], abs=TOL), name
        assert r["max_grad_diff"] < TOL, (name, r)
        assert r["max_grad"] > 100 * TOL and r["n_grads"] > 10, name  # gradients that could have differed


@pytest.mark.multiprocess
def test_sharded_evaluation_equals_one_process_exactly(tiny_model, tmp_path):
    out = tmp_path / "eval.json"
    _launch("evaluate", out, tiny_model)
    result = json.loads(out.read_text())
    for stage in ("val", "test"):
        r = result[stage]
        assert r["users_equal"] and r["ranks_equal"] and r["n_users"] > 2
        assert r["metrics"] == r["reference"]  # exactly
    rank1 = json.loads((tmp_path / "eval.json.rank1").read_text())  # every rank ends with the whole result
    assert rank1 == {s: result[s]["metrics"] for s in ("val", "test")}


def test_without_a_process_group_gathering_is_the_identity():
    from recsys.losses.gather import all_gather_with_grad, false_negatives, local_first
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
    assert local_first(2, [3, 2, 4], 1).tolist() == [3, 4, 0, 1, 2, 5, 6, 7, 8]
    history = torch.tensor([[5, 2, -1], [7, -1, -1]])
    mask = false_negatives(history, torch.tensor([9, 7]), torch.tensor([9, 2, 7, 5, 3]))
    assert mask.tolist() == [[True, True, False, True, False], [False, False, True, False, False]]


def test_shards_cover_every_user_once_and_too_many_processes_is_one_line():
    from recsys.errors import RecsysError
    from recsys.retrieval.distributed import shard
    parts = [list(range(10))[shard(10, r, 3)] for r in range(3)]
    assert sum(parts, []) == list(range(10)) and sorted(map(len, parts)) == [3, 3, 4]
    with pytest.raises(RecsysError, match="3 processes but only 2 evaluated users"):
        shard(2, 0, 3)


# --- DeepSpeed: ZeRO-2 on this CPU against DDP, the checkpoint made plain; config; bad inputs via the CLI --------
@pytest.mark.multiprocess
def test_deepspeed_zero2_on_cpu_matches_ddp_and_its_checkpoint_loads_plain(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))  # its CPU comm op, built once
    out = tmp_path / "deepspeed.json"
    _launch("deepspeed", out, tiny_model, timeout=HANG_S)
    r = json.loads(out.read_text())
    ddp, zero2 = r["losses"]["ddp"], r["losses"]["zero2"]
    assert len(ddp) == DS_STEPS and max(abs(a - b) for a, b in zip(ddp, zero2, strict=True)) < DS_LOSS_TOL, r
    assert abs(ddp[-1] - ddp[0]) > 10 * DS_LOSS_TOL  # the steps moved the model: the agreement means something
    assert r["is_file"] and r["n_weights"] == r["n_module_weights"] and r["max_weight_diff"] == 0.0


# --- DeepSpeed: config building and bad inputs through the real CLI --------------------------------------------
def test_deepspeed_config_takes_the_run_settings():
    from recsys.config import TrainConfig
    from recsys.recipes.deepspeed import deepspeed_config
    for stage in (1, 2, 3):
        cfg = deepspeed_config(TrainConfig(zero_stage=stage, batch_size=48, grad_clip=0.5, precision="bf16-mixed"))
        assert cfg["zero_optimization"]["stage"] == stage
        assert cfg["train_micro_batch_size_per_gpu"] == 48 and cfg["gradient_clipping"] == 0.5
        assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and not any(k.startswith("_") for k in cfg)


def _cli(args: list[str], hide: str | None = None) -> subprocess.CompletedProcess:
    code = "import sys\n"
    if hide:
        code += f"sys.modules[{hide!r}] = None  # as if not installed\n"
    code += "from recsys.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=HANG_S)


@pytest.mark.parametrize("extra, hide, message", [
    (["train.strategy=deepspeed", "train.accelerator=cpu"], None, "needs a CUDA GPU"),
    (["train.strategy=deepspeed"], "deepspeed", "deepspeed package is not installed"),
    (["train.strategy=deepspeed", "train.zero_stage=4"], None, "zero_stage must be one of 1, 2, 3"),
    (["train.strategy=ddp", "train.accelerator=cpu", "train.devices=4", "data.synthetic_users=3"], None,
     "4 processes but only 3 evaluated users"),
])
def test_bad_distributed_inputs_are_one_line(small_synthetic_args, tmp_path, extra, hide, message):
    proc = _cli(["train", *small_synthetic_args, *extra], hide)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr[-2000:]
    if "deepspeed" in " ".join(extra) and "zero_stage" not in " ".join(extra):
        assert "train.strategy=ddp" in lines[0]
    assert not (tmp_path / "results" / "runs").exists() or not any((tmp_path / "results" / "runs").iterdir())



@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_evaluate_on_a_missing_gpu_is_one_line(tmp_path):
    proc = _cli(["evaluate", str(tmp_path), "--device", "cuda"])
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: --device cuda: no CUDA device here (torch {torch.__version__}); use --device cpu"), proc.stderr


def test_latency_harness_synchronises_only_where_cuda_runs():
    from recsys.efficiency.device import resolve_device, synchronize
    from recsys.efficiency.latency import measure
    synchronize()  # CPU: nothing to wait for, no error
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    device = resolve_device("auto")
    x = torch.randn(256, 256, device=device)
    t = measure(lambda: x @ x, warmup=1, min_repeats=3, min_seconds=0.0)
    assert len(t.samples_ms) >= 3 and t.p50 > 0


if __name__ == "__main__":
    _main(sys.argv[1:])
