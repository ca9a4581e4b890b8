"""The evaluate recipe: full-ranking evaluation of a trained run (`recsys evaluate`), at its own input length or at
others (`input_length_grid`: the dense reference's token budget and history size chosen on validation), and the
tables that put a run beside the baselines.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from recsys.config import RunConfig
from recsys.data.registry import data_identity, dataset_slug, load_data
from recsys.efficiency.device import resolve_device
from recsys.errors import RecsysError
from recsys.models.datamodule import RecDataModule
from recsys.models.encoder import load_tokenizer, resolve_model_path
from recsys.models.item_encoder import catalog_vectors
from recsys.models.sequence_tower import sequence_scorers
from recsys.models.tower import encode_texts, tower_scorers
from recsys.retrieval.cold import choose_cold_offset, with_cold_offset
from recsys.retrieval.distributed import evaluate_sharded, gather_rows, shard, world
from recsys.retrieval.evaluate import EvalResult, embedding_scorer, evaluate
from recsys.retrieval.metrics import METRIC_COLUMNS
from recsys.runs import check_lengths, load_run
from recsys.serving.materialize import materialize
from recsys.serving.quantize import simulate_int8
from recsys.tracking.records import markdown_table


def evaluate_module(module, dm, stages=("val", "test"), progress: bool = True) -> dict[str, EvalResult]:
    """Full-ranking evaluation of a two-tower module on `stages`: items encoded once, users in batches, on the
    module's device. In a process group of several ranks (after a DDP or DeepSpeed fit) every rank encodes and
    ranks its shard and all get the whole result (`evaluate_module_sharded`, without the cold-start offset).
    Under the cold-start protocol the scores of never-trained items are calibrated as `train.cold_offset` says
    (`evaluate_scorers`)."""
    if module.sequence:
        return evaluate_sequence_module(module.user_tower, module, dm, stages, progress)
    if world()[1] > 1:
        return evaluate_module_sharded(module, dm, stages)
    bs = module.train_cfg.eval_batch_size
    scorers = tower_scorers(module.user_tower, module.item_tower, dm.tokenizer, dm.item_texts, dm.split,
                            dm.data_cfg, _with_val(stages, module, dm), bs, progress)
    return evaluate_scorers(scorers, dm.split, stages, bs, progress, module.train_cfg.cold_offset,
                            module.train_cfg.cold_offset_tolerance)


def evaluate_sequence_module(user_tower, module, dm, stages=("val", "test"),
                             progress: bool = True) -> dict[str, EvalResult]:
    """A sequence user tower (`user_tower`: the module's, or as served) on `stages`: the catalog encoded once by
    the item tower (a frozen one's cache as it is), each user's last N items looked up in it (one process)."""
    bs = module.train_cfg.eval_batch_size
    items = catalog_vectors(module, dm.item_texts, dm.tokenizer, dm.data_cfg, bs, progress)
    scorers = sequence_scorers(user_tower, items, dm.split, _with_val(stages, module, dm), bs)
    return evaluate_scorers(scorers, dm.split, stages, bs, progress, module.train_cfg.cold_offset,
                            module.train_cfg.cold_offset_tolerance)


def _with_val(stages, module, dm) -> tuple[str, ...]:
    """`stages`, plus validation where the cold-start offset is chosen on it."""
    calibrate = module.train_cfg.cold_offset == "val" and len(dm.split.cold)
    return tuple(dict.fromkeys(("val", *stages))) if calibrate else tuple(stages)


def evaluate_scorers(scorers: dict, split, stages, batch_size: int, progress: bool = True,
                     cold_offset: str = "none", tolerance: float = 0.0) -> dict[str, EvalResult]:
    """Each of `stages` ranked with its scorer. Under the cold-start protocol with `cold_offset="val"`, the
    never-trained items' scores get the offset with the best validation NDCG@10 (recsys/retrieval/cold.py) on
    every stage; each result's `cold_offset` records it, its grid and the stage's uncalibrated metrics."""
    calibration = None
    if cold_offset == "val" and len(split.cold):
        beta, table = choose_cold_offset(scorers["val"], split, "val", tolerance, batch_size=batch_size)
        calibration = {"beta": beta, "tolerance": tolerance, "grid": table,
                       "chosen_on": "val ndcg@10" if not tolerance else
                       f"val cold/ndcg@10 within {tolerance:.0%} of the best val ndcg@10"}
    out = {}
    for stage in stages:
        raw = evaluate(scorers[stage], split, stage, batch_size, progress=progress)
        if calibration is None:
            out[stage] = raw
            continue
        result = evaluate(with_cold_offset(scorers[stage], split.cold_mask(), calibration["beta"]), split, stage,
                          batch_size, progress=progress) if calibration["beta"] else raw
        out[stage] = replace(result, cold_offset={**calibration, "uncalibrated": raw.metrics})
    return out


def evaluate_module_sharded(module, dm, stages=("val", "test")) -> dict[str, EvalResult]:
    """`evaluate_module` split over the ranks of a process group: each rank encodes a shard of the catalog
    (gathered: every rank ranks against all items) and its shard of the evaluated users, whose ranks are gathered
    (recsys.retrieval.distributed): the same per-user ranks, hence the same metrics, as one process."""
    rank, n = world()
    bs, data, split = module.train_cfg.eval_batch_size, dm.data_cfg, dm.split
    device = next(module.user_tower.parameters()).device
    texts = dm.item_texts[shard(len(dm.item_texts), rank, n, "catalog items")]
    items = gather_rows(encode_texts(module.item_tower, dm.tokenizer, texts, data.item_max_tokens, bs,
                                     progress=False).to(device))  # [N, d]
    users = split.eval_users[shard(len(split.eval_users), rank, n)]  # this rank's users
    out = {}
    for stage in stages:
        user_texts = [dm.user_text(int(u), stage) for u in users]
        emb = encode_texts(module.user_tower, dm.tokenizer, user_texts, data.user_max_tokens, bs,
                           progress=False).to(device)  # [U_r, d]
        out[stage] = evaluate_sharded(embedding_scorer(emb, users, split.n_users, items), split, stage, bs)
    return out


def served_tower(tower, cfg: RunConfig):
    """The tower as its route serves it, for evaluation: materialized, int8 simulated as its kernels compute
    (ONNX Runtime's scheme to 1e-5; torchao's real kernels), bf16 cast; fp32 as it is."""
    precision, backend = cfg.compress.precision, cfg.compress.int8_backend
    compact = materialize(tower) if tower.gates is not None else tower
    if precision == "int8":
        return simulate_int8(compact, cfg.compress.quantize_layers, backend)
    return compact.to(torch.bfloat16) if precision == "bf16" else compact


def evaluate_run(target: str | Path, stage: str = "test", progress: bool = True,
                 overrides: list[str] | None = None, served: bool = False, device: str = "cpu") -> EvalResult:
    """Re-evaluate a trained run (folder or checkpoint) on `stage` with the run's own config (and dotted
    `overrides`, e.g. data.user_max_tokens=64 to read shorter user texts). `served`: the towers as
    compress.precision serves them (e.g. overrides compress.precision=int8 compress.int8_backend=onnxruntime:
    the accuracy of post-training int8). `device`: where the towers encode and the catalog is ranked (cpu,
    cuda, auto)."""
    if stage not in ("val", "test"):
        raise RecsysError(f"stage must be 'val' or 'test', got '{stage}'")
    cfg, module = load_run(target, overrides, resolve_device(device))
    check_lengths(cfg, module)
    ds, split = load_data(cfg.data)
    dm = RecDataModule(ds, split, load_tokenizer(resolve_model_path(cfg.model.encoder)), cfg.data, cfg.train)
    if served and module.sequence:
        result = evaluate_sequence_module(served_tower(module.user_tower, cfg), module, dm, (stage,), progress)
        return replace(result[stage], user_ids=ds.user_ids)
    if served:
        user = served_tower(module.user_tower, cfg)
        item = user if module.item_tower is module.user_tower else served_tower(module.item_tower, cfg)
        scorers = tower_scorers(user, item, dm.tokenizer, dm.item_texts, split, cfg.data,
                                _with_val((stage,), module, dm), cfg.train.eval_batch_size, progress)
        return replace(evaluate_scorers(scorers, split, (stage,), cfg.train.eval_batch_size, progress,
                                        cfg.train.cold_offset, cfg.train.cold_offset_tolerance)[stage],
                       user_ids=ds.user_ids)
    return replace(evaluate_module(module, dm, (stage,), progress)[stage], user_ids=ds.user_ids)


def input_length_grid(target: str | Path, tokens: list[int], history: list[int], stage: str = "val",
                      progress: bool = False) -> list[dict]:
    """A trained run evaluated on `stage` at other input lengths, without retraining: for every history size h
    and token budget t, user texts of the last h items cut at t tokens (items encoded once). The dense
    reference's input length is a hyper-parameter like any other: choose it on validation with this."""
    cfg, module = load_run(target)
    ds, split = load_data(cfg.data)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.encoder))
    bs = cfg.train.eval_batch_size
    items = encode_texts(module.item_tower, tokenizer, ds.item_texts, cfg.data.item_max_tokens, bs,
                         desc="encode items", progress=progress)
    rows = []
    for h in history:
        for t in tokens:
            data = replace(cfg.data, user_max_tokens=t, history_items=h)
            check_lengths(replace(cfg, data=data), module)
            scorer = tower_scorers(module.user_tower, module.item_tower, tokenizer, ds.item_texts, split, data,
                                   (stage,), bs, progress, item_emb=items)[stage]
            rows.append({"user_max_tokens": t, "history_items": h,
                         **evaluate(scorer, split, stage, bs, progress=progress).metrics})
    return rows


def results_table(rows: list[dict]) -> str:
    return markdown_table(rows, ["model", *METRIC_COLUMNS])


def baseline_rows(cfg: RunConfig) -> list[dict]:
    """The baselines' test metrics for this dataset, if `recsys baselines` has been run."""
    import json
    path = Path(cfg.tracking.results_dir) / "baselines" / dataset_slug(cfg.data) / "baselines.json"
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    if saved.get("data", data_identity(cfg.data)) != data_identity(cfg.data):  # (older files: no record)
        return []  # the baselines of other data under the same folder name (e.g. another data.label's)
    return [{"model": k, **v} for k, v in saved["models"].items()]
