"""Structured pruning by importance, once, after fine-tuning (the post-hoc baseline of the λ search).

Score every attention head and FFN neuron group by the gradient of the training loss with respect to a mask on
it (Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?"; Molchanov et al. 2019):
importance = Σ over batches |∂L/∂m| at m = 1. Close the least important `ratio` of heads and of FFN groups
(ranked globally across layers; at least one of each kept), then freeze that structure for recovery
fine-tuning. In training this is `compress.prune_ratio` (applied at the start of fitting, from the run given as
`model.init_from`).
"""
from __future__ import annotations

import torch


def importance_scores(module, batches) -> dict[str, torch.Tensor]:
    """|∂ task loss / ∂ mask| summed over `batches`: heads [n_layers, n_heads], ffn [n_layers, groups]."""
    gates = module.user_tower.gates
    base = gates.base
    z = {}
    if gates.heads is not None:
        z["heads"] = torch.ones(base.n_layers, base.n_heads_dense, requires_grad=True)
    if gates.ffn is not None:
        z["ffn"] = torch.ones(base.n_layers, base.ffn_dense // gates.ffn_group, requires_grad=True)
    scores = {k: torch.zeros_like(v) for k, v in z.items()}
    was = module.training
    module.eval()  # no dropout: the scores measure the structure, not the noise
    for batch in batches:
        values = {k: (v.repeat_interleave(gates.ffn_group, dim=-1) if k == "ffn" else v) for k, v in z.items()}
        u = module.user_tower(**batch["user"], gates=values)
        i = module.item_tower(**batch["item"], gates=values)
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
