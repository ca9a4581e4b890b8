"""Cross-rank in-batch negatives: every rank's users score every rank's items.

Under data parallelism (DDP, DeepSpeed) each process sees only its own batch of B_r (user, positive item) pairs,
so without gathering more processes bring no more negatives. Here each rank's item embeddings are all-gathered
*with gradient* (the backward pass returns to every rank the gradient that all ranks' losses put on its items),
so with R ranks each user is scored against all Σ_r (B_r + M_r) items of the global batch, as one process
would on the concatenated batch.

Columns are arranged local-first: this rank's own items (in their batch order), then every other rank's in rank
order. Row b's positive therefore stays at column b, and the in-batch losses (`InBatchSoftmaxLoss`,
`ScoreKLLoss`, `MarginMSELoss`) run unchanged on the gathered columns; the softmax does not depend on the order
of its columns. The sampling-bias correction (log q) and the false-negative mask are rebuilt for the gathered
columns: item j is not a negative for user b when it is one of b's training items or a copy of b's positive
(the rule `RecDataModule.collate_train` applies within a batch).

The scale: DDP and DeepSpeed *average* gradients over ranks. A rank's mean over its own users, averaged over R
ranks, is the mean over all users only when batches are equal; `GatheredItems.share` = R·B_r / Σ B_s is the
factor that makes (1/R) Σ_r share_r · mean_r(loss) = the single-process mean over the concatenated batch for any
B_r (the last batch of an epoch is smaller on some ranks). Loss and averaged gradients then equal the
single-process loss and gradients on the concatenated batch (tests/test_distributed.py, 1e-5).

References: Yi et al. 2019 (in-batch softmax, log q correction; RecSys'19); the cross-device negatives of CLIP
(Radford et al. 2021, arXiv:2103.00020) and its all-gather with gradient (open_clip's `gather_features`).

Example (inside an initialised process group of R ranks):
    >>> g = gather_items(items, item_ids, log_q)   # items [B_r + M_r, d] -> g.items [N, d], N = Σ_r (B_r + M_r)
    >>> mask = false_negatives(history, item_ids[:B_r], g.ids)   # [B_r, N]
    >>> loss = g.share * InBatchSoftmaxLoss()(users, g.items, 0.05, mask, g.log_q)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from recsys.retrieval.distributed import world

__all__ = ["GatheredItems", "all_gather_with_grad", "false_negatives", "gather_items", "local_first", "world"]


def _all_gather_padded(x: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Every rank's `x` ([n_r, ...], n_r may differ between ranks), in rank order, and the n_r."""
    _, n = world()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    most = max(sizes)
    padded = x if x.shape[0] == most else torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])])
    out = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(out, padded.contiguous())
    return [t[:s] for t, s in zip(out, sizes, strict=True)], sizes


class _AllGather(torch.autograd.Function):
    """[n_r, ...] on each rank -> [Σ n_r, ...] (rank order) on every rank; backward: the gradient all ranks put on
    this rank's rows (summed by all-reduce, then sliced). Works on gloo, which has no reduce-scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts, sizes = _all_gather_padded(x)
        rank, _ = world()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start:ctx.stop]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n_r, ...] -> [Σ_r n_r, ...] in rank order, differentiable (gradients flow back to the owning rank)."""
    return _AllGather.apply(x) if world()[1] > 1 else x


def local_first(n_local: int, sizes: list[int], rank: int) -> torch.Tensor:
    """Column order [N] that puts this rank's rows (at offset Σ sizes[:rank]) first, the others after, in order."""
    start = sum(sizes[:rank])
    order = list(range(start, start + n_local))
    return torch.tensor(order + [j for j in range(sum(sizes)) if not start <= j < start + n_local])


@dataclass
class GatheredItems:
    """A batch's items as every rank sees them together, local rows first."""

    items: torch.Tensor  # [N, d] embeddings, differentiable; rows [0, B_r + M_r) are this rank's own
    ids: torch.Tensor  # [N] catalog ids
    log_q: torch.Tensor | None  # [N] log sampling probability (None without the correction)
    share: float  # R·B_r / Σ_s B_s: weight of this rank's per-user mean (see the module docstring)


def gather_items(items: torch.Tensor, ids: torch.Tensor, log_q: torch.Tensor | None, n_users: int) -> GatheredItems:
    """All ranks' items [B_r + M_r, d] (and ids, log q) gathered local-first; `n_users` = B_r, this rank's users."""
    rank, n = world()
    gathered = all_gather_with_grad(items)  # [N, d] rank order
    id_parts, sizes = _all_gather_padded(ids)
    order = local_first(items.shape[0], sizes, rank).to(items.device)  # [N]
    users = torch.tensor([n_users], device=items.device)
    counts = [torch.zeros_like(users) for _ in range(n)]
    dist.all_gather(counts, users)
    share = n * n_users / max(1, int(sum(int(c) for c in counts)))
    q = None
    if log_q is not None:
        q = torch.cat(_all_gather_padded(log_q)[0])[order]
    return GatheredItems(gathered[order], torch.cat(id_parts)[order], q, share)


def false_negatives(history: torch.Tensor, positives: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, N] bool: item ids[j] is one of user b's training items or a copy of b's positive (not a negative).

    history [B, H] each user's training item ids (any order, padded with -1); positives [B]; ids [N]."""
    hist = history.sort(dim=1).values  # [B, H] (padding -1 first)
    cand = ids[None, :].expand(hist.shape[0], -1).contiguous()  # [B, N]
    pos = torch.searchsorted(hist, cand).clamp(max=max(hist.shape[1] - 1, 0))  # [B, N]
    seen = (hist.gather(1, pos) == cand) if hist.shape[1] else torch.zeros_like(cand, dtype=torch.bool)
    return seen | (cand == positives[:, None])
