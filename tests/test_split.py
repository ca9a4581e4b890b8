"""Leave-last-out split and the evaluation masks, on hand-made interactions."""
import numpy as np
import torch

from recsys.data.dataset import build_dataset
from recsys.data.split import leave_last_out
from recsys.data.text import user_text
from recsys.retrieval.evaluate import evaluate, history_mask


def _dataset():
    rows = [  # (user, item, timestamp) in file order
        ("u1", "a", 5), ("u1", "b", 1), ("u1", "c", 3), ("u1", "d", 3), ("u1", "e", 9),
        ("u2", "a", 1), ("u2", "b", 2),  # only 2 interactions: train only, not evaluated
        ("u3", "c", 1), ("u3", "c", 2), ("u3", "a", 3),
    ]
    texts = {k: f"text {k}" for k in "abcdef"}  # f: never interacted with, still in the item universe
    return build_dataset("toy", rows, texts, "toy")


def test_leave_last_out_orders_by_time_then_file_order():
    ds = _dataset()
    split = leave_last_out(ds)
    ix = {k: i for i, k in enumerate(ds.item_ids)}
    u1, u2, u3 = (ds.user_ids.index(u) for u in ("u1", "u2", "u3"))
    # u1 by time: b(1) c(3) d(3, later in file) a(5) e(9)
    assert split.train[u1].tolist() == [ix["b"], ix["c"], ix["d"]]
    assert split.val[u1] == ix["a"] and split.test[u1] == ix["e"]
    assert split.train[u2].tolist() == [ix["a"], ix["b"]] and split.test[u2] == -1
    assert split.val[u3] == ix["c"] and split.test[u3] == ix["a"]
    assert sorted(split.eval_users.tolist()) == sorted([u1, u3])
    assert split.n_items == 6
    assert split.history(u1, "test").tolist() == [ix["b"], ix["c"], ix["d"], ix["a"]]


def test_masks_and_fold_in_matrix():
    ds = _dataset()
    split = leave_last_out(ds)
    u3 = ds.user_ids.index("u3")
    ix = {k: i for i, k in enumerate(ds.item_ids)}
    m_val = history_mask(split, np.array([u3]), "val")[0]
    assert m_val.nonzero().flatten().tolist() == [ix["c"]]  # train = [c]: the validation target c is masked
    # u3's validation target c is in its own training history: it stays masked and counts as a miss
    res = evaluate(lambda users: torch.ones(len(users), split.n_items), split, "val", progress=False)
    assert np.isinf(res.ranks[list(res.users).index(u3)])
    x_val, x_test = split.matrix("val"), split.matrix("test")
    u1 = ds.user_ids.index("u1")
    assert x_val[u1].sum() == 3 and x_test[u1].sum() == 4  # validation item folded in at test
    assert x_test[ds.user_ids.index("u2")].sum() == 2  # non-evaluated user keeps its train row


def test_user_text_most_recent_first_and_capped():
    texts = ["zero", "one", "two", "three"]
    assert user_text(texts, [0, 1, 2, 3], 2) == "three | two"
    assert user_text(texts, [], 10) == ""
