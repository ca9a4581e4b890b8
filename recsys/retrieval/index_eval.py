"""Full-ranking metrics through a retrieval index, beside exact search and the index's recall against it.

An index returns candidates, not a ranking of the whole catalog. Per user: fetch k + (the user's history length)
candidates, drop the history items (the same exact mask as `recsys.retrieval.evaluate`), keep the first k. The
target's rank is its position among those k; a target the index did not return ranks after every returned item
— a miss at every cut-off K <= k (so k must be at least the metrics' largest K). Recall@10 / @100 against exact
search compare the index's (masked) top 10 / 100 with exact search's (masked) top 10 / 100 over the same users;
`ann_recall@10` is the index's own recall on those user queries (its top 10 of the whole catalog, nothing masked,
against exact's) — the number `recsys.retrieval.index_tuning` tunes to and `experiments/retrieval_scale.py`
reports at every catalog size. Every one of them is measured on the model's user vectors, the queries that arrive.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recsys.data.split import Split
from recsys.errors import RecsysError
from recsys.retrieval.evaluate import EvalResult, history_mask, ranks_for_users
from recsys.retrieval.index import ItemIndex, exact_topk, recall_at
from recsys.retrieval.metrics import KS, per_user_metrics, summarize

RECALL_KS = (10, 100)  # recall of the index against exact search at these cut-offs


@dataclass
class IndexEval:
    """One stage evaluated through an index and exactly, on the same user embeddings."""

    index: EvalResult  # metrics from the index's candidates
    exact: EvalResult  # metrics of exact full ranking
    recall_vs_exact: dict[str, float]  # "recall@10" / "recall@100" of the index against exact search (masked)
    spec: str
    ann_recall: float = float("nan")  # recall@10 of the index's own top 10 against exact's (unmasked)
    tuning: dict | None = None  # how its nprobe / efSearch was tuned to a recall target (on validation users)

    def summary(self) -> dict:
        recall = {f"{k}_vs_exact": v for k, v in self.recall_vs_exact.items()}
        return {"spec": self.spec, **self.index.metrics, **recall, "ann_recall@10": self.ann_recall,
                "queries": f"{self.index.stage} users", "tuning": self.tuning, "exact": self.exact.metrics}


def _masked_topk(ids: np.ndarray, mask: torch.Tensor, k: int) -> list[np.ndarray]:
    """Per row of ids [B, k'] (-1 = none): the first k ids that are neither -1 nor masked (mask [B, N])."""
    out = []
    for row, found in enumerate(ids):
        found = found[found >= 0]
        keep = ~mask[row, torch.from_numpy(found)].numpy()
        out.append(found[keep][:k])
    return out


def evaluate_index(user_emb: torch.Tensor, item_emb: torch.Tensor, index: ItemIndex, split: Split, stage: str,
                   batch_size: int = 256) -> IndexEval:
    """Evaluate `split.eval_users` (user_emb [U, d], their rows in that order) on `stage` through `index` over
    item_emb [N, d], and exactly; the index's recall@10 / @100 against exact search."""
    users = split.eval_users
    k = min(max(index.cfg.k, max(RECALL_KS)), split.n_items)
    if index.cfg.k < max(KS):
        raise RecsysError(f"retrieval.k: {index.cfg.k} candidates cannot rank the metrics' cut-off {max(KS)}; "
                          f"use k >= {max(KS)}")
    if len(user_emb) != len(users):
        raise ValueError(f"user_emb has {len(user_emb)} rows for {len(users)} evaluated users")
    targets = split.target(stage)
    index_ranks, exact_ranks = [], []
    hits = {r: [] for r in RECALL_KS}
    with torch.inference_mode():
        for s in range(0, len(users), batch_size):
            b = users[s:s + batch_size]
            q = user_emb[s:s + batch_size].float()  # [B, d]
            mask = history_mask(split, b, stage)  # [B, N]
            fetch = k + int(mask.sum(1).max())
            _, ids = index.search(q, fetch)  # [B, fetch]
            found = _masked_topk(ids, mask, k)
            scores = q @ item_emb.T  # [B, N]
            exact_ranks.append(ranks_for_users(scores, split, b, stage).numpy())
            exact = torch.topk(scores.masked_fill(mask, float("-inf")), k, dim=1).indices.numpy()  # [B, k]
            for row, u in enumerate(b):
                t = int(targets[u])
                where = np.flatnonzero(found[row][:index.cfg.k] == t)
                index_ranks.append(float(where[0]) if len(where) and not mask[row, t] else float("inf"))
                for r in RECALL_KS:
                    hits[r].append(len(set(found[row][:r].tolist()) & set(exact[row, :r].tolist())) / r)
    ir, er = np.asarray(index_ranks), np.concatenate(exact_ranks) if exact_ranks else np.zeros(0)
    pi, pe = per_user_metrics(ir), per_user_metrics(er)
    q = user_emb.float()
    ann = recall_at(index.search(q, 10)[1], exact_topk(q, item_emb.float(), 10).numpy(), 10) if len(q) else 0.0
    tuning = index.tuning.to_dict() if index.tuning is not None else None
    return IndexEval(EvalResult(stage, users, ir, pi, summarize(pi)), EvalResult(stage, users, er, pe, summarize(pe)),
                     {f"recall@{r}": float(np.mean(v)) if v else 0.0 for r, v in hits.items()}, index.spec, ann,
                     tuning)
