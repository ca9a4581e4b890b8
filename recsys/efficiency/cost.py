"""What a tower costs: parameters, FLOPs, weight bytes and activation memory of a shape — exact for a hard
shape, and as a differentiable expectation for a soft shape (independent keep-probabilities per unit).

One formula serves both: a hard shape is the soft shape whose probabilities are 0 or 1. With independent
gates every cost term is a product of a block's probability and a unit's probability, so the expectation
is exact (no sampling). FLOPs count matrix products (2·m·n·k, as `torch.utils.flop_counter` does) including
attention scores and context; element-wise work (LayerNorm, softmax, GELU, pooling) is not counted.

Online cost of a recommendation = one user-tower forward at batch 1 + scoring the catalog (N × d);
the item tower is an offline, throughput cost.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from recsys.config import RetrievalConfig
from recsys.efficiency.index_cost import index_memory_bytes, index_work
from recsys.efficiency.shape import Shape

BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}


@dataclass
class SoftShape:
    """Keep-probabilities of every prunable unit of a tower (1 = kept).

    heads [n_layers, n_heads_dense], ffn [n_layers, ffn_dense], attn_block [n_layers], ffn_block [n_layers],
    out [output_dim] (or None without a projection). `base` holds the fixed sizes and run conditions.
    """

    base: Shape
    heads: torch.Tensor
    ffn: torch.Tensor
    attn_block: torch.Tensor
    ffn_block: torch.Tensor
    out: torch.Tensor | None = None

    @classmethod
    def from_shape(cls, shape: Shape, dtype=torch.float64) -> SoftShape:
        """The 0/1 soft shape of a hard shape (kept heads, the first `ffn` neurons)."""
        n, h, f = shape.n_layers, shape.n_heads_dense, shape.ffn_dense
        heads, ffn = torch.zeros(n, h, dtype=dtype), torch.zeros(n, f, dtype=dtype)
        for i, layer in enumerate(shape.layers):
            heads[i, list(layer.heads)] = 1.0
            ffn[i, : layer.ffn] = 1.0
        attn = torch.tensor([float(layer.has_attention) for layer in shape.layers], dtype=dtype)
        ffn_block = torch.tensor([float(layer.has_ffn) for layer in shape.layers], dtype=dtype)
        out = torch.ones(shape.output_dim, dtype=dtype) if shape.output_dim else None
        return cls(shape, heads, ffn, attn, ffn_block, out)


@dataclass
class Cost:
    """Costs of one forward of a tower at its shape's batch and sequence length (tensors when soft)."""

    params: torch.Tensor
    flops: torch.Tensor
    weight_bytes: torch.Tensor
    activation_bytes: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in vars(self).items()}


def soft_cost(s: SoftShape) -> Cost:
    """Expected cost under independent gates; differentiable in every probability of `s`."""
    b = s.base
    H, d, B, L = b.hidden, b.head_dim, b.batch, b.seq_len
    heads = s.heads.sum(1)  # [n_layers] expected heads kept (given the block)
    neurons = s.ffn.sum(1)  # [n_layers]
    a, f = s.attn_block, s.ffn_block  # [n_layers]

    # parameters: per head q,k,v weights+biases and its out-projection columns; per neuron up/down weights
    # and up bias; per present block its out/down bias and LayerNorm
    per_head = 3 * (H * d + d) + d * H
    per_neuron = 2 * H + 1
    embed = (b.vocab_size + b.max_positions + b.type_vocab_size) * H + 2 * H
    attn_params = a * (heads * per_head + 3 * H)  # out bias + LayerNorm
    ffn_params = f * (neurons * per_neuron + 3 * H)  # down bias + LayerNorm
    d_out = s.out.sum() if s.out is not None else None
    proj_params = d_out * (H + 1) if d_out is not None else 0.0
    linear_params = (attn_params + ffn_params).sum() + proj_params
    params = embed + linear_params

    # FLOPs of one forward: projections 2·B·L·in·out; attention scores and context 2·B·h·L·L·d each
    attn_flops = a * heads * (2 * B * L * H * d * 4 + 2 * 2 * B * L * L * d)
    ffn_flops = f * neurons * (2 * B * L * H * 2)
    proj_flops = 2 * B * H * d_out if d_out is not None else 0.0
    flops = (attn_flops + ffn_flops).sum() + proj_flops

    # weights in the shape's dtype (int8: linear weights int8, embeddings/norms/biases fp32)
    w = BYTES[b.dtype]
    weight_bytes = linear_params * w + embed * 4 if b.dtype == "int8" else params * w
    # activations of the widest layer kept alive in inference: hidden states + scores + FFN intermediate
    act = w if b.dtype != "int8" else 4
    peak = torch.maximum((a * heads * B * L * L).max(), (f * neurons * B * L).max()) if b.n_layers else 0.0
    activation_bytes = (2 * B * L * H + peak) * act
    as_t = lambda x: x if torch.is_tensor(x) else torch.tensor(float(x), dtype=s.heads.dtype)  # noqa: E731
    return Cost(as_t(params), as_t(flops), as_t(weight_bytes), as_t(activation_bytes))


def cost(shape: Shape) -> dict[str, float]:
    """Exact parameters, FLOPs, weight bytes and activation bytes of a hard shape."""
    return soft_cost(SoftShape.from_shape(shape)).as_dict()


def retrieval_flops(n_items: int, dim: int | torch.Tensor, batch: int = 1) -> torch.Tensor | float:
    """Exact top-K scoring over the catalog: one [batch, dim] × [dim, n_items] product."""
    return 2 * batch * n_items * dim


def online_cost(user_shape: Shape, n_items: int, index: RetrievalConfig | None = None) -> dict[str, float]:
    """One recommendation request: user tower at batch 1 + scoring `n_items` items, exactly or through the
    retrieval `index` (its counted work per query: recsys/efficiency/index_cost.py)."""
    user = cost(user_shape.replace(batch=1))
    d = user_shape.embed_dim
    if index is not None and index.index != "exact":
        scoring, index_bytes = index_work(index, n_items, d)["flops"], index_memory_bytes(index, n_items, d)
    else:
        scoring, index_bytes = float(retrieval_flops(n_items, d)), n_items * d * BYTES["float32"]
    return {"user_params": user["params"], "user_flops": user["flops"], "retrieval_flops": scoring,
            "flops": user["flops"] + scoring, "index_bytes": index_bytes}
