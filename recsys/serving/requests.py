"""The request `recsys serve` answers, validated against the catalog before it reaches a model.

    POST /predict  {"user": "196", "history": ["242", "302"], "k": 10}

`user` names a known user; `history` (optional) is the user's recent items, oldest first — without it the server
uses the user's known history (train + validation items: what the test split's request reads); `k` (optional,
default 10 or the catalog size if smaller) is how many items to return, 1 ≤ k ≤ catalog size. Ids are strings
(JSON numbers are read as their decimal string). Items in the history are never recommended (as in offline
evaluation). A request that is not this gets a 4xx whose body is one line (`{"detail": "..."}`); nothing
invalid is queued for the model, so one bad request cannot fail a batch of good ones.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

FIELDS = ("user", "history", "k")
DEFAULT_K = 10


class RequestError(Exception):
    """A request the server refuses: an HTTP status and one line saying what is wrong and where."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Catalog:
    """What requests are checked against: item and user ids (index = position) and each user's known history
    (item indices, oldest first)."""

    item_ids: list[str]
    user_ids: list[str]
    histories: list[np.ndarray]
    item_index: dict[str, int] = field(init=False, repr=False)
    user_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.item_index = {str(x): i for i, x in enumerate(self.item_ids)}
        self.user_index = {str(x): i for i, x in enumerate(self.user_ids)}

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def _id(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError(422, f"{where}: expected an id (string or integer), got {type(value).__name__}")
    return str(value)


def parse_request(body: bytes, catalog: Catalog) -> dict:
    """The validated request as the model worker reads it: {"user": index, "user_id": id, "history": [item
    indices], "k": k}. Raises RequestError (400 malformed JSON, 422 a field that is wrong)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "malformed request: the body is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"malformed request: expected a JSON object {{\"user\": ..., \"history\": [...], "
                                f"\"k\": ...}}, got {type(data).__name__}")
    extra = sorted(set(data) - set(FIELDS))
    if extra:
        raise RequestError(422, f"unknown field {extra[0]!r} (a request has {', '.join(FIELDS)})")
    if "user" not in data:
        raise RequestError(422, "user: missing (the id of a known user)")
    user_id = _id(data["user"], "user")
    user = catalog.user_index.get(user_id)
    if user is None:
        raise RequestError(422, f"user: unknown user id {user_id!r}")
    k = data.get("k", min(DEFAULT_K, catalog.n_items))
    if isinstance(k, bool) or not isinstance(k, int):
        raise RequestError(422, f"k: expected an integer, got {type(k).__name__}")
    if not 1 <= k <= catalog.n_items:
        raise RequestError(422, f"k: {k} is out of range (1 ≤ k ≤ {catalog.n_items}, the catalog size)")
    if "history" in data:
        raw = data["history"]
        if not isinstance(raw, list):
            raise RequestError(422, f"history: expected a list of item ids, got {type(raw).__name__}")
        if not raw:
            raise RequestError(422, "history: empty (give at least one item id, or leave history out to use the "
                                    "user's known history)")
        history = []
        for i, value in enumerate(raw):
            item = catalog.item_index.get(_id(value, f"history[{i}]"))
            if item is None:
                raise RequestError(422, f"history[{i}]: unknown item id {str(value)!r}")
            history.append(item)
    else:
        history = [int(i) for i in catalog.histories[user]]
    return {"user": user, "user_id": user_id, "history": history, "k": k}
