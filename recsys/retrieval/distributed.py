"""Full-ranking evaluation sharded over the ranks of a process group (DDP, DeepSpeed), gathered on every rank.

The evaluated users are cut into contiguous shards, one per rank (`shard`); each rank ranks its users' targets
among all items and the per-user ranks are gathered in rank order, so every rank ends with the same `EvalResult`
— users in `split.eval_users` order, ranks identical to one process's, hence exactly the same metrics
(tests/test_distributed.py). Outside a process group (or with one rank) it is `recsys.retrieval.evaluate.evaluate`.
The gathers go through `torch.distributed`'s object collectives, which work on gloo (CPU) and NCCL alike.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from recsys.data.split import Split
from recsys.errors import RecsysError
from recsys.retrieval.evaluate import EvalResult, Scorer, ranks_for_users
from recsys.retrieval.metrics import per_user_metrics, summarize


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world_size: int, what: str = "evaluated users") -> slice:
    """Rank `rank`'s contiguous share of n rows (sizes differ by at most one); more ranks than rows is an error."""
    if world_size > n:
        raise RecsysError(f"{world_size} processes but only {n} {what}: use at most {n} processes "
                          f"(train.devices) or evaluate on more users")
    bounds = np.linspace(0, n, world_size + 1).round().astype(int)
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


def gather_rows(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Every rank's rows concatenated in rank order (tensors come back on the device they left, via the CPU)."""
    rank, n = world()
    if n == 1:
        return x
    device = x.device if isinstance(x, torch.Tensor) else None
    parts: list = [None] * n
    dist.all_gather_object(parts, x.cpu() if device is not None else x)
    return torch.cat(parts).to(device) if device is not None else np.concatenate(parts)


def evaluate_sharded(scorer: Scorer, split: Split, stage: str, batch_size: int = 256) -> EvalResult:
    """`evaluate` with this rank's shard of `split.eval_users` (`scorer` needs to score only those), gathered."""
    users = split.eval_users
    rank, n = world()
    mine = users[shard(len(users), rank, n)]
    ranks = []
    for s in range(0, len(mine), batch_size):
        b = mine[s:s + batch_size]
        with torch.inference_mode():
            ranks.append(ranks_for_users(scorer(b), split, b, stage).cpu())
    r = gather_rows(torch.cat(ranks).numpy() if ranks else np.zeros(0))
    per_user = per_user_metrics(r)
    return EvalResult(stage, users, r, per_user, summarize(per_user))


def broadcast_from_zero(make: Callable[[], object]) -> object:
    """`make()` run on rank 0 alone and its result handed to every rank (e.g. a checkpoint only rank 0 may read)."""
    rank, n = world()
    if n == 1:
        return make()
    box = [make() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
