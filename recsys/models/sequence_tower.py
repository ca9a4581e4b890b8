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


class WhiteningMoE(nn.Module):
    """UniSRec's item adaptor (Hou et al. 2022, §3.1.2): a mixture of `n_experts` parametric-whitening experts,
    each (x − b_k) W_k, mixed by a softmax gate over x: MoE(x) = Σ_k g_k(x) (x − b_k) W_k. Initialised to the
    identity (b_k = 0, W_k = I, uniform gate), so a tower that starts from it reads the item vectors as they are."""

    def __init__(self, dim: int, n_experts: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n_experts, dim))  # [K, d]
        self.weight = nn.Parameter(torch.eye(dim).repeat(n_experts, 1, 1))  # [K, d, d]
        self.gate = nn.Linear(dim, n_experts, bias=False)
        nn.init.zeros_(self.gate.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.softmax(self.gate(x), dim=-1)  # [..., K]
        experts = torch.einsum("...d,kde->...ke", x, self.weight) - torch.einsum("kd,kde->ke", self.bias,
                                                                                   self.weight)  # [..., K, d]
        return (g[..., None] * experts).sum(-2)  # [..., d]


class SequenceTower(nn.Module):
    """Item embeddings [B, N, d_item] of a user's last N items (oldest first, left-padded) and their mask [B, N]
    → [B, d] unit vectors (or [B, N, d], one per position, with `positions="all"`). Same interface as `Tower`
    where it matters: `encoder`, `projection`, `gates`, `dim`, `shape`.

    Item representations (`represent`): the item tower's vector, through an adaptor (a residual MLP, or UniSRec's
    whitening mixture of experts), plus a learned ID embedding (`n_catalog` > 0: UniSRec's transductive `text+id`;
    dropped per item with probability `id_dropout` while training), re-normalised. Every part starts as the
    identity (zero residual branches, zero ID embeddings, identity experts).

    Read-out (`readout`): `last`, the transformer's state at the newest position (projected back to the item dim
    when the width differs); or `mean_residual`, the mean of the history's item representations plus the
    transformer's state through a zero-initialised projection — so at step 0 the tower is the zero-shot model
    (the mean of the history's item vectors, `mean_item_scorers`) and training can only add to it.
    `causal`: each position attends only to itself and older items (SASRec), so every position's output is a
    prediction of its next item (`train.objective=causal`).
    `score`: `cosine` re-normalises item representations and user vectors (score = cos / τ); `dot` leaves both as
    they are (score = dot / τ, SASRec's: an item's norm can carry its popularity, which unit vectors cannot).
    `item_space="hidden"` (SASRec's layout, Kang & McAuley 2018): an item is `text_map` (a linear map of its frozen
    text vector into the transformer's width H) plus, for text+id, an ID embedding initialised as SASRec's
    (N(0, 1/H)); the transformer reads it scaled by √H and scores the catalog against the same table (tied input
    and output embeddings), with no width change in between. An item never trained on (cold start) has its ID row
    zeroed by the module before training, so it is scored by its text alone."""

    def __init__(self, encoder: BertEncoder, item_dim: int, projection_dim: int | None = None,
                 adaptor: bool = False, *, moe: int = 0, readout: str = "last", causal: bool = False,
                 n_catalog: int = 0, id_dropout: float = 0.0, score: str = "cosine", item_space: str = "item"):
        super().__init__()
        self.unit = score == "cosine"
        H = encoder.shape.hidden
        self.encoder, self.item_dim = encoder, item_dim
        self.readout, self.causal, self.id_dropout = readout, causal, id_dropout
        hidden_space = item_space == "hidden"
        if hidden_space and readout != "last":
            raise RecsysError("item_space=hidden reads out the newest state (sequence_readout=last)")
        # item_space=hidden: items are mapped into the width once, on the catalog side (and read scaled by √H)
        self.text_map = nn.Linear(item_dim, H, bias=False) if hidden_space else None
        self.input_scale = H ** 0.5 if hidden_space else 1.0
        self.input = nn.Linear(item_dim, H) if H != item_dim and not hidden_space else None  # into the width
        self.adaptor: nn.Module | None = None
        if adaptor:  # residual MLP, starts as the identity (residual branch at zero)
            self.adaptor = nn.Sequential(nn.Linear(item_dim, item_dim), nn.GELU(), nn.Linear(item_dim, item_dim))
            nn.init.zeros_(self.adaptor[2].weight)
            nn.init.zeros_(self.adaptor[2].bias)
        elif moe:
            self.adaptor = WhiteningMoE(item_dim, moe)
        id_dim = H if hidden_space else item_dim
        self.item_ids = nn.Embedding(n_catalog, id_dim) if n_catalog else None  # text+id
        if self.item_ids is not None and hidden_space:
            nn.init.normal_(self.item_ids.weight, std=H ** -0.5)  # SASRec's initialisation
        elif self.item_ids is not None:
            nn.init.zeros_(self.item_ids.weight)  # the tower starts as the text-only one
        if readout == "mean_residual":
            projection_dim = item_dim  # the transformer's branch, added to the mean: starts at zero
        if hidden_space:
            projection_dim = None  # scored in the width, against the same table
        self.projection = nn.Linear(H, projection_dim) if projection_dim else None  # back to the item dim
        if readout == "mean_residual":
            nn.init.zeros_(self.projection.weight)
            nn.init.zeros_(self.projection.bias)
        self.dim = projection_dim or H
        self.gates: TowerGates | None = None

    @property
    def key_dim(self) -> int:
        """The width of the item representations users are scored against (`represent`)."""
        return self.text_map.out_features if self.text_map is not None else self.item_dim

    @property
    def n_items(self) -> int:
        """N: the most recent items the tower reads (its positions)."""
        return self.encoder.shape.max_positions

    @property
    def shape(self) -> Shape:
        return self.encoder.shape.replace(output_dim=self.projection.out_features if self.projection else None)

    def like(self, encoder: BertEncoder, output_dim: int | None) -> SequenceTower:
        """A tower of this kind around another (compact) encoder, with copies of this one's item-side layers and
        read-out (the caller fills the projection): what materialization builds."""
        out = copy.deepcopy(self)
        out.encoder, out.gates = encoder, None
        out.projection = nn.Linear(encoder.shape.hidden, output_dim) if output_dim else None
        out.dim = output_dim or encoder.shape.hidden
        return out

    def represent(self, items: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Item representations from item-tower embeddings [..., d_item] (and their catalog ids [...], which a
        text+id tower needs): adaptor, (item_space=hidden: mapped into the width,) + ID embedding, re-normalised;
        without any of them, the vectors as they are. Both sides read them: the history this tower attends over,
        and the catalog it is scored against."""
        if self.adaptor is None and self.item_ids is None and self.text_map is None:
            return items
        x = items
        if isinstance(self.adaptor, WhiteningMoE):
            x = self.adaptor(x)  # [..., d_item]
        elif self.adaptor is not None:
            x = x + self.adaptor(x)  # [..., d_item]
        if self.text_map is not None:
            x = self.text_map(x)  # [..., H]
        if self.item_ids is not None:
            if ids is None:
                raise RecsysError("a text+id sequence tower needs the catalog ids of the items it reads")
            e = self.item_ids(ids.clamp(min=0))  # [..., d_item or H]
            if self.training and self.id_dropout:
                e = e * (torch.rand(e.shape[:-1] + (1,), device=e.device) >= self.id_dropout)
            x = x + e
        return F.normalize(x, dim=-1) if self.unit else x  # [..., d_item]

    def represent_catalog(self, items: torch.Tensor) -> torch.Tensor:
        """[n_items, d_item] representations of a whole catalog [n_items, d_item] (row i = item i)."""
        ids = torch.arange(len(items), device=items.device) if self.item_ids is not None else None
        return self.represent(items, ids)

    def forward(self, items: torch.Tensor, mask: torch.Tensor, gates: dict[str, torch.Tensor] | None = None,
                ids: torch.Tensor | None = None, positions: str = "last") -> torch.Tensor:
        """Item-tower embeddings [B, N, d_item] (`ids` [B, N]: their catalog ids, for text+id) → [B, d]."""
        return self.encode(self.represent(items.float(), ids), mask, gates, positions)

    def encode(self, x: torch.Tensor, mask: torch.Tensor, gates: dict[str, torch.Tensor] | None = None,
               positions: str = "last") -> torch.Tensor:
        """Item representations [B, N, d_item] (`represent`) and their mask [B, N] → [B, d] unit vectors at the
        newest position, or [B, N, d] at every position (`positions="all"`, a causal tower's training)."""
        if gates is None and self.gates is not None:
            gates = self.gates.values()  # sampled in train mode
        B, N = mask.shape
        if N > self.n_items:
            raise RecsysError(f"sequence tower: {N} history items, but it has {self.n_items} positions")
        m = mask.to(x.dtype)  # [B, N] 1 = an item
        reps = x * m[..., None]  # [B, N, d_item] (item_space=hidden: [B, N, H])
        if self.input is not None:
            x = self.input(reps)  # [B, N, H]
        else:
            x = reps * self.input_scale  # [B, N, H] (SASRec scales its item embeddings by √H)
        e = self.encoder.embed
        pos = e.position.weight[self.n_items - N:]  # [N, H] right-aligned: the newest item has the last position
        x = e.drop(e.ln(x + pos + e.token_type.weight[0]))  # [B, N, H]
        allowed = mask[:, None, None, :].bool()  # [B, 1, 1, N] keys that are items
        if self.causal:  # a query attends to itself and older items; a padding query to itself (no empty rows)
            tri = torch.ones(N, N, dtype=torch.bool, device=mask.device).tril()  # [N, N]
            allowed = (allowed & tri) | torch.eye(N, dtype=torch.bool, device=mask.device)  # [B, 1, N, N]
        additive = (~allowed).to(x.dtype) * torch.finfo(x.dtype).min  # [B, 1, 1 or N, N]
        for i, layer in enumerate(self.encoder.layers):
            per_layer = {k: v[i] for k, v in gates.items() if k != "output"} if gates else None
            x = layer(x, additive, self.encoder.attn_implementation, per_layer)  # [B, N, H]
        h = x if positions == "all" else x[:, -1:]  # [B, N or 1, H]
        if self.projection is not None:
            h = self.projection(h)  # [B, ·, d]
        if gates is not None and "output" in gates:
            h = h * gates["output"]
        if self.readout == "mean_residual":  # + the (causal) mean of the item representations up to each position
            counts = m.cumsum(1).clamp(min=1.0)[..., None]  # [B, N, 1]
            mean = reps.cumsum(1) / counts  # [B, N, d_item]
            h = h + (mean if positions == "all" else mean[:, -1:])
        h = F.normalize(h.float(), dim=-1) if self.unit else h.float()  # [B, ·, d]
        return h if positions == "all" else h[:, 0]  # [B, N, d] or [B, d]


def build_sequence_tower(cfg: ModelConfig, item_dim: int, n_items: int,
                         compress: CompressConfig | None = None, n_catalog: int = 0) -> SequenceTower:
    """The sequence user tower `cfg` describes, reading `n_items` (N) item embeddings of `item_dim`; with
    `model.item_representation=text+id` an ID embedding per catalog item (`n_catalog` of them); gated when
    `compress.gates` is set (heads, ffn, blocks; output dims stay: the item side has no such gates)."""
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
    with_ids = cfg.item_representation == "text+id"
    if with_ids and n_catalog < 1:
        raise RecsysError("model.item_representation=text+id: the tower needs the catalog size (an ID per item)")
    tower = SequenceTower(enc, item_dim, item_dim if H != item_dim else None, cfg.sequence_adaptor,
                          moe=cfg.sequence_moe, readout=cfg.sequence_readout, causal=cfg.sequence_causal,
                          n_catalog=n_catalog if with_ids else 0, id_dropout=cfg.id_dropout,
                          score=cfg.sequence_score, item_space=cfg.item_space)
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
                             batch_size: int = 128, keys: torch.Tensor | None = None) -> torch.Tensor:
    """[U, d] embeddings of the evaluated users at `stage` (their history up to that stage's target): the
    sequence tower over the representations (`keys`, default `represent_catalog` of the cached catalog
    embeddings [n_items, d_item]) of their last N items."""
    users = split.eval_users
    was = tower.training
    tower.eval()
    if keys is None:
        keys = tower.represent_catalog(item_emb.to(next(tower.parameters()).device).float())  # [n_items, d_item]
    emb = torch.empty(len(users), tower.dim)
    for s in range(0, len(users), batch_size):
        ids = recent_items([split.history(int(u), stage) for u in users[s:s + batch_size]], tower.n_items)
        emb[s:s + batch_size] = tower.encode(*lookup(ids, keys)).cpu()
    tower.train(was)
    return emb


@torch.inference_mode()
def sequence_scorers(tower: SequenceTower, item_emb: torch.Tensor, split: Split, stages=("val", "test"),
                     batch_size: int = 128) -> dict[str, Scorer]:
    """{stage: scorer} of a sequence user tower: each stage's user embeddings from the representations of the
    cached catalog embeddings [n_items, d] of their last N items (the history up to that stage's target),
    scored against the same representations."""
    was = tower.training
    tower.eval()
    keys = tower.represent_catalog(item_emb.to(next(tower.parameters()).device).float())  # scored against
    tower.train(was)
    return {stage: embedding_scorer(sequence_user_embeddings(tower, item_emb, split, stage, batch_size, keys),
                                    split.eval_users, split.n_users, keys.cpu()) for stage in stages}


@torch.inference_mode()
def mean_item_scorers(item_emb: torch.Tensor, split: Split, n_history: int,
                      stages=("val", "test")) -> dict[str, Scorer]:
    """{stage: scorer} of the zero-shot sequence model: a user is the normalised mean of the item vectors of their
    last `n_history` items, scored against the item vectors — what a `mean_residual` tower computes at step 0."""
    out = {}
    for stage in stages:
        users = split.eval_users
        emb, mask = lookup(recent_items([split.history(int(u), stage) for u in users], n_history), item_emb)
        mean = emb.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # [U, d]
        out[stage] = embedding_scorer(F.normalize(mean, dim=-1), users, split.n_users, item_emb)
    return out


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
