"""A trained run searched through a retrieval index: its catalog's item embeddings, its users' query vectors and
built indexes cached per run and spec, evaluation through the index (`recsys evaluate RUN --index SPEC`), and its
online request (user tower + index search) for benchmarks and sweeps.

Index quality is measured on the run's own user queries: validation users to choose (an index with
`retrieval.recall` is tuned on them: `recsys.retrieval.index_tuning`; a `probe=queries` IVF fits its probe vectors
to them: `recsys.retrieval.query_aware`), test users to report. The tuned setting and its measured recall are
recorded with the run, in `<run>/index_tuning.json` (one entry per index and target), and reused while the run
and its catalog are unchanged.

Cache: `<results>/cache/index/<run name>/` beside `<results>/runs/<run name>/` — `items-<fingerprint>.pt`,
`users-<stage>-<key>.pt` and one folder per built index (`recsys.retrieval.index.build_key`). The fingerprint
hashes the run's checkpoint bytes, its item texts and item token budget: a cached index built before the run
changed is refused in one line (`--rebuild-index` builds it again); a truncated or corrupt one is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from recsys.config import RetrievalConfig, RunConfig, parse_index_spec
from recsys.data.registry import load_data
from recsys.data.text import user_text
from recsys.efficiency.cost import online_cost
from recsys.efficiency.index_cost import search_cost
from recsys.errors import RecsysError
from recsys.models.encoder import load_tokenizer, resolve_model_path
from recsys.models.sequence_tower import input_cost, sequence_user_embeddings, user_input_length
from recsys.models.tower import encode_texts
from recsys.retrieval.index import ItemIndex, build_index, build_key, cached_index, exact_topk, set_search_params
from recsys.retrieval.index_eval import IndexEval, evaluate_index
from recsys.retrieval.index_tuning import RECALL_K, Tuning, ann_recall, tune_index
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
        try:
            return torch.load(path, weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError):  # truncated or corrupt: encode again
            print(f"warning: {path}: truncated or corrupt: encoding the catalog again", file=sys.stderr, flush=True)
    tok = load_tokenizer(resolve_model_path(cfg.model.encoder))
    items = encode_texts(module.item_tower, tok, item_texts, cfg.data.item_max_tokens, cfg.train.eval_batch_size,
                         desc="encode items", progress=progress)
    _save(items, path)
    return items


def _save(tensor: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensor, path.with_suffix(".partial"))
    path.with_suffix(".partial").replace(path)


def queries_key(cfg: RunConfig, fingerprint: str, stage: str) -> str:
    """What a run's user vectors at `stage` depend on: its fingerprint, data and model sections (history length,
    token budgets, the user tower's settings)."""
    blob = json.dumps([fingerprint, stage, asdict(cfg.data), asdict(cfg.model)], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def user_queries(module, cfg: RunConfig, ds, split, items: torch.Tensor, stage: str, cache: Path, fingerprint: str,
                 progress: bool = True) -> torch.Tensor:
    """[U, d] the run's user vectors for `split.eval_users` at `stage` — the queries its index answers, as its
    evaluation computes them (a text tower over each user's history text, a sequence tower over the cached vectors
    of the last N items) — cached under `cache`."""
    path = cache / f"users-{stage}-{queries_key(cfg, fingerprint, stage)[:16]}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError):
            print(f"warning: {path}: truncated or corrupt: encoding the users again", file=sys.stderr, flush=True)
    check_lengths(cfg, module)
    if module.sequence:  # the sequence tower over the cached vectors of each user's last N items
        users = sequence_user_embeddings(module.user_tower, items, split, stage, cfg.train.eval_batch_size)
    else:
        tok = load_tokenizer(resolve_model_path(cfg.model.encoder))
        texts = [user_text(ds.item_texts, split.history(int(u), stage), cfg.data.history_items)
                 for u in split.eval_users]
        users = encode_texts(module.user_tower, tok, texts, cfg.data.user_max_tokens, cfg.train.eval_batch_size,
                             desc=f"encode users ({stage})", progress=progress)
    users = users.float()
    _save(users, path)
    return users


TUNING_FILE = "index_tuning.json"  # in the run folder: the settings tuned to a recall target, and their recall


def tuning_key(cfg: RetrievalConfig) -> str:
    """One entry of index_tuning.json per built index and recall target."""
    return f"{build_key(cfg)}-recall={cfg.recall}"


def tuned_index(run_dir: Path, index: ItemIndex, queries: torch.Tensor, keys: torch.Tensor, fingerprint: str,
                qkey: str) -> ItemIndex:
    """`index` searched with the smallest nprobe / efSearch reaching `index.cfg.recall` on the validation user
    queries [U, d] — read from `<run>/index_tuning.json` when tuned before on the same run and queries, else
    tuned now and recorded there."""
    path = run_dir / TUNING_FILE
    try:
        records = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        print(f"warning: {path}: corrupt: tuning again", file=sys.stderr, flush=True)
        records = {}
    key = tuning_key(index.cfg)
    rec = records.get(key) if isinstance(records, dict) else None
    if rec and rec.get("fingerprint") == fingerprint and rec.get("queries_key") == qkey:
        try:
            tuning = Tuning(**{k: v for k, v in rec.items() if k not in ("fingerprint", "queries_key")})
            out = set_search_params(index, replace(index.cfg, **{tuning.param: tuning.value}))
            out.tuning = tuning
            return out
        except (TypeError, ValueError):  # an entry of another version: tune again
            pass
    out, tuning = tune_index(index, queries, keys, what="validation users")
    out.tuning = tuning
    records = records if isinstance(records, dict) else {}
    records[key] = {**tuning.to_dict(), "fingerprint": fingerprint, "queries_key": qkey}
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)
    return out


@dataclass
class Searched:
    """A run opened for search: what `run_index` returns, and what its user queries are cached by."""

    cfg: RunConfig
    module: object
    ds: object
    split: object
    items: torch.Tensor  # [N, d] item-tower embeddings
    keys: torch.Tensor  # [N, d] what users are scored against (and the index holds)
    index: ItemIndex
    run_dir: Path
    fingerprint: str
    cache: Path

    def queries(self, stage: str, progress: bool = False) -> torch.Tensor:
        """[U, d] the run's user vectors at `stage` (cached)."""
        return user_queries(self.module, self.cfg, self.ds, self.split, self.items, stage, self.cache,
                            self.fingerprint, progress)


def open_search(target: str | Path, spec: str | RetrievalConfig | None = None, rebuild: bool = False,
                progress: bool = True, overrides: list[str] | None = None, loaded: tuple | None = None) -> Searched:
    """A run searched through `spec` (its own `retrieval` section when None); `loaded`: the run's (config, module)
    when the caller has loaded it already. The keys are the item-tower embeddings, through a sequence user tower's
    adaptor when it has one. An index with `probe=queries` is fitted to the run's validation user queries, one with
    a `recall` target tuned on them (`index.tuning` says what was chosen)."""
    run_dir, ckpt = run_paths(target)
    cfg, module = loaded or load_run(run_dir, overrides)
    index_cfg = resolve_index(spec, cfg)
    ds, split = load_data(cfg.data)
    fingerprint = run_fingerprint(ckpt, cfg, ds.item_texts)
    cache = index_cache(run_dir)
    items = catalog_embeddings(module, cfg, ds.item_texts, cache, fingerprint, progress)
    keys = item_keys(module, items)
    val = None
    if index_cfg.probe == "queries" or index_cfg.recall:
        val = user_queries(module, cfg, ds, split, items, "val", cache, fingerprint, progress)
    qkey = queries_key(cfg, fingerprint, "val")
    source = fingerprint if index_cfg.probe == "centroids" else f"{fingerprint}+{qkey}"  # fitted to these queries
    if index_cfg.cache:
        index = cached_index(cache, keys, index_cfg, source, rebuild=rebuild, seed=cfg.train.seed, queries=val)
    else:
        index = build_index(keys, index_cfg, seed=cfg.train.seed, queries=val)
    if index_cfg.recall:
        index = tuned_index(run_dir, index, val, keys, fingerprint, qkey)
    return Searched(cfg, module, ds, split, items, keys, index, run_dir, fingerprint, cache)


def run_index(target: str | Path, spec: str | RetrievalConfig | None = None, rebuild: bool = False,
              progress: bool = True, overrides: list[str] | None = None, loaded: tuple | None = None):
    """(config, module, dataset, split, item-tower embeddings, keys, index) of a run searched through `spec`
    (`open_search`)."""
    r = open_search(target, spec, rebuild, progress, overrides, loaded)
    return r.cfg, r.module, r.ds, r.split, r.items, r.keys, r.index


@torch.inference_mode()
def item_keys(module, items: torch.Tensor) -> torch.Tensor:
    """[N, d] what users are scored against: a sequence tower's item representations (its adaptor), else `items`."""
    return module.user_tower.eval().represent_catalog(items) if module.sequence else items


def evaluate_run_index(target: str | Path, spec: str | RetrievalConfig | None = None, stage: str = "test",
                       rebuild: bool = False, progress: bool = True) -> IndexEval:
    """A run evaluated on `stage` through the index `spec` (and exactly, on the same user embeddings): full-ranking
    metrics from the index's candidates, its recall@10 / @100 against exact search on the stage's user queries
    (history masked, as ranked; and the index's own top-10 recall, unmasked), and how it was tuned (on validation
    users) when it has a recall target."""
    if stage not in ("val", "test"):
        raise RecsysError(f"stage must be 'val' or 'test', got '{stage}'")
    r = open_search(target, spec, rebuild, progress)
    users = r.queries(stage, progress)
    out = evaluate_index(users, r.keys, r.index, r.split, stage, r.cfg.train.eval_batch_size)
    return replace(out, index=replace(out.index, user_ids=r.ds.user_ids),
                   exact=replace(out.exact, user_ids=r.ds.user_ids))


def online_request_index(run_dir: str | Path, spec: str | RetrievalConfig | None = None, seq_len: int | None = None,
                         overrides: list[str] | None = None, rebuild: bool = False, loaded: tuple | None = None
                         ) -> tuple[Callable[[], object], dict]:
    """One online request of a run through an index: its materialized user tower served at `compress.precision`
    (batch 1), then a search of the index over its real catalog — the index counterpart of
    `recsys.recipes.profile.online_request`, which calls it for a run whose `retrieval.index` is not exact (same
    returns: the call and the counted costs, plus `search`, the index search alone, and `index`). E.g. the stacked
    row: time `online_request_index(run, "hnsw,M=32,...", overrides=["compress.precision=int8"])` interleaved with
    `online_request(dense_run)`. `loaded`: the run's (config, module) when already loaded."""
    r = open_search(run_dir, spec, rebuild, progress=False, overrides=overrides, loaded=loaded)
    cfg, module, index = r.cfg, r.module, r.index
    seq = seq_len or user_input_length(cfg.model, cfg.data)  # tokens, or a sequence tower's N items
    tower = materialize(module.user_tower)
    route = route_for(cfg.compress.precision, cfg.compress.int8_backend)
    user, search = index_request_calls(tower, seq, index, route, cfg.compress.quantize_layers)
    shape = tower.shape.replace(seq_len=seq, batch=1)
    c = online_cost(shape, index.n_items, index.cfg)
    extra = input_cost(tower, seq) if module.sequence else {"params": 0, "flops": 0}  # its input layers
    return request_call(user, index), {"params": c["user_params"] + extra["params"],
                                       "flops": c["flops"] + extra["flops"], "n_items": index.n_items,
                                       "shape": shape, "spec": index.spec, "search": search, "index": index,
                                       "index_term": index_term(r)}


def index_term(r: Searched) -> dict:
    """The index term of a run's online cost: its search work and memory (`recsys.efficiency.index_cost`) and its
    recall@10 against exact on the run's validation user queries (the tuned value's, when tuned)."""
    index = r.index
    if index.tuning is not None:
        recall = index.tuning.recall
    elif index.cfg.index == "exact":
        recall = 1.0
    else:
        val = r.queries("val")
        recall = ann_recall(index, val, exact_topk(val, r.keys.float(), RECALL_K, chunk=64).numpy())
    return search_cost(index.cfg, index.n_items, index.dim, recall, "validation users",
                       index.tuning.to_dict() if index.tuning is not None else None)
