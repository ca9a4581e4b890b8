"""A trained run searched through a retrieval index: its catalog's item embeddings and built indexes cached per
run and spec, evaluation through the index (`recsys evaluate RUN --index SPEC`), and its online request (user
tower + index search) for benchmarks and sweeps.

Cache: `<results>/cache/index/<run name>/` beside `<results>/runs/<run name>/` — `items-<fingerprint>.pt` and one
folder per built index (`recsys.retrieval.index.build_key`). The fingerprint hashes the run's checkpoint bytes,
its item texts and item token budget: a cached index built before the run changed is refused in one line
(`--rebuild-index` builds it again).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from recsys.config import RetrievalConfig, RunConfig, parse_index_spec
from recsys.data.registry import load_data
from recsys.data.text import user_text
from recsys.efficiency.cost import online_cost
from recsys.errors import RecsysError
from recsys.models.encoder import load_tokenizer, resolve_model_path
from recsys.models.sequence_tower import input_cost, sequence_user_embeddings, user_input_length
from recsys.models.tower import encode_texts
from recsys.retrieval.index import build_index, cached_index
from recsys.retrieval.index_eval import IndexEval, evaluate_index
from recsys.runs import check_lengths, load_run, run_paths
from recsys.serving.index_route import index_request_calls, request_call
from recsys.serving.materialize import materialize
from recsys.serving.quantize import route_for


def index_cache(run_dir: Path) -> Path:
    """`<results>/cache/index/<run name>/` for a run folder `<results>/runs/<run name>/`."""
    return run_dir.resolve().parent.parent / "cache" / "index" / run_dir.name


def run_fingerprint(ckpt: Path, cfg: RunConfig, item_texts: list[str]) -> str:
    """sha1 of what the catalog's embeddings depend on: checkpoint bytes, item texts, item token budget."""
    h = hashlib.sha1()
    with open(ckpt, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(f"{cfg.data.item_max_tokens}\n{cfg.model.encoder}\n".encode())
    for t in item_texts:
        h.update(t.encode() + b"\0")
    return h.hexdigest()


def resolve_index(spec: str | RetrievalConfig | None, cfg: RunConfig) -> RetrievalConfig:
    """A spec string (other keys from the run's `retrieval` section), a config, or the run's own section."""
    if spec is None:
        return cfg.retrieval
    return spec if isinstance(spec, RetrievalConfig) else parse_index_spec(spec)


def catalog_embeddings(module, cfg: RunConfig, item_texts: list[str], cache: Path, fingerprint: str,
                       progress: bool = True) -> torch.Tensor:
    """[N, d] item-tower embeddings of the catalog, cached under `cache` by fingerprint."""
    path = cache / f"items-{fingerprint[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    tok = load_tokenizer(resolve_model_path(cfg.model.encoder))
    items = encode_texts(module.item_tower, tok, item_texts, cfg.data.item_max_tokens, cfg.train.eval_batch_size,
                         desc="encode items", progress=progress)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(items, path.with_suffix(".partial"))
    path.with_suffix(".partial").replace(path)
    return items


def run_index(target: str | Path, spec: str | RetrievalConfig | None = None, rebuild: bool = False,
              progress: bool = True, overrides: list[str] | None = None, loaded: tuple | None = None):
    """(config, module, dataset, split, item-tower embeddings, keys, index) of a run searched through `spec` (its
    own `retrieval` section when None); `loaded`: the run's (config, module) when the caller has loaded it already.
    The keys are what users are scored against, and what the index holds: the item-tower embeddings, through a
    sequence user tower's adaptor when it has one."""
    run_dir, ckpt = run_paths(target)
    cfg, module = loaded or load_run(run_dir, overrides)
    index_cfg = resolve_index(spec, cfg)
    ds, split = load_data(cfg.data)
    fingerprint = run_fingerprint(ckpt, cfg, ds.item_texts)
    cache = index_cache(run_dir)
    items = catalog_embeddings(module, cfg, ds.item_texts, cache, fingerprint, progress)
    keys = _keys(module, items)
    if index_cfg.cache:
        index = cached_index(cache, keys, index_cfg, fingerprint, rebuild=rebuild, seed=cfg.train.seed)
    else:
        index = build_index(keys, index_cfg, seed=cfg.train.seed)
    return cfg, module, ds, split, items, keys, index


@torch.inference_mode()
def _keys(module, items: torch.Tensor) -> torch.Tensor:
    """[N, d] what users are scored against: a sequence tower's item representations (its adaptor), else `items`."""
    return module.user_tower.eval().represent(items) if module.sequence else items


def evaluate_run_index(target: str | Path, spec: str | RetrievalConfig | None = None, stage: str = "test",
                       rebuild: bool = False, progress: bool = True) -> IndexEval:
    """A run evaluated on `stage` through the index `spec` (and exactly, on the same user embeddings): full-ranking
    metrics from the index's candidates and its recall@10 / @100 against exact search."""
    if stage not in ("val", "test"):
        raise RecsysError(f"stage must be 'val' or 'test', got '{stage}'")
    cfg, module, ds, split, items, keys, index = run_index(target, spec, rebuild, progress)
    check_lengths(cfg, module)
    if module.sequence:  # the sequence tower over the cached vectors of each user's last N items
        users = sequence_user_embeddings(module.user_tower, items, split, stage, cfg.train.eval_batch_size)
    else:
        tok = load_tokenizer(resolve_model_path(cfg.model.encoder))
        texts = [user_text(ds.item_texts, split.history(int(u), stage), cfg.data.history_items)
                 for u in split.eval_users]
        users = encode_texts(module.user_tower, tok, texts, cfg.data.user_max_tokens, cfg.train.eval_batch_size,
                             desc=f"encode users ({stage})", progress=progress)
    out = evaluate_index(users, keys, index, split, stage, cfg.train.eval_batch_size)
    return replace(out, index=replace(out.index, user_ids=ds.user_ids), exact=replace(out.exact, user_ids=ds.user_ids))


def online_request_index(run_dir: str | Path, spec: str | RetrievalConfig | None = None, seq_len: int | None = None,
                         overrides: list[str] | None = None, rebuild: bool = False, loaded: tuple | None = None
                         ) -> tuple[Callable[[], object], dict]:
    """One online request of a run through an index: its materialized user tower served at `compress.precision`
    (batch 1), then a search of the index over its real catalog — the index counterpart of
    `recsys.recipes.profile.online_request`, which calls it for a run whose `retrieval.index` is not exact (same
    returns: the call and the counted costs, plus `search`, the index search alone, and `index`). E.g. the stacked
    row: time `online_request_index(run, "hnsw,M=32,...", overrides=["compress.precision=int8"])` interleaved with
    `online_request(dense_run)`. `loaded`: the run's (config, module) when already loaded."""
    cfg, module, _, _, _, _, index = run_index(run_dir, spec, rebuild, progress=False, overrides=overrides,
                                               loaded=loaded)
    seq = seq_len or user_input_length(cfg.model, cfg.data)  # tokens, or a sequence tower's N items
    tower = materialize(module.user_tower)
    route = route_for(cfg.compress.precision, cfg.compress.int8_backend)
    user, search = index_request_calls(tower, seq, index, route, cfg.compress.quantize_layers)
    shape = tower.shape.replace(seq_len=seq, batch=1)
    c = online_cost(shape, index.n_items, index.cfg)
    extra = input_cost(tower, seq) if module.sequence else {"params": 0, "flops": 0}  # its input layers
    return request_call(user, index), {"params": c["user_params"] + extra["params"],
                                       "flops": c["flops"] + extra["flops"], "n_items": index.n_items,
                                       "shape": shape, "spec": index.spec, "search": search, "index": index}
