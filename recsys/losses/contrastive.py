"""In-batch softmax (InfoNCE) for two-tower retrieval, with false-negative masking.

Each user's positive is the item in the same batch row; every other item in the batch (plus optional extra
random items) is a negative, except those flagged as false negatives (the user's own history, or a copy of
the positive item), which are removed from the softmax.

With `log_q` (the log-probability that each batch item was sampled as a negative, here its share of training
targets), logits are corrected to s(u, i) - log q(i) (Yi et al. 2019, §3.2): in-batch negatives are drawn in
proportion to popularity, and without the correction the model learns to demote popular items.

References: van den Oord et al. 2018 (InfoNCE, arXiv:1807.03748); Yi et al. 2019, "Sampling-bias-corrected
neural modeling for large corpus item recommendations" (in-batch softmax for two-towers, RecSys'19).

Example:
    >>> loss = InBatchSoftmaxLoss()
    >>> u = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    >>> i = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)  # 4 positives + 2 extra negatives
    >>> loss(u, i, temperature=0.05, false_negatives=torch.zeros(4, 6, dtype=torch.bool))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InBatchSoftmaxLoss(nn.Module):
    """Cross-entropy of each user over [its positive, the other batch items, extra negatives].

    Inputs: users [B, d], items [B + M, d] (row b < B is user b's positive; rows ≥ B are extra negatives),
    a scalar temperature, false_negatives [B, B + M] bool (True = not a negative; the diagonal is ignored) and
    optional log_q [B + M] (log sampling probability of each item, subtracted from its logits).
    Output: mean loss over the batch (a scalar).
    """

    def forward(self, users: torch.Tensor, items: torch.Tensor, temperature: torch.Tensor | float,
                false_negatives: torch.Tensor | None = None, log_q: torch.Tensor | None = None) -> torch.Tensor:
        logits = users @ items.T / temperature  # [B, B + M]
        if log_q is not None:
            logits = logits - log_q[None, :]  # [B, B + M] sampling-bias correction
        b = users.shape[0]
        labels = torch.arange(b, device=users.device)  # [B]
        if false_negatives is not None:
            drop = false_negatives.clone()
            drop[labels, labels] = False  # the positive always stays
            logits = logits.masked_fill(drop, float("-inf"))
        return F.cross_entropy(logits.float(), labels)
