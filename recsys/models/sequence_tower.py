"""The sequence user tower: a small transformer over the item tower's embeddings of a user's last N items.

UniSRec-style (Hou et al. 2022, "Towards Universal Sequence Representation Learning for Recommender Systems",
KDD): item texts are encoded by the item tower (once, and cached, when it is frozen: the catalog the index holds
anyway); the user is a 1-2 layer transformer over the embeddings of the last N items plus learned positions,
read out at the newest item's position, projected back to the item embedding dim and L2-normalised. Trained with
the same two-tower module, contrastive loss and evaluation as the text user tower (`model.user_tower=sequence`).
The online request is this transformer over N cached vectors at batch 1 + retrieval, instead of a text encoder
over 128 tokens.

The transformer is our `BertEncoder` at a small `Shape` (hidden = the item dim or `sequence_hidden`, N positions,
a one-row vocabulary that is never read), so gates (heads, FFN, blocks), the cost model and materialization work
on it as on a text tower. `sequence_adaptor` adds a residual MLP over the item embeddings (`represent`), on both
sides: the history the transformer reads and the catalog it is scored against — with a frozen item tower, the only
item-side capacity that trains (UniSRec's adaptor, as a plain MLP rather than its mixture of whitening experts).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.config import CompressConfig, ModelConfig
from recsys.data.split import Split
from recsys.efficiency.shape import LayerShape, Shape
from recsys.errors import RecsysError
from recsys.models.encoder import BertEncoder
from recsys.models.gates import TowerGates, gates_for
from recsys.retrieval.evaluate import Scorer, embedding_scorer


class SequenceTower(nn.Module):
    """Item embeddings [B, N, d_item] of a user's last N items (oldest first, left-padded) and their mask [B, N]
    → [B, d] unit vectors. Same interface as `Tower` where it matters: `encoder`, `projection`, `gates`, `dim`,
    `shape`."""

    def __init__(self, encoder: BertEncoder, item_dim: int, projection_dim: int | None = None,
                 adaptor: bool = False):
        super().__init__()
        H = encoder.shape.hidden
        self.encoder, self.item_dim = encoder, item_dim
        self.input = nn.Linear(item_dim, H) if H != item_dim else None  # into the transformer's width
        self.adaptor = (nn.Sequential(nn.Linear(item_dim, item_dim), nn.GELU(), nn.Linear(item_dim, item_dim))
                        if adaptor else None)
        if self.adaptor is not None:  # starts as the identity (residual branch at zero)
            nn.init.zeros_(self.adaptor[2].weight)
            nn.init.zeros_(self.adaptor[2].bias)
        self.projection = nn.Linear(H, projection_dim) if projection_dim else None  # back to the item dim
        self.dim = projection_dim or H
        self.gates: TowerGates | None = None

    @property
    def n_items(self) -> int:
        """N: the most recent items the tower reads (its positions)."""
        return self.encoder.shape.max_positions

    @property
    def shape(self) -> Shape:
        return self.encoder.shape.replace(output_dim=self.projection.out_features if self.projection else None)

    def like(self, encoder: BertEncoder, output_dim: int | None) -> SequenceTower:
        """A tower of this kind around another (compact) encoder, with copies of this one's input layers (the
        caller fills the projection): what materialization builds."""
        out = SequenceTower(encoder, self.item_dim, output_dim)
        out.input, out.adaptor = copy.deepcopy(self.input), copy.deepcopy(self.adaptor)
        return out

    def represent(self, items: torch.Tensor) -> torch.Tensor:
        """Item representations from item-tower embeddings [..., d_item]: through the adaptor (residual MLP,
        re-normalised) when there is one, else as they are. Both sides read them: the history this tower attends
        over, and the catalog it is scored against (a frozen item tower's catalog, adapted)."""
        if self.adaptor is None:
            return items
        return F.normalize(items + self.adaptor(items), dim=-1)  # [..., d_item]

    def forward(self, items: torch.Tensor, mask: torch.Tensor,
                gates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if gates is None and self.gates is not None:
            gates = self.gates.values()  # sampled in train mode
        N = items.shape[1]
        if N > self.n_items:
            raise RecsysError(f"sequence tower: {N} history items, but it has {self.n_items} positions")
        x = self.represent(items.float())  # [B, N, d_item]
        if self.input is not None:
            x = self.input(x)  # [B, N, H]
        e = self.encoder.embed
        pos = e.position.weight[self.n_items - N:]  # [N, H] right-aligned: the newest item has the last position
        x = e.drop(e.ln(x + pos + e.token_type.weight[0]))  # [B, N, H]
        m = mask.to(x.dtype)  # [B, N] 1 = an item
        additive = (1.0 - m[:, None, None, :]) * torch.finfo(x.dtype).min  # [B, 1, 1, N]
        for i, layer in enumerate(self.encoder.layers):
            per_layer = {k: v[i] for k, v in gates.items() if k != "output"} if gates else None
            x = layer(x, additive, self.encoder.attn_implementation, per_layer)  # [B, N, H]
        h = x[:, -1]  # [B, H] the newest item's position
        if self.projection is not None:
            h = self.projection(h)  # [B, d]
        if gates is not None and "output" in gates:
            h = h * gates["output"]
        return F.normalize(h.float(), dim=-1)  # [B, d]


def build_sequence_tower(cfg: ModelConfig, item_dim: int, n_items: int,
                         compress: CompressConfig | None = None) -> SequenceTower:
    """The sequence user tower `cfg` describes, reading `n_items` (N) item embeddings of `item_dim`; gated
    when `compress.gates` is set (heads, ffn, blocks; output dims stay: the item side has no such gates)."""
    H = cfg.sequence_hidden or item_dim
    heads = cfg.sequence_heads
    if H % heads:
        raise RecsysError(f"model.sequence_heads: {heads} heads do not divide the width {H} "
                          f"(model.sequence_hidden, default the item embedding dim)")
    ffn = cfg.sequence_ffn or 2 * H
    shape = Shape(layers=tuple(LayerShape(tuple(range(heads)), ffn) for _ in range(cfg.sequence_layers)),
                  hidden=H, head_dim=H // heads, n_heads_dense=heads, ffn_dense=ffn, vocab_size=1,
                  max_positions=n_items, type_vocab_size=1, seq_len=n_items)
    p = cfg.sequence_dropout
    enc = BertEncoder(shape, hidden_dropout_prob=p, attention_probs_dropout_prob=p,
                      attn_implementation=cfg.attn_implementation)
    tower = SequenceTower(enc, item_dim, item_dim if H != item_dim else None, cfg.sequence_adaptor)
    gates = compress.gates if compress is not None else []
    if "output" in gates:
        raise RecsysError("compress.gates: 'output' gates the user embedding's dims, which a sequence tower shares "
                          "with the (ungated) item tower; gate heads, ffn or blocks")
    tower.gates = gates_for(tower.shape, compress)
    return tower


def recent_items(histories: list[np.ndarray], n: int) -> torch.Tensor:
    """[B, n] each history's last n item ids, oldest first, left-padded with -1."""
    out = torch.full((len(histories), n), -1, dtype=torch.long)
    for row, h in enumerate(histories):
        h = np.asarray(h[-n:] if n else h[:0], dtype=np.int64)
        if len(h):
            out[row, n - len(h):] = torch.from_numpy(h)
    return out


def lookup(ids: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [B, N, d], mask [B, N]) of item ids [B, N] (-1 = padding) in a catalog table [n_items, d]."""
    mask = ids >= 0
    return table[ids.clamp(min=0).to(table.device)] * mask[..., None].to(table.device), mask.to(table.device)


@torch.inference_mode()
def sequence_user_embeddings(tower: SequenceTower, item_emb: torch.Tensor, split: Split, stage: str,
                             batch_size: int = 128) -> torch.Tensor:
    """[U, d] embeddings of the evaluated users at `stage` (their history up to that stage's target): the
    sequence tower over the cached catalog embeddings [n_items, d_item] of their last N items, on the CPU."""
    users = split.eval_users
    table = item_emb.to(next(tower.parameters()).device)  # [n_items, d_item]
    was = tower.training
    tower.eval()
    emb = torch.empty(len(users), tower.dim)
    for s in range(0, len(users), batch_size):
        ids = recent_items([split.history(int(u), stage) for u in users[s:s + batch_size]], tower.n_items)
        emb[s:s + batch_size] = tower(*lookup(ids, table)).cpu()
    tower.train(was)
    return emb


@torch.inference_mode()
def sequence_scorers(tower: SequenceTower, item_emb: torch.Tensor, split: Split, stages=("val", "test"),
                     batch_size: int = 128) -> dict[str, Scorer]:
    """{stage: scorer} of a sequence user tower: each stage's user embeddings from the cached catalog embeddings
    [n_items, d] of their last N items (the history up to that stage's target)."""
    was = tower.training
    tower.eval()
    keys = tower.represent(item_emb.to(next(tower.parameters()).device)).cpu()  # what users are scored against
    tower.train(was)
    return {stage: embedding_scorer(sequence_user_embeddings(tower, item_emb, split, stage, batch_size),
                                    split.eval_users, split.n_users, keys) for stage in stages}


def user_input_length(model: ModelConfig, data) -> int:
    """What a user tower reads per request: N history items (sequence) or the user text's tokens (text)."""
    return model.sequence_items if model.user_tower == "sequence" else data.user_max_tokens


def input_cost(tower: SequenceTower, n_history: int) -> dict[str, int]:
    """Parameters and FLOPs (batch 1) of a sequence tower's input layers (width change, adaptor), which its
    encoder `Shape` does not describe; the transformer and projection are costed from the shape
    (`recsys.efficiency.cost`)."""
    linears = [m for part in (tower.input, tower.adaptor) if part is not None
               for m in part.modules() if isinstance(m, nn.Linear)]
    params = sum(p.numel() for m in linears for p in m.parameters())
    flops = sum(2 * n_history * m.in_features * m.out_features for m in linears)
    return {"params": params, "flops": flops}
