"""Export a trained tower (materialized to its compact shape) for serving without a training run.

Formats (each a folder that also holds the tokenizer):

- `hf`: a standard Hugging Face BERT directory that plain `transformers.AutoModel` loads, when the compact shape
  fits a BERT config (every layer keeps every head, the same FFN width, both sublayers); otherwise our own
  format (`shape.json` + `tower.safetensors`, loaded by `load_tower`, no pickle). Either way `tower.json`
  states the pooling (mean over the attention mask), the projection (`projection.safetensors`) and the L2
  normalisation that turn the encoder's last hidden state into the embedding.
- `torch-export`: `tower.pt2`, a `torch.export` program of the whole tower (ids, mask → unit embeddings) with
  dynamic batch and sequence length; `torch.export.load(path).module()` runs it without our code.
- `onnx`: `tower.onnx` of the whole tower (dynamic batch and sequence length), for ONNX Runtime.

A sequence user tower (`recsys/models/sequence_tower.py`) reads item vectors, not tokens: `export_sequence_tower`
writes it as `torch-export` or `onnx` (item vectors [B, N, d_item] and their mask [B, N] → unit embeddings; dynamic
batch, the N positions fixed: a server left-pads a shorter history with mask 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from recsys.efficiency.shape import Shape
from recsys.errors import RecsysError
from recsys.models.encoder import HF_EMBEDDING_NAMES, HF_LAYER_NAMES, BertEncoder, check_weight_files
from recsys.models.tower import Tower

FORMATS = ("hf", "torch-export", "onnx")
OPSET = 18


def hf_compatible(shape: Shape) -> bool:
    """Whether a plain HF BertConfig describes the shape: BERT's head size is hidden / heads, and its FFN
    width and sublayers are the same in every layer."""
    first = shape.layers[0].ffn if shape.layers else 0
    return all(ls.n_heads == shape.n_heads_dense and ls.ffn == first > 0 for ls in shape.layers)


def _hf_config(enc: BertEncoder):
    from transformers import BertConfig

    s, x = enc.shape, enc.config_extras
    return BertConfig(vocab_size=s.vocab_size, hidden_size=s.hidden, num_hidden_layers=s.n_layers,
                      num_attention_heads=s.n_heads_dense, intermediate_size=s.layers[0].ffn,
                      max_position_embeddings=s.max_positions, type_vocab_size=s.type_vocab_size,
                      layer_norm_eps=x["layer_norm_eps"], hidden_act=x["hidden_act"],
                      hidden_dropout_prob=x["hidden_dropout_prob"],
                      attention_probs_dropout_prob=x["attention_probs_dropout_prob"])


def _hf_state_dict(enc: BertEncoder) -> dict[str, torch.Tensor]:
    """Our parameter names → HF BertModel names (the inverse of `BertEncoder._load_hf_state_dict`)."""
    sd = {}
    for ours, theirs in HF_EMBEDDING_NAMES.items():
        for name, p in getattr(enc.embed, ours).named_parameters():
            sd[f"embeddings.{theirs}.{name}"] = p.detach().clone()
    for i, layer in enumerate(enc.layers):
        for ours, theirs in HF_LAYER_NAMES.items():
            block, sub = ours.split(".")
            for name, p in getattr(getattr(layer, block), sub).named_parameters():
                sd[f"encoder.layer.{i}.{theirs}.{name}"] = p.detach().clone()
    return sd


def _write_head(tower: Tower, out: Path, encoder_format: str) -> None:
    from safetensors.torch import save_file

    meta = {"encoder_format": encoder_format, "pooling": "mean", "normalize": True,
            "projection": tower.projection is not None, "dim": tower.dim,
            "shape": tower.encoder.shape.to_dict(), "encoder_config": tower.encoder.config_extras}
    if tower.projection is not None:
        save_file({k: v.contiguous() for k, v in tower.projection.state_dict().items()},
                  str(out / "projection.safetensors"))
    (out / "tower.json").write_text(json.dumps(meta, indent=2) + "\n")


def _example(tower: Tower, batch: int = 2, seq_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = tower.encoder.shape.vocab_size
    ids = torch.randint(1000 % vocab, vocab, (batch, seq_len))
    return ids, torch.ones(batch, seq_len, dtype=torch.long)


def export_tower(tower: Tower, tokenizer, out: Path, fmt: str) -> str:
    """Write a compact (gate-free) tower to the folder `out` in format `fmt`; returns the format written
    (`hf`, `recsys`, `torch-export` or `onnx`)."""
    if fmt not in FORMATS:
        raise RecsysError(f"--format: unknown format {fmt!r} (expected {', '.join(FORMATS)})")
    if tower.gates is not None:
        raise RecsysError("export: materialize the tower first (it still has gates)")
    tower = tower.eval()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    if fmt == "hf":
        enc = tower.encoder
        if hf_compatible(enc.shape):
            from transformers import BertModel

            model = BertModel(_hf_config(enc), add_pooling_layer=False)
            model.load_state_dict(_hf_state_dict(enc), strict=True)
            model.save_pretrained(str(out))
            written = "hf"
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(out / "encoder.safetensors"))
            written = "recsys"
        _write_head(tower, out, written)
        return written
    ids, mask = _example(tower)
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=512)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    _save_program(tower, (ids, mask), ["input_ids", "attention_mask"], dynamic, out, fmt)
    return fmt


def _save_program(tower: torch.nn.Module, example: tuple, input_names: list[str], dynamic: dict, out: Path,
                  fmt: str) -> None:
    """The whole tower traced on `example` inputs: `tower.pt2` (torch.export) or `tower.onnx` (ONNX, dynamo)."""
    if fmt == "torch-export":
        torch.export.save(torch.export.export(tower, example, dynamic_shapes=dynamic), str(out / "tower.pt2"))
        return
    try:
        import onnxscript  # noqa: F401  (the dynamo ONNX exporter needs it)
    except ImportError:
        raise RecsysError("--format onnx needs the export extra: pip install 'recsys[export]'") from None
    torch.onnx.export(tower, example, str(out / "tower.onnx"), input_names=input_names, output_names=["tower_output"],
                      dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, verbose=False)


def export_sequence_tower(tower, out: Path, fmt: str) -> str:
    """Write a compact (gate-free) sequence user tower to the folder `out` as `torch-export` (`tower.pt2`) or `onnx`
    (`tower.onnx`): inputs `item_vectors` [B, N, d_item] float32 and `mask` [B, N] (1 = an item, oldest first,
    left-padded), output [B, d] unit vectors. Returns the format written."""
    if fmt not in ("torch-export", "onnx"):
        raise RecsysError(f"--format {fmt}: a sequence user tower reads item vectors, not tokens, so no Hugging Face "
                          "format fits it; export it with --format onnx or --format torch-export")
    if tower.gates is not None:
        raise RecsysError("export: materialize the tower first (it still has gates)")
    tower = tower.eval()
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(2, tower.n_items, tower.item_dim, generator=g), dim=-1)
    mask = torch.ones(2, tower.n_items, dtype=torch.long)
    mask[1, : tower.n_items // 2] = 0  # a short history: traced with padding
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {"items": {0: batch}, "mask": {0: batch}}
    _save_program(tower, (items, mask), ["item_vectors", "mask"], dynamic, out, fmt)
    return fmt


def run_exported_sequence(path: Path, fmt: str, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Embeddings from an exported sequence tower for item vectors [B, N, d_item] and their mask [B, N]."""
    if fmt == "torch-export":
        with torch.inference_mode():
            return torch.export.load(str(path / "tower.pt2")).module()(items, mask)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path / "tower.onnx"), providers=["CPUExecutionProvider"])
    (emb,) = sess.run(None, {"item_vectors": items.float().numpy(), "mask": mask.long().numpy()})
    return torch.from_numpy(emb)


def load_tower(path: str | Path) -> Tower:
    """A tower exported with `--format hf` (either encoder format), ready for `encode_texts`."""
    from safetensors.torch import load_file

    p = Path(path)
    meta_path = p / "tower.json"
    if not meta_path.is_file():
        raise RecsysError(f"{p}: not an exported tower (no tower.json)")
    meta = json.loads(meta_path.read_text())
    if meta["encoder_format"] == "hf":
        enc = BertEncoder.from_pretrained(str(p))
    else:
        check_weight_files(p, ("encoder.safetensors",))
        shape = Shape.from_dict(meta["shape"])
        enc = BertEncoder(shape, **meta["encoder_config"])
        enc.load_state_dict(load_file(str(p / "encoder.safetensors")))
    tower = Tower(enc, enc.shape.hidden, meta["dim"] if meta["projection"] else None)
    if tower.projection is not None:
        check_weight_files(p, ("projection.safetensors",))
        tower.projection.load_state_dict(load_file(str(p / "projection.safetensors")))
    return tower.eval()


def run_exported(path: Path, fmt: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Embeddings from an exported artifact, computed the way a server without our training code would."""
    if fmt in ("hf", "recsys"):
        with torch.inference_mode():
            return load_tower(path)(ids, mask)
    if fmt == "torch-export":
        with torch.inference_mode():
            return torch.export.load(str(path / "tower.pt2")).module()(ids, mask)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path / "tower.onnx"), providers=["CPUExecutionProvider"])
    (emb,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return torch.from_numpy(emb)


