"""The in-memory form every dataset loader produces.

Interactions are parallel arrays (user, item, timestamp, original line order); items carry one text each. Ids
are kept as the original strings and mapped to dense indices `0..n-1` in first-seen order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recsys.errors import RecsysError


@dataclass
class RecDataset:
    """Implicit-feedback interactions plus one text per item.

    `users[k]`, `items[k]`, `timestamps[k]`, `order[k]` describe interaction k; `order` is its position in the
    source file(s) and breaks timestamp ties. `item_texts[i]` is the text of item index i. Every item has a
    text (the item universe); items never interacted with are allowed.
    """

    name: str
    user_ids: list[str]
    item_ids: list[str]
    item_texts: list[str]
    users: np.ndarray  # [n_interactions] int64, index into user_ids
    items: np.ndarray  # [n_interactions] int64, index into item_ids
    timestamps: np.ndarray  # [n_interactions] int64
    order: np.ndarray  # [n_interactions] int64, original line order
    info: dict = field(default_factory=dict)  # what the loader dropped and why, counts

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return int(self.users.shape[0])

    def stats(self) -> dict:
        """Users, items, interactions, density and item-text length (words), as `recsys data stats` prints."""
        words = np.array([len(t.split()) for t in self.item_texts]) if self.item_texts else np.zeros(1)
        return {
            "dataset": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "density": self.n_interactions / max(1, self.n_users * self.n_items),
            "interactions_per_user": self.n_interactions / max(1, self.n_users),
            "text_words_mean": float(words.mean()),
            "text_words_max": int(words.max()),
            **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str))},
        }


def build_dataset(
    name: str,
    rows: list[tuple[str, str, int]],
    texts: dict[str, str],
    source: str,
    info: dict | None = None,
) -> RecDataset:
    """Index raw `(user_id, item_id, timestamp)` rows (in file order) and `{item_id: text}` into a RecDataset.

    Interactions whose item has no (non-empty) text are dropped and counted in `info["dropped_no_text"]`; the
    item universe is every item with a text. `source` names the files for error messages.
    """
    info = dict(info or {})
    texts = {k: " ".join(str(v).split()) for k, v in texts.items()}
    empty = [k for k, v in texts.items() if not v]
    for k in empty:
        del texts[k]
    info["items_empty_text"] = info.get("items_empty_text", 0) + len(empty)
    item_index = {iid: i for i, iid in enumerate(texts)}
    user_index: dict[str, int] = {}
    users, items, ts = [], [], []
    dropped = 0
    for uid, iid, t in rows:
        j = item_index.get(iid)
        if j is None:
            dropped += 1
            continue
        users.append(user_index.setdefault(uid, len(user_index)))
        items.append(j)
        ts.append(t)
    info["dropped_no_text"] = info.get("dropped_no_text", 0) + dropped
    if not users:
        raise RecsysError(f"{source}: no interactions left (read {len(rows)} rows, {dropped} without item text)")
    return RecDataset(
        name=name,
        user_ids=list(user_index),
        item_ids=list(item_index),
        item_texts=list(texts.values()),
        users=np.asarray(users, dtype=np.int64),
        items=np.asarray(items, dtype=np.int64),
        timestamps=np.asarray(ts, dtype=np.int64),
        order=np.arange(len(users), dtype=np.int64),
        info=info,
    )
