"""A tower: encoder → mean pooling over the attention mask → optional projection → L2 normalisation.

A tower may carry gates (`recsys.models.gates.TowerGates`) over its heads, FFN neurons, sublayers and output
dims; the encoder then runs at its dense shape with the gate values multiplied in."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from recsys.data.split import Split
from recsys.data.text import user_text
from recsys.retrieval.evaluate import Scorer, embedding_scorer


class Tower(nn.Module):
    """Text embeddings from a BERT-family encoder: [B, L] token ids → [B, d] unit vectors."""

    def __init__(self, encoder: nn.Module, hidden: int, projection_dim: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.projection = nn.Linear(hidden, projection_dim) if projection_dim else None
        self.dim = projection_dim or hidden
        self.gates = None  # optional TowerGates (recsys.models.gates): learnable structure

    @property
    def shape(self):
        """The encoder's shape with this tower's output dim (None without a projection)."""
        return self.encoder.shape.replace(output_dim=self.projection.out_features if self.projection else None)

    def like(self, encoder: nn.Module, output_dim: int | None) -> Tower:
        """A tower of this kind around another (compact) encoder (the caller fills the projection)."""
        return Tower(encoder, encoder.shape.hidden, output_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                gates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`gates` overrides this tower's own gate values (e.g. all-ones tensors for importance scores)."""
        if gates is None and self.gates is not None:
            gates = self.gates.values()  # sampled in train mode
        h = self.encoder(input_ids, attention_mask, gates=gates)  # [B, L, H]
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # [B, L, 1]
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, H]
        if self.projection is not None:
            pooled = self.projection(pooled)  # [B, d]
        if gates is not None and "output" in gates:
            pooled = pooled * gates["output"]  # [B, d] gated embedding dims
        return F.normalize(pooled.float(), dim=-1)  # [B, d]


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), max_length=max_tokens, truncation=True, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.inference_mode()
def encode_texts(tower: Tower, tokenizer, texts: Sequence[str], max_tokens: int, batch_size: int = 128,
                 desc: str = "encode", progress: bool = True, autocast: bool = False) -> torch.Tensor:
    """[len(texts), d] embeddings, computed in length-sorted batches (little padding), returned in input order."""
    device = next(tower.parameters()).device
    lengths = [len(t) for t in texts]
    order = np.argsort(lengths, kind="stable")
    out = torch.empty(len(texts), tower.dim)
    was_training = tower.training
    tower.eval()
    for s in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[s:s + batch_size]
        batch = {k: v.to(device) for k, v in tokenize(tokenizer, [texts[i] for i in idx], max_tokens).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out[torch.from_numpy(idx)] = tower(**batch).float().cpu()
    tower.train(was_training)
    return out



def tower_scorers(user_tower, item_tower, tokenizer, item_texts: list[str], split: Split, data_cfg,
                  stages=("val", "test"), batch_size: int = 128, progress: bool = True,
                  item_emb: torch.Tensor | None = None) -> dict[str, Scorer]:
    """{stage: scorer} of a two-tower: item texts encoded once for all stages (or `item_emb` [N, d] given),
    each stage's user texts (the history up to its target) encoded once — the same texts for the trained model
    and the zero-shot encoder."""
    items = item_emb if item_emb is not None else encode_texts(
        item_tower, tokenizer, item_texts, data_cfg.item_max_tokens, batch_size, desc="encode items",
        progress=progress)
    device = next(user_tower.parameters()).device  # full ranking runs where the towers are (CPU: as before)
    items = items.to(device)
    users = split.eval_users
    scorers = {}
    for stage in stages:
        texts = [user_text(item_texts, split.history(int(u), stage), data_cfg.history_items) for u in users]
        emb = encode_texts(user_tower, tokenizer, texts, data_cfg.user_max_tokens, batch_size,
                           desc=f"encode users ({stage})", progress=progress).to(device)
        scorers[stage] = embedding_scorer(emb, users, split.n_users, items)
    return scorers
