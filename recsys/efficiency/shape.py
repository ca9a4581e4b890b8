"""The shape of a transformer tower: what each layer keeps, and the conditions it runs at.

A `Shape` says, per layer, which of the dense model's attention heads are kept and how many FFN neurons are
kept (an empty head tuple / `ffn == 0` means that sublayer is gone), plus the fixed sizes (hidden, head
dim, vocabulary, ...), the output embedding dim and the conditions (sequence length, batch, dtype). The
encoder, the cost model, gates and materialization all consume it. Stdlib only, so everything can import it.

Invalid values raise `ValueError` with one line naming the key and value (callers turn it into `RecsysError`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DTYPES = ("float32", "bfloat16", "int8")


def _check_int(where: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class LayerShape:
    """One layer: the dense model's head indices kept (`()` = no attention), FFN neurons kept (0 = no FFN)."""

    heads: tuple[int, ...]
    ffn: int

    def __post_init__(self) -> None:
        # Canonical form: a sorted tuple (head order does not change what the layer computes).
        if not isinstance(self.heads, (tuple, list)):
            raise ValueError(f"heads: expected a list of head indices, got {self.heads!r}")
        for h in self.heads:
            _check_int("heads", h, 0)
        if len(set(self.heads)) != len(self.heads):
            dup = next(h for h in self.heads if list(self.heads).count(h) > 1)
            raise ValueError(f"heads: head index {dup} listed twice")
        object.__setattr__(self, "heads", tuple(sorted(self.heads)))
        _check_int("ffn", self.ffn, 0)

    @property
    def n_heads(self) -> int:
        return len(self.heads)

    @property
    def has_attention(self) -> bool:
        return len(self.heads) > 0

    @property
    def has_ffn(self) -> bool:
        return self.ffn > 0

    def to_dict(self) -> dict:
        return {"heads": list(self.heads), "ffn": self.ffn}


@dataclass(frozen=True)
class Shape:
    """A tower's per-layer shape, fixed sizes, output dim (None: hidden, no projection), run conditions."""

    layers: tuple[LayerShape, ...]
    hidden: int
    head_dim: int
    n_heads_dense: int
    ffn_dense: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    output_dim: int | None = None
    seq_len: int = 128
    batch: int = 1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        positive = ("hidden", "head_dim", "n_heads_dense", "vocab_size", "max_positions", "seq_len", "batch")
        for name in positive:
            _check_int(f"shape.{name}", getattr(self, name), 1)
        for name in ("ffn_dense", "type_vocab_size"):
            _check_int(f"shape.{name}", getattr(self, name), 0)
        if self.output_dim is not None:
            _check_int("shape.output_dim", self.output_dim, 1)
        if self.dtype not in DTYPES:
            raise ValueError(f"shape.dtype: unknown dtype {self.dtype!r} (expected {', '.join(DTYPES)})")
        if not isinstance(self.layers, (tuple, list)):
            raise ValueError(f"shape.layers: expected a list of layers, got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(self.layers))
        for i, layer in enumerate(self.layers):
            where = f"shape.layers[{i}]"
            if not isinstance(layer, LayerShape):
                raise ValueError(f"{where}: expected a LayerShape, got {layer!r}")
            bad = [h for h in layer.heads if h >= self.n_heads_dense]
            if bad:
                raise ValueError(f"{where}.heads: head index {bad[0]} out of range [0, {self.n_heads_dense})")
            if layer.ffn > self.ffn_dense:
                raise ValueError(f"{where}.ffn: {layer.ffn} exceeds the dense FFN width {self.ffn_dense}")

    # --- construction -------------------------------------------------------------------------------------

    @classmethod
    def dense_from_hf_config(cls, cfg: Any, **conditions: Any) -> Shape:
        """The dense shape of a HF BERT-family config (a dict or a config object); `conditions` sets
        output_dim / seq_len / batch / dtype."""
        def get(key: str) -> Any:
            value = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
            if value is None:
                raise ValueError(f"config: missing key {key!r}")
            return value

        hidden, n_heads = get("hidden_size"), get("num_attention_heads")
        if hidden % n_heads:
            raise ValueError(f"config: hidden_size {hidden} not divisible by num_attention_heads {n_heads}")
        layer = LayerShape(heads=tuple(range(n_heads)), ffn=get("intermediate_size"))
        return cls(
            layers=(layer,) * get("num_hidden_layers"),
            hidden=hidden,
            head_dim=hidden // n_heads,
            n_heads_dense=n_heads,
            ffn_dense=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            max_positions=get("max_position_embeddings"),
            type_vocab_size=get("type_vocab_size"),
            **conditions,
        )

    def replace(self, **kw: Any) -> Shape:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **kw)

    def dense(self) -> Shape:
        """The same model with every head and neuron kept in every layer."""
        layer = LayerShape(tuple(range(self.n_heads_dense)), self.ffn_dense)
        return self.replace(layers=(layer,) * self.n_layers)

    # --- serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["layers"] = [layer.to_dict() for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Shape:
        if not isinstance(d, Mapping):
            raise ValueError(f"shape: expected a mapping, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        for key in d:
            if key not in known:
                raise ValueError(f"shape: unknown key {key!r} (known: {', '.join(known)})")
        for key in required:
            if key not in d:
                raise ValueError(f"shape: missing key {key!r}")
        if not isinstance(d["layers"], (list, tuple)):
            raise ValueError(f"shape.layers: expected a list of layers, got {d['layers']!r}")
        layers = []
        for i, ld in enumerate(d["layers"]):
            where = f"shape.layers[{i}]"
            if not isinstance(ld, Mapping):
                raise ValueError(f"{where}: expected a mapping with keys heads, ffn, got {ld!r}")
            for key in ld:
                if key not in ("heads", "ffn"):
                    raise ValueError(f"{where}: unknown key {key!r} (known: heads, ffn)")
            for key in ("heads", "ffn"):
                if key not in ld:
                    raise ValueError(f"{where}: missing key {key!r}")
            try:
                layers.append(LayerShape(heads=ld["heads"], ffn=ld["ffn"]))
            except ValueError as e:
                raise ValueError(f"{where}.{e}") from None
        return cls(**{**d, "layers": tuple(layers)})

    # --- summaries ----------------------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def heads_per_layer(self) -> tuple[int, ...]:
        return tuple(layer.n_heads for layer in self.layers)

    @property
    def ffn_per_layer(self) -> tuple[int, ...]:
        return tuple(layer.ffn for layer in self.layers)

    @property
    def is_uniform(self) -> bool:
        """Same head count and FFN width in every layer, and no absent sublayer."""
        return (
            len(set(self.heads_per_layer)) <= 1
            and len(set(self.ffn_per_layer)) <= 1
            and all(layer.has_attention and layer.has_ffn for layer in self.layers)
        )

    @property
    def is_dense(self) -> bool:
        """Every layer keeps all heads and all FFN neurons of the dense model."""
        return all(
            layer.n_heads == self.n_heads_dense and layer.ffn == self.ffn_dense for layer in self.layers
        )

    @property
    def embed_dim(self) -> int:
        """The tower's output embedding dim: `output_dim`, or `hidden` when there is no projection."""
        return self.output_dim if self.output_dim is not None else self.hidden
