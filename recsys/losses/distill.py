"""Distillation losses for two-tower retrieval: the student learns the teacher's in-batch scores, score
margins, embeddings or hidden states.

- `ScoreKLLoss`: KL(p_teacher ‖ p_student) between the in-batch score distributions softened by a temperature T,
  scaled by T² so its gradients keep their size as T changes (Hinton, Vinyals & Dean 2015, "Distilling the
  knowledge in a neural network", arXiv:1503.02531).
- `MarginMSELoss`: MSE between teacher and student margins s(u, i⁺) − s(u, i⁻) over every in-batch negative
  (Hofstätter et al. 2020, "Improving efficient neural ranking models with cross-architecture knowledge
  distillation", arXiv:2010.02666).
- `EmbeddingMSELoss`: MSE between the student's user embeddings, through a learned linear map when the
  dimensions differ, and the teacher's (the embedding-space alignment of Reimers & Gurevych 2020,
  arXiv:2004.09813).
- `HiddenStateLoss`: MSE between student hidden states and the teacher layers a layer map assigns, through
  learned linear maps when the hidden sizes differ, over real (unpadded) tokens (TinyBERT, Jiao et al. 2020,
  arXiv:1909.10351; CoFi's layer-wise distillation, Xia et al. 2022, arXiv:2204.00408).

Scores are logits [B, B + M] (row b's positive at column b); entries flagged in `mask` (false negatives) take
part in neither distribution nor margin.

Example:
    >>> s, t = torch.randn(4, 6), torch.randn(4, 6)  # student and teacher logits: 4 users, 6 batch items
    >>> ScoreKLLoss(temperature=2.0)(s, t)            # 0 only when the two distributions agree
"""
from __future__ import annotations

import torch
from torch import nn

from recsys.config import DistillLoss, choices

KINDS = choices(DistillLoss)


def _valid(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, B + M] bool: the entries that take part (not masked; the positive always does)."""
    valid = torch.ones_like(logits, dtype=torch.bool)
    if mask is not None:
        valid = ~mask.clone()
        b = torch.arange(logits.shape[0], device=logits.device)
        valid[b, b] = True
    return valid


class ScoreKLLoss(nn.Module):
    """T² · mean over users of KL(softmax(t/T) ‖ softmax(s/T)) over the unmasked batch items."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        valid = _valid(student, mask)  # [B, B + M]
        T = self.temperature
        log_s = (student.float() / T).masked_fill(~valid, float("-inf")).log_softmax(-1)  # [B, B + M]
        log_t = (teacher.float() / T).masked_fill(~valid, float("-inf")).log_softmax(-1)  # [B, B + M]
        kl = torch.where(valid, log_t.exp() * (log_t - log_s), torch.zeros_like(log_s))  # [B, B + M]
        return kl.sum(-1).mean() * T * T


class MarginMSELoss(nn.Module):
    """Mean over (user, unmasked negative) of ((s⁺ − s⁻) − (t⁺ − t⁻))²."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b = torch.arange(student.shape[0], device=student.device)
        negative = _valid(student, mask)
        negative[b, b] = False  # [B, B + M] the negatives
        margin_s = student.float()[b, b][:, None] - student.float()  # [B, B + M]
        margin_t = teacher.float()[b, b][:, None] - teacher.float()  # [B, B + M]
        return ((margin_s - margin_t)[negative] ** 2).mean()


class EmbeddingMSELoss(nn.Module):
    """Mean squared error between W·student [B, d_s] and teacher [B, d_t] embeddings (W = identity when
    d_s = d_t, else a learned linear map), summed over dims, averaged over the batch."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return ((self.proj(student.float()) - teacher.float()) ** 2).sum(-1).mean()


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """TinyBERT's uniform map: student layer i (1-based) learns teacher layer i·n_teacher/n_student."""
    return [round((i + 1) * n_teacher / n_student) for i in range(n_student)]


class HiddenStateLoss(nn.Module):
    """Σ over mapped layers of the mean squared error between W_l·h_student [B, L, H_s] and h_teacher [B, L, H_t]
    over unpadded tokens. Index 0 is the embedding output, index l ≥ 1 layer l's output; `layer_map[i]` is the
    teacher layer student layer i + 1 learns (0 = skip that student layer)."""

    def __init__(self, layer_map: list[int], student_hidden: int, teacher_hidden: int):
        super().__init__()
        self.layer_map = list(layer_map)
        same = student_hidden == teacher_hidden
        self.proj = nn.ModuleList(nn.Identity() if same else nn.Linear(student_hidden, teacher_hidden, bias=False)
                                  for _ in self.layer_map)

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor],
                attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).float()  # [B, L, 1]
        total = torch.zeros((), device=attention_mask.device)
        for i, t_layer in enumerate(self.layer_map):
            if t_layer == 0:
                continue
            diff = self.proj[i](student[i + 1].float()) - teacher[t_layer].float()  # [B, L, H_t]
            total = total + (diff ** 2 * m).sum() / (m.sum() * diff.shape[-1])
        return total
