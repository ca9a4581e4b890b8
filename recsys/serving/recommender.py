"""One trained run as `recsys serve` answers with it: a batch of users' histories → their user embeddings (the
materialized user tower, served by its route) → a search of the run's catalog (exact or a faiss index) with
each user's history left out → top-k item indices and scores.

The same computation as offline evaluation (`recsys.retrieval.evaluate`: the user text of the last
`data.history_items` items cut at `data.user_max_tokens`, or a sequence tower over its last N item vectors; the
history masked), so a served answer equals the evaluation's top-k for that user. The fp32 route runs a batch in
one forward (padded to its longest text); compiled and ONNX Runtime routes are specialised to one input shape,
so each request runs at batch 1 padded to `data.user_max_tokens` — the shape its online latency is measured at.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from recsys.data.text import user_text
from recsys.efficiency.latency import tower_inputs
from recsys.errors import RecsysError
from recsys.models.sequence_tower import SequenceTower, lookup, recent_items
from recsys.models.tower import tokenize
from recsys.retrieval.index import ItemIndex
from recsys.serving.quantize import serve


@dataclass
class TextInput:
    """How a text user tower reads a history: the catalog's item texts, the last `history_items` of them,
    cut at `max_tokens` tokens."""

    tokenizer: object
    item_texts: list[str]
    history_items: int
    max_tokens: int


class Recommender:
    """`recommend(histories, ks)` → per user (item indices [≤ k], scores [≤ k]) of one run, as served."""

    def __init__(self, name: str, tower: torch.nn.Module, index: ItemIndex, route: str = "fp32",
                 layers: Sequence[str] = ("attention", "ffn"), text: TextInput | None = None,
                 keys: torch.Tensor | None = None):
        self.name, self.index, self.route = name, index, route
        self.tower = tower.eval()
        self.text, self.keys = text, keys  # keys [N, d_item]: what a sequence tower looks its history up in
        if isinstance(tower, SequenceTower):
            if route != "fp32":
                raise RecsysError(f"{name}: a sequence user tower is served in fp32 (eager), not by route {route!r}")
            if keys is None:
                raise RecsysError(f"{name}: a sequence user tower needs the catalog's item representations")
            self._embed = self._sequence
        elif text is None:
            raise RecsysError(f"{name}: a text user tower needs its tokenizer and the catalog's item texts")
        elif route == "fp32":
            self._embed = self._text_batch
        else:  # compiled / ONNX Runtime: built (and warmed) for one shape, [1, max_tokens]
            self._served: Callable = serve(tower, route, tower_inputs(1, text.max_tokens), tuple(layers))
            self._embed = self._text_rows

    @torch.inference_mode()
    def _sequence(self, histories: list[np.ndarray]) -> torch.Tensor:
        ids = recent_items(histories, self.tower.n_items)  # [B, N] (-1 = padding)
        return self.tower.encode(*lookup(ids, self.keys))  # [B, d]

    def _texts(self, histories: list[np.ndarray]) -> list[str]:
        t = self.text
        return [user_text(t.item_texts, h, t.history_items) for h in histories]

    @torch.inference_mode()
    def _text_batch(self, histories: list[np.ndarray]) -> torch.Tensor:
        return self.tower(**tokenize(self.text.tokenizer, self._texts(histories), self.text.max_tokens))  # [B, d]

    @torch.inference_mode()
    def _text_rows(self, histories: list[np.ndarray]) -> torch.Tensor:
        L, rows = self.text.max_tokens, []
        pad = self.text.tokenizer.pad_token_id or 0
        for text in self._texts(histories):
            enc = tokenize(self.text.tokenizer, [text], L)  # [1, l], l <= L
            ids = torch.full((1, L), pad, dtype=enc["input_ids"].dtype)
            mask = torch.zeros((1, L), dtype=enc["attention_mask"].dtype)
            n = enc["input_ids"].shape[1]
            ids[:, :n], mask[:, :n] = enc["input_ids"], enc["attention_mask"]
            out = self._served({"input_ids": ids, "attention_mask": mask})
            rows.append(torch.as_tensor(out[0] if isinstance(out, (tuple, list)) else out).float().reshape(1, -1))
        return torch.cat(rows)  # [B, d]

    def embed(self, histories: list[np.ndarray]) -> torch.Tensor:
        """[B, d] user embeddings of `histories` (item indices, oldest first)."""
        return self._embed([np.asarray(h, dtype=np.int64) for h in histories]).float()

    def recommend(self, histories: list[np.ndarray], ks: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per user: the top-k item indices (history items left out) and their scores, best first."""
        queries = self.embed(histories)  # [B, d]
        seen = [set(np.asarray(h).tolist()) for h in histories]
        fetch = min(self.index.n_items, max(k + len(s) for k, s in zip(ks, seen, strict=True)))
        scores, ids = self.index.search(queries, fetch)  # [B, fetch]
        out = []
        for row, (k, s) in enumerate(zip(ks, seen, strict=True)):
            keep = [j for j, i in enumerate(ids[row]) if i >= 0 and int(i) not in s][:k]
            out.append((ids[row, keep].astype(np.int64), scores[row, keep].astype(np.float32)))
        return out
