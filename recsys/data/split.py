"""Leave-last-out split (the protocol every model and baseline shares).

Per user, interactions are sorted by timestamp, ties by original line order. The last one is the test target,
the second-to-last the validation target, the rest is train. Users with fewer than 3 interactions stay entirely
in train and are not evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from recsys.data.dataset import RecDataset


@dataclass
class Split:
    """Per-user sequences (item indices, oldest first) and the held-out targets.

    `train[u]` is user u's training sequence; `val[u]` / `test[u]` its targets or -1 when u is not evaluated.
    """

    n_items: int
    train: list[np.ndarray]
    val: np.ndarray  # [n_users] int64, -1 = not evaluated
    test: np.ndarray  # [n_users] int64, -1 = not evaluated
    # cold start (`hold_out_items`): sorted indices of items held out of training entirely (empty: the warm protocol)
    cold: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def protocol(self) -> str:
        """The protocol results name: leave-last-out, warm, or with held-out cold-start items."""
        return f"leave-last-out, cold-start ({len(self.cold)} items held out)" if len(self.cold) else \
            "leave-last-out, warm"

    def cold_mask(self) -> np.ndarray:
        """[n_items] bool: the item is cold (never in any training sequence)."""
        out = np.zeros(self.n_items, dtype=bool)
        out[self.cold] = True
        return out

    @property
    def n_users(self) -> int:
        return len(self.train)

    @property
    def eval_users(self) -> np.ndarray:
        return np.flatnonzero(self.test >= 0)

    def history(self, user: int, stage: str) -> np.ndarray:
        """Items a model may read for `stage`: train for "val"; train + validation item for "test"."""
        if stage == "val":
            return self.train[user]
        if stage == "test":
            return np.append(self.train[user], self.val[user])
        raise ValueError(f"stage must be 'val' or 'test', got {stage!r}")

    def target(self, stage: str) -> np.ndarray:
        return self.val if stage == "val" else self.test

    def matrix(self, stage: str = "val") -> sp.csr_matrix:
        """Binary user×item matrix of what models read at `stage`: train items for "val" (the fit matrix), train
        + validation item for "test" (fold-in, no refit) — for users evaluated at that stage."""
        rows, cols = [], []
        for u in range(self.n_users):
            items = self.history(u, stage) if self.test[u] >= 0 else self.train[u]
            rows.append(np.full(len(items), u))
            cols.append(items)
        r, c = np.concatenate(rows), np.concatenate(cols)
        m = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(self.n_users, self.n_items))
        m.data[:] = 1.0  # repeated interactions count once
        return m


def leave_last_out(ds: RecDataset) -> Split:
    """Split `ds` by the protocol above; deterministic, no randomness."""
    idx = np.lexsort((ds.order, ds.timestamps, ds.users))  # by user, then time, then file order
    users, items = ds.users[idx], ds.items[idx]
    bounds = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(users)]])
    train: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * ds.n_users
    val = np.full(ds.n_users, -1, dtype=np.int64)
    test = np.full(ds.n_users, -1, dtype=np.int64)
    for s, e in zip(starts, ends, strict=True):
        u, seq = users[s], items[s:e]
        if len(seq) >= 3:
            train[u], val[u], test[u] = seq[:-2], seq[-2], seq[-1]
        else:
            train[u] = seq
    return Split(n_items=ds.n_items, train=train, val=val, test=test)


def hold_out_items(split: Split, share: float, seed: int = 0) -> Split:
    """The cold-start protocol: `share` of the catalog's items, drawn with `seed`, removed from every training
    sequence (so no model trains on them: not as a target, not in a history), kept as validation/test targets and
    in the histories a model reads at evaluation (an item seen only at inference time). Leave-last-out is applied
    first, so the evaluated targets are the warm protocol's: results on warm and cold targets are comparable."""
    if share <= 0:
        return split
    n = int(round(share * split.n_items))
    cold = np.sort(np.random.default_rng(seed).permutation(split.n_items)[:n]).astype(np.int64)
    is_cold = np.zeros(split.n_items, dtype=bool)
    is_cold[cold] = True
    train = [s[~is_cold[s]] if len(s) else s for s in split.train]
    return replace(split, train=train, cold=cold)
