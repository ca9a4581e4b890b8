"""Rank-based metrics of one held-out item per user, and paired comparison of two runs.

From the 0-based rank r of the held-out item among all items: Recall@K = [r < K], NDCG@K = 1/log2(r + 2) if
r < K, MRR@K = 1/(r + 1) if r < K. A masked target has rank inf (a miss). Per-user values are kept so two runs
can be compared with paired tests and bootstrap confidence intervals.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import stats

KS = (10, 20)
METRIC_COLUMNS = ["ndcg@10", "recall@10", "mrr@10", "ndcg@20", "recall@20"]  # the columns of results tables


def rank_of_targets(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items; masked items never outrank it, a masked target is a miss.

    scores [B, N] float, targets [B] int64, mask [B, N] bool (True = excluded) -> ranks [B] float (inf = miss).
    Ties are broken by ascending item index: an item with the same score ranks ahead iff its index is smaller.
    """
    scores = scores.float().masked_fill(mask, float("-inf"))  # [B, N]
    t = scores.gather(1, targets[:, None])  # [B, 1]
    index = torch.arange(scores.shape[1], device=scores.device)  # [N]
    ahead = (scores > t) | ((scores == t) & (index[None, :] < targets[:, None]))  # [B, N]
    ranks = ahead.sum(1).float()  # [B]
    return ranks.masked_fill(mask.gather(1, targets[:, None]).squeeze(1), float("inf"))


def per_user_metrics(ranks: np.ndarray, ks=KS) -> dict[str, np.ndarray]:
    """{metric@K: per-user values} from 0-based ranks (inf = miss)."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        hit = r < k
        out[f"recall@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(np.where(hit, r, 0) + 2), 0.0)
        out[f"mrr@{k}"] = np.where(hit, 1.0 / (np.where(hit, r, 0) + 1), 0.0)
    return out


def summarize(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(v)) if len(v) else 0.0 for k, v in per_user.items()}


def compare(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Paired comparison of per-user values of two runs on the same users (b - a).

    Returns the mean difference, its bootstrap (1 - alpha) confidence interval, the paired t-test and the
    Wilcoxon signed-rank p-values.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same users: {a.shape} vs {b.shape}")
    d = b - a
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    nonzero = d[d != 0]
    return {
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "diff": float(d.mean()),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p_ttest": float(stats.ttest_rel(b, a).pvalue) if d.std() > 0 else 1.0,
        "p_wilcoxon": float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) > 0 else 1.0,
    }
