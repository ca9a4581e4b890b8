"""Serving routes of a tower at batch 1 and the online request (user tower + exact retrieval) they make up.

`served_user_call` serves a tower by route (`recsys.serving.quantize.ROUTES`: fp32 eager or compiled, bf16,
int8 through torchao or ONNX Runtime); `request_calls` pairs it with exact top-k retrieval over the catalog; the
timing harness (`recsys.efficiency.latency`) measures them.
"""
from __future__ import annotations

from typing import Callable

import torch

from recsys.efficiency.latency import exclusive, measure, retrieval_call, threads, tower_inputs, user_tower_call
from recsys.errors import RecsysError
from recsys.models.sequence_tower import SequenceTower, lookup
from recsys.serving.quantize import serve


def served_user_call(tower: torch.nn.Module, seq_len: int, route: str = "fp32",
                     layers=("attention", "ffn")) -> Callable[[], torch.Tensor]:
    """The user tower at batch 1 served by `route` (`recsys.serving.quantize.ROUTES`; fp32 = eager; int8
    routes quantize the Linear `layers`)."""
    if route == "fp32":
        return user_tower_call(tower, seq_len)
    inputs = tower_inputs(1, seq_len)
    served = serve(tower, route, inputs, layers)
    return lambda: served(inputs)


def sequence_user_call(tower: SequenceTower, n_history: int, n_items: int,
                       seed: int = 0) -> Callable[[], torch.Tensor]:
    """A sequence user tower at batch 1: `n_history` item representations gathered from a cached catalog
    [n_items, d_item] (unit vectors; the adaptor and ID embeddings applied offline, when the catalog is cached),
    then the small transformer over them."""
    g = torch.Generator().manual_seed(seed)
    table = torch.nn.functional.normalize(torch.randn(n_items, tower.item_dim, generator=g), dim=-1)
    ids = torch.randint(0, n_items, (1, n_history), generator=g)  # [1, N]
    tower.eval()
    with torch.no_grad():  # offline: the catalog's representations (row i: item i; ID rows reused past the catalog)
        n_ids = tower.item_ids.num_embeddings if tower.item_ids is not None else 1
        keys = tower.represent(table, torch.arange(n_items) % n_ids)
    return lambda: tower.encode(*lookup(ids, keys))


def user_call(tower: torch.nn.Module, seq_len: int, n_items: int, route: str = "fp32",
              layers=("attention", "ffn")) -> Callable[[], torch.Tensor]:
    """The user tower of one request at batch 1, either family: a text tower over `seq_len` tokens served by
    `route`; a sequence tower over `seq_len` history items looked up in a cached catalog of `n_items`."""
    if isinstance(tower, SequenceTower):
        if route != "fp32":
            raise RecsysError(f"a sequence user tower is served in fp32 (eager), not by route {route!r}")
        return sequence_user_call(tower, seq_len, n_items)
    return served_user_call(tower, seq_len, route, layers)


def request_calls(tower: torch.nn.Module, seq_len: int, n_items: int, route: str = "fp32",
                  layers=("attention", "ffn")) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """(user tower at batch 1 served by `route`, exact retrieval over `n_items`) of one request. A sequence user
    tower reads `seq_len` history items: their vectors looked up in the cached catalog, then its transformer."""
    user = user_call(tower, seq_len, n_items, route, layers)
    return user, retrieval_call(n_items, int(user().shape[-1]))


def online_latency(tower: torch.nn.Module, seq_len: int, n_items: int, n_threads: int | None = None,
                   min_seconds: float = 1.0, route: str = "fp32") -> dict:
    """A request: user tower at batch 1 + exact retrieval over `n_items`, measured together and apart."""
    user, search = request_calls(tower, seq_len, n_items, route)
    with threads(n_threads), exclusive():
        parts = {"user_tower": measure(user, min_seconds=min_seconds),
                 "retrieval": measure(search, min_seconds=min_seconds / 2),
                 "online": measure(lambda: (user(), search()), min_seconds=min_seconds)}
    return {k: v.as_dict() for k, v in parts.items()}
