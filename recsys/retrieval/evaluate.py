"""Full-ranking evaluation over the whole catalog — the one code path every model and baseline goes through.

A scorer maps a batch of user indices to scores over all items. Validation masks the user's training items;
test masks training items plus the validation item; the held-out target's rank gives the metrics.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from recsys.data.split import Split
from recsys.retrieval.metrics import per_user_metrics, rank_of_targets, summarize

Scorer = Callable[[np.ndarray], torch.Tensor]  # user indices [B] -> scores [B, n_items]


@dataclass
class EvalResult:
    stage: str
    users: np.ndarray  # [U] evaluated user indices
    ranks: np.ndarray  # [U] 0-based rank of the target (inf = miss)
    per_user: dict[str, np.ndarray]  # metric -> [U]
    metrics: dict[str, float]  # metric -> mean over users
    user_ids: list[str] | None = None  # original ids of all users (index -> id), when known
    cold_offset: dict | None = None  # cold start: the offset of never-trained items' scores (recsys/retrieval/cold.py)

    def write_per_user(self, path: Path, user_ids: list[str] | None = None) -> None:
        names = list(self.per_user)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user", "rank", *names])
            for k, u in enumerate(self.users):
                w.writerow([user_ids[u] if user_ids else u, self.ranks[k], *(self.per_user[n][k] for n in names)])


def embedding_scorer(user_emb: torch.Tensor, users: np.ndarray, n_users: int, item_emb: torch.Tensor) -> Scorer:
    """Dot-product scorer over precomputed embeddings: user_emb [U, d] of `users`, item_emb [N, d]."""
    row = np.full(n_users, -1)
    row[users] = np.arange(len(users))
    return lambda batch: user_emb[row[batch]] @ item_emb.T  # [B, N]


def history_mask(split: Split, users: np.ndarray, stage: str) -> torch.Tensor:
    """[B, n_items] bool: items each user has seen before `stage`'s target (train; + validation item at test)."""
    mask = torch.zeros(len(users), split.n_items, dtype=torch.bool)
    for row, u in enumerate(users):
        mask[row, torch.from_numpy(split.history(int(u), stage))] = True
    return mask


def ranks_for_users(scores: torch.Tensor, split: Split, users: np.ndarray, stage: str) -> torch.Tensor:
    """Ranks [B] of `stage`'s targets for `users` given their scores [B, n_items]."""
    targets = torch.from_numpy(split.target(stage)[users])
    return rank_of_targets(scores, targets.to(scores.device), history_mask(split, users, stage).to(scores.device))


def evaluate(scorer: Scorer, split: Split, stage: str, batch_size: int = 256, desc: str | None = None,
             progress: bool = True) -> EvalResult:
    """Rank every evaluated user's `stage` target among all items with `scorer`, in user batches."""
    users = split.eval_users
    ranks = []
    batches = range(0, len(users), batch_size)
    for s in tqdm(batches, desc=desc or f"rank {stage}", disable=not progress, leave=False):
        b = users[s:s + batch_size]
        with torch.inference_mode():
            ranks.append(ranks_for_users(scorer(b), split, b, stage).cpu())
    r = torch.cat(ranks).numpy() if ranks else np.zeros(0)
    per_user = per_user_metrics(r)
    return EvalResult(stage, users, r, per_user, {**summarize(per_user), **warm_cold(split, users, stage, per_user)})


def warm_cold(split: Split, users: np.ndarray, stage: str, per_user: dict[str, np.ndarray]) -> dict[str, float]:
    """Under the cold-start protocol (`split.cold`), the metrics of users whose `stage` target is a warm item and
    of those whose target is cold, apart ("warm/ndcg@10", "cold/ndcg@10", …, and their user counts); {} warm."""
    if not len(split.cold):
        return {}
    cold = split.cold_mask()[split.target(stage)[users]]  # [U] the target is cold
    out = {}
    for part, rows in (("warm", ~cold), ("cold", cold)):
        out.update({f"{part}/{k}": float(v[rows].mean()) if rows.any() else 0.0 for k, v in per_user.items()})
        out[f"{part}/users"] = int(rows.sum())
    return out
