"""The cold-start score offset (recsys/retrieval/cold.py): chosen on validation, scale-free, applied as a shift."""
import numpy as np
import torch

from recsys.data.split import Split
from recsys.retrieval.cold import choose_cold_offset, with_cold_offset
from recsys.retrieval.evaluate import evaluate


def _cold_split(n_users=200, n_items=60, n_cold=20, cold_share=0.5, seed=0) -> Split:
    """Items 0..n_cold-1 are cold; `cold_share` of the users have cold val and test targets (two different
    items), the others warm ones; training sequences hold warm items only."""
    rng = np.random.default_rng(seed)
    cold_users = rng.random(n_users) < cold_share
    pick = [rng.choice(n_cold, 2, replace=False) if c else rng.choice(np.arange(n_cold, n_items), 2, replace=False)
            for c in cold_users]
    val, test = np.array([p[0] for p in pick]), np.array([p[1] for p in pick])
    train = [rng.choice(np.arange(n_cold, n_items), size=3, replace=False) for _ in range(n_users)]
    train = [t[(t != val[u]) & (t != test[u])] for u, t in enumerate(train)]
    return Split(n_items, train, val, test, cold=np.arange(n_cold))


def _scorer(split: Split, depress: float, scale: float, noise: float = 0.3, seed=0):
    """A scorer that knows each target (score `scale`), plus noise, with every cold item's score lowered by
    `depress` × scale: the calibration gap a tower trained on warm items only shows."""
    rng = np.random.default_rng(seed)
    S = rng.normal(0, noise, (split.n_users, split.n_items))
    S[np.arange(split.n_users), split.val] += 1.0
    S[np.arange(split.n_users), split.test] += 1.0
    S[:, split.cold] -= depress
    S = torch.tensor(S * scale, dtype=torch.float32)
    return lambda batch: S[batch]


def test_a_depressed_but_well_ordered_cold_side_gets_an_offset_that_restores_it():
    split = _cold_split()
    for scale in (1.0, 20.0):  # cosine-like and logit-like scores: the grid follows the scale
        scorer = _scorer(split, depress=2.0, scale=scale)
        beta, table = choose_cold_offset(scorer, split, "val")
        assert beta > 0 and table[0]["beta"] == 0.0
        raw = evaluate(scorer, split, "test", progress=False).metrics
        cal = evaluate(with_cold_offset(scorer, split.cold_mask(), beta), split, "test", progress=False).metrics
        assert raw["cold/ndcg@10"] < 0.05 < 0.5 < cal["cold/ndcg@10"]
        assert cal["ndcg@10"] > raw["ndcg@10"] + 0.2
        assert 1.0 * scale < beta < 3.0 * scale  # about the depression, in the scorer's own units


def test_an_uninformative_cold_side_keeps_offset_zero():
    split = _cold_split(cold_share=0.05)
    S = _scorer(split, depress=2.0, scale=1.0)
    rng = np.random.default_rng(1)
    noise = torch.tensor(rng.normal(0, 1, (split.n_users, split.n_items)), dtype=torch.float32)
    cold = torch.from_numpy(split.cold_mask())

    def scorer(batch):  # cold items in random order: lifting them only costs warm targets
        s = S(batch).clone()
        s[:, cold] = noise[batch][:, cold] - 3.0
        return s
    beta, table = choose_cold_offset(scorer, split, "val")
    assert beta == 0.0 and len(table) > 5
    assert max(r["ndcg@10"] for r in table) == table[0]["ndcg@10"]


def test_the_warm_protocol_has_no_offset():
    split = _cold_split()
    warm = Split(split.n_items, split.train, split.val, split.test)
    scorer = _scorer(split, 0.0, 1.0)
    assert choose_cold_offset(scorer, warm) == (0.0, [])
    assert with_cold_offset(scorer, warm.cold_mask(), 1.0) is scorer
