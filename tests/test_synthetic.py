"""The embedded default dataset: deterministic, and its text genuinely predicts preference."""
import numpy as np

from recsys.config import DataConfig
from recsys.data.split import leave_last_out
from recsys.data.synthetic import generate
from recsys.recipes.baselines import run_zero_shot
from recsys.retrieval.baselines import run_popularity


def test_deterministic_from_seed_and_different_across_seeds():
    a, b, c = (generate(seed=s, n_users=80, n_items=120) for s in (3, 3, 4))
    assert a.item_texts == b.item_texts and np.array_equal(a.items, b.items) and np.array_equal(a.users, b.users)
    assert a.item_texts != c.item_texts
    assert a.n_items == 120 and a.n_users == 80
    assert all(t.strip() for t in a.item_texts)


def test_small_sizes_work():
    ds = generate(seed=0, n_users=20, n_items=30)
    assert ds.n_interactions > 0


def test_text_model_beats_popularity():
    """The untrained MiniLM reading the user's recent item texts beats popularity on synthetic."""
    ds = generate(seed=0, n_users=400, n_items=800)
    split = leave_last_out(ds)
    cfg = DataConfig(user_max_tokens=64, item_max_tokens=32)
    pop, _ = run_popularity(split, progress=False)
    zero, _ = run_zero_shot(ds, split, cfg, "minilm", progress=False)
    assert zero.metrics["ndcg@10"] > 1.5 * pop.metrics["ndcg@10"], (zero.metrics, pop.metrics)
    assert zero.metrics["recall@20"] > pop.metrics["recall@20"]
