"""Structured pruning by importance, once, after fine-tuning (the post-hoc baseline of the λ search).

Score every attention head and FFN neuron group by the gradient of the training loss with respect to a mask on
it (Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?"; Molchanov et al. 2019):
importance = Σ over batches |∂L/∂m| at m = 1. Close the least important `ratio` of heads and of FFN groups
(ranked globally across layers; at least one of each kept), then freeze that structure for recovery
fine-tuning. In training this is `compress.prune_ratio` (applied before fitting by the train recipe, to the run
given as `model.init_from`).

The same scores start learnable gates (`compress.importance_init`, after Kwon et al. 2022, "A Fast Post-Training
Pruning Framework for Transformers", which ranks by Fisher/gradient importance): every gated kind — heads, FFN
groups, whole sublayers, output dims — is scored with a mask of its own, and each gate's log α is placed by its
unit's rank within its kind, evenly over [init − spread/2, init + spread/2]. At step 0 the gates then order the
units as post-hoc pruning would, while the penalty or budget decides how many to remove: the gradient of the
open probability σ(log α + 1.6) is largest for the lowest log α, so the least important units close first.

Prune-then-learn (`compress.prune_init`) starts the gates where post-hoc pruning ends: heads and FFN groups closed
by the same ranking, at the smallest ratio whose hard shape meets the budget target (`prune_to_cost`), with log α at
±`gate_init` instead of ±10 so that the budget's gradients can still move them: the search refines what the
importance ranking chose.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from recsys.efficiency.shape import Shape

GATE_NAMES = ("heads", "ffn", "attn_block", "ffn_block", "output")


def importance_scores(module, batches, kinds: tuple[str, ...] = ("heads", "ffn")) -> dict[str, torch.Tensor]:
    """|∂ task loss / ∂ mask| summed over `batches` for the user tower's gated `kinds` among heads
    [n_layers, n_heads], ffn [n_layers, groups], attn_block / ffn_block [n_layers], output [d]."""
    gates = module.user_tower.gates
    z = {k: torch.ones_like(getattr(gates, k).log_alpha, requires_grad=True)
         for k in kinds if getattr(gates, k) is not None}
    scores = {k: torch.zeros_like(v) for k, v in z.items()}
    was = module.training
    module.eval()  # no dropout: the scores measure the structure, not the noise
    for batch in batches:
        values = {k: (v.repeat_interleave(gates.ffn_group, dim=-1) if k == "ffn" else v) for k, v in z.items()}
        u = module.user_tower(**batch["user"], gates=values)
        i = module.item_embeddings(batch, gates=values)
        loss = module.loss(u, i, module.temperature, batch["false_negatives"], batch.get("log_q"))
        grads = torch.autograd.grad(loss, list(z.values()))
        for k, g in zip(z, grads, strict=True):
            scores[k] += g.abs()
    module.train(was)
    return scores


def keep_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the most important (1 − ratio) of units, ranked globally; at least one unit stays."""
    n_keep = max(1, round((1 - ratio) * scores.numel()))
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores.flatten(), descending=True, stable=True)[:n_keep]] = True
    return keep.view_as(scores)


def prune_by_importance(module, batches, ratio: float) -> dict[str, int]:
    """Score, close the least important `ratio` of heads and FFN groups of the (shared or user) tower's
    gates, freeze them. Returns how many units of each kind were kept."""
    scores = importance_scores(module, batches)
    masks = {k: keep_mask(v, ratio) for k, v in scores.items()}
    for tower in {id(t): t for t in (module.user_tower, module.item_tower)}.values():
        if tower.gates is not None:
            tower.gates.set_mask(masks)
            tower.gates.freeze()
    return {k: int(m.sum()) for k, m in masks.items()}


def pruned_at(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Post-hoc pruning's keep masks at `ratio`, for the head and FFN scores among `scores`."""
    return {k: keep_mask(v, ratio) for k, v in scores.items() if k in ("heads", "ffn")}


def ratio_for_cost(gates, scores: dict[str, torch.Tensor], cost: Callable[[Shape], float], target: float,
                   iterations: int = 40) -> float:
    """The smallest pruning ratio whose hard shape (`gates` with post-hoc's masks at that ratio) costs at most
    `target` by `cost` (a cost ratio to dense, non-increasing in the ratio); the largest ratio (one head and one
    FFN group kept) if none does. Bisection on a copy of the gates; the gates themselves are not changed."""
    trial = copy.deepcopy(gates)

    def shape_cost(ratio: float) -> float:
        trial.set_mask(pruned_at(scores, ratio))
        return cost(trial.hard_shape())

    lo, hi = 0.0, 1.0 - 1e-9
    if shape_cost(lo) <= target:
        return lo
    if shape_cost(hi) > target:
        return hi
    for _ in range(iterations):  # invariant: cost(lo) > target >= cost(hi)
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if shape_cost(mid) <= target else (mid, hi)
    return hi


@torch.no_grad()
def prune_to_cost(module, scores: dict[str, torch.Tensor], cost: Callable[[Shape], float], target: float,
                  value: float) -> tuple[float, dict[str, int]]:
    """Prune-then-learn: close the heads and FFN groups post-hoc pruning closes at the smallest ratio meeting
    `target` (`ratio_for_cost`), on every gated tower as `prune_by_importance` does, with log α ±`value` (the
    gates keep learning). Returns the ratio and how many units of each kind were kept."""
    ratio = ratio_for_cost(module.user_tower.gates, scores, cost, target)
    masks = pruned_at(scores, ratio)
    for tower in {id(t): t for t in (module.user_tower, module.item_tower) if t is not None}.values():
        if tower.gates is not None:
            tower.gates.set_mask(masks, value)
    return ratio, {k: int(m.sum()) for k, m in masks.items()}


def rank_log_alpha(scores: torch.Tensor, init: float, spread: float) -> torch.Tensor:
    """log α of one gate kind from its units' scores: the least important unit at init − spread/2, the most
    important at init + spread/2, evenly by rank (ties by position), so only the order carries over."""
    n = scores.numel()
    rank = torch.empty(n)
    rank[torch.argsort(scores.flatten(), stable=True)] = torch.arange(n, dtype=torch.float32)
    frac = rank / max(1, n - 1)  # 0 = least important, 1 = most
    return (init - spread / 2 + spread * frac).view_as(scores)


@torch.no_grad()
def init_gates_by_importance(module, batches, init: float, spread: float) -> dict[str, torch.Tensor]:
    """Score every gated kind of the user tower on `batches` and set its gates' log α by rank (the shared
    tower's gates are the user tower's; a separate item tower's gates keep `init`). Returns the scores."""
    gates = module.user_tower.gates
    with torch.enable_grad():
        scores = importance_scores(module, batches, GATE_NAMES)
    for kind, s in scores.items():
        getattr(gates, kind).log_alpha.copy_(rank_log_alpha(s, init, spread))
    return scores
