"""Cross-entropy over the whole catalog at every position of a sequence: SASRec's loss, done right.

Klenitskiy & Vasilev 2023, "Turning Dross Into Gold Loss: is BERT4Rec really better than SASRec?" (RecSys): a
causal sequence model whose every position t scores the whole catalog for item t+1 and is trained with softmax
cross-entropy (instead of one sampled negative) beats BERT4Rec. With a frozen item tower the catalog's
(adapted) embeddings are one [n_items, d] matrix per step, so the full softmax is cheap for a sequence tower
over PLM item vectors too (recsys/models/sequence_tower.py).

Inputs: `h` [B, N, d] the tower's unit vectors at every position, `keys` [n_items, d] the catalog's unit vectors,
`targets` [B, N] the next item's index at each position (-1 where there is none), `temperature`, and optionally
`excluded` [n_items] bool: items no training step may see (cold-start items: never a negative either).

Example:
    >>> loss = CatalogSoftmaxLoss()
    >>> h, keys = F.normalize(torch.randn(2, 3, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    >>> loss(h, keys, torch.tensor([[1, 2, -1], [0, 4, 3]]), torch.tensor(0.1))  # a scalar
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CatalogSoftmaxLoss(nn.Module):
    """Mean over the real positions of −log softmax(h·keys / τ)[target]."""

    def forward(self, h: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor,
                excluded: torch.Tensor | None = None) -> torch.Tensor:
        real = targets >= 0  # [B, N]
        logits = h[real] @ keys.T / temperature  # [P, n_items]
        if excluded is not None:
            logits = logits.masked_fill(excluded[None, :], float("-inf"))
        return F.cross_entropy(logits.float(), targets[real])
