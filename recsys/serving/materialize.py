"""Materialization: a gated tower → a physically smaller tower that computes the same embeddings.

The compact encoder is our `BertEncoder` built at the gates' hard shape: closed heads and FFN neurons are
removed (their weight slices are not copied), closed sublayers are dropped (LayerNorm included), closed output
dims are cut from the projection. The deterministic value of every open gate (a head's, a neuron's, an output
dim's; in [0, 1]) is folded into the weights it multiplies: a head's columns of the attention output
projection, a neuron's column of the FFN down projection, an output dim's projection row and bias. In eval
mode the compact tower's embeddings equal the gated tower's (tested within 1e-4 on random gates).
"""
from __future__ import annotations

import torch

from recsys.models.encoder import BertEncoder
from recsys.models.tower import Tower


@torch.no_grad()
def materialize(tower: Tower) -> Tower:
    """The compact tower of a gated `tower` (a tower without gates is returned as a plain copy)."""
    if tower.gates is None:
        shape = tower.shape  # with its projection's output dim
        z = None
    else:
        shape = tower.gates.hard_shape()
        z = tower.gates.kept()  # deterministic gate values, every kind (1 where not gated)
    src = tower.encoder
    enc = BertEncoder(shape.replace(output_dim=None), **src.config_extras,
                      attn_implementation=src.attn_implementation)
    enc.embed.load_state_dict(src.embed.state_dict())
    d = shape.head_dim
    for i, (ls, old, new) in enumerate(zip(shape.layers, src.layers, enc.layers, strict=True)):
        if new.attn is not None:
            heads = torch.tensor(ls.heads)
            kept_heads = [src.shape.layers[i].heads.index(h) for h in ls.heads]  # positions in the source
            cols = (torch.tensor(kept_heads)[:, None] * d + torch.arange(d)).flatten()  # [n_kept * d]
            scale = (z["heads"][i, heads] if z is not None else torch.ones(len(heads))).repeat_interleave(d)
            for name in ("q", "k", "v"):
                getattr(new.attn, name).weight.copy_(getattr(old.attn, name).weight[cols])
                getattr(new.attn, name).bias.copy_(getattr(old.attn, name).bias[cols])
            new.attn.out.weight.copy_(old.attn.out.weight[:, cols] * scale)
            new.attn.out.bias.copy_(old.attn.out.bias)
            new.attn.ln.load_state_dict(old.attn.ln.state_dict())
        if new.ffn is not None:
            if z is not None:
                neurons = torch.nonzero(z["ffn"][i] > 0).flatten()
                scale = z["ffn"][i, neurons]
            else:
                neurons, scale = torch.arange(ls.ffn), torch.ones(ls.ffn)
            new.ffn.up.weight.copy_(old.ffn.up.weight[neurons])
            new.ffn.up.bias.copy_(old.ffn.up.bias[neurons])
            new.ffn.down.weight.copy_(old.ffn.down.weight[:, neurons] * scale)
            new.ffn.down.bias.copy_(old.ffn.down.bias)
            new.ffn.ln.load_state_dict(old.ffn.ln.state_dict())
    out = tower.like(enc, shape.output_dim)  # a text Tower, or a sequence tower (its input layers copied)
    if tower.projection is not None:
        if z is not None and z["output"] is not None:
            dims = torch.nonzero(z["output"] > 0).flatten()
            scale = z["output"][dims]
        else:
            dims = torch.arange(tower.projection.out_features)
            scale = torch.ones(len(dims))
        out.projection.weight.copy_(tower.projection.weight[dims] * scale[:, None])
        out.projection.bias.copy_(tower.projection.bias[dims] * scale)
    return out.eval()

