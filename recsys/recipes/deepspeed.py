"""DeepSpeed ZeRO training (`recsys train train.strategy=deepspeed train.zero_stage=2`): the strategy, and a run
folder whose checkpoint is a plain fp32 state dict.

The ZeRO settings live in `configs/deepspeed/zero{1,2,3}.json` (stage 1 shards the optimizer state, stage 2 also
the gradients, stage 3 also the parameters); the batch size, gradient clipping and bf16/fp16 are the run's own
(`train.batch_size`, `train.grad_clip`, `train.precision`) and are written over the file's. Lightning's
`DeepSpeedStrategy` runs on CUDA GPUs only; on CPU use `train.strategy=ddp` (gloo), which gathers the same cross-rank
negatives (`train.gather_negatives`).

A DeepSpeed checkpoint is a folder of ZeRO shards that only DeepSpeed reads. After the fit the best one is
consolidated (DeepSpeed's zero_to_fp32, through Lightning) into the plain `checkpoints/best.ckpt` every run has —
`{"state_dict": fp32 tensors}`, loadable with `torch.load(..., weights_only=True)` — so `recsys evaluate`, `export`,
a distillation teacher and `model.init_from` read a DeepSpeed run like any other.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch

from recsys.config import ZERO_STAGES, TrainConfig
from recsys.errors import RecsysError
from recsys.retrieval.distributed import broadcast_from_zero, world
from recsys.runs import build_module

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
ALTERNATIVE = "use train.strategy=ddp (several processes; gloo on CPU, NCCL on GPUs)"


def zero_config_path(stage: int) -> Path:
    if stage not in ZERO_STAGES:
        raise RecsysError(f"train.zero_stage: unknown ZeRO stage {stage} (DeepSpeed has stages "
                          f"{', '.join(map(str, ZERO_STAGES))})")
    path = CONFIG_DIR / f"zero{stage}.json"
    if not path.is_file():
        raise RecsysError(f"train.zero_stage={stage}: {path} is missing (configs/deepspeed/ ships with the source)")
    return path


def deepspeed_config(train: TrainConfig) -> dict:
    """The DeepSpeed config of a run: configs/deepspeed/zero<stage>.json with the run's batch size, gradient
    clipping and precision."""
    path = zero_config_path(train.zero_stage)
    try:
        cfg = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    except json.JSONDecodeError as e:
        raise RecsysError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    cfg["train_micro_batch_size_per_gpu"] = train.batch_size
    cfg["gradient_accumulation_steps"] = 1
    if train.grad_clip:
        cfg["gradient_clipping"] = train.grad_clip
    cfg["bf16"] = {"enabled": train.precision.startswith("bf16")}
    cfg["fp16"] = {"enabled": train.precision == "16-mixed"}
    return cfg


def check_deepspeed(train: TrainConfig) -> None:
    """strategy=deepspeed can run here: a known ZeRO stage, the package, a CUDA GPU (one line with the alternative
    otherwise)."""
    zero_config_path(train.zero_stage)
    if importlib.util.find_spec("deepspeed") is None:
        raise RecsysError(f"train.strategy=deepspeed: the deepspeed package is not installed (pip install -e "
                          f"'.[deepspeed]'); or {ALTERNATIVE}")
    if train.accelerator == "cpu" or not torch.cuda.is_available():
        raise RecsysError(f"train.strategy=deepspeed needs a CUDA GPU (Lightning's DeepSpeed strategy runs on CUDA "
                          f"only) and {'train.accelerator=cpu' if train.accelerator == 'cpu' else 'none is here'}: "
                          f"{ALTERNATIVE}")


def deepspeed_strategy(train: TrainConfig):
    """Lightning's DeepSpeed strategy with the run's ZeRO config."""
    check_deepspeed(train)
    from pytorch_lightning.strategies import DeepSpeedStrategy
    return DeepSpeedStrategy(config=deepspeed_config(train))


def with_aliases(state: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` with every name of a shared tensor filled in: zero_to_fp32 writes a tensor the module holds under
    several names (shared towers: user_tower.* is item_tower.*) once, so `load_state_dict` would miss the others."""
    names: dict[int, list[str]] = {}
    for k, v in module.state_dict(keep_vars=True).items():
        names.setdefault(id(v), []).append(k)
    out = dict(state)
    for group in names.values():
        present = [k for k in group if k in state]
        for k in group:
            if present and k not in out:
                out[k] = state[present[0]]
    return out


def consolidate(path: Path, module: torch.nn.Module) -> Path:
    """A ZeRO checkpoint folder (any stage) of `module` -> a plain checkpoint file at the same path: {"state_dict":
    fp32 tensors under every name the module has, "hyper_parameters": …}, loadable with weights_only=True. A file
    is left as it is."""
    path = Path(path)
    if path.is_file():
        return path
    from pytorch_lightning.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    tmp = path.with_name(path.name + ".fp32")
    convert_zero_checkpoint_to_fp32_state_dict(str(path), str(tmp))
    client = torch.load(tmp, map_location="cpu", weights_only=False)  # written just now by DeepSpeed
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in with_aliases(client["state_dict"], module).items()}
    torch.save({"state_dict": state, "hyper_parameters": dict(client.get("hyper_parameters") or {})}, tmp)
    shutil.rmtree(path)
    tmp.rename(path)
    return path


def deepspeed_final_module(trainer, module, cfg, best: str):
    """After a DeepSpeed fit: the best ZeRO checkpoint consolidated on rank 0 into the run's plain best.ckpt, and a
    module holding its weights on every rank (ZeRO-3 leaves the fitted module's parameters partitioned, so it
    gets a fresh one)."""
    if not best:
        return module
    rank, _ = world()
    if rank == 0:
        consolidate(Path(best), module)
    state = broadcast_from_zero(lambda: torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
    if cfg.train.zero_stage == 3:
        module = build_module(cfg, distill=False)
        state = {k: v for k, v in state.items() if not k.startswith("distiller.")}
    module.load_state_dict(state)
    return module
