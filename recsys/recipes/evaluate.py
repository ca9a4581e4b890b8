"""The evaluate recipe: full-ranking evaluation of a trained run (`recsys evaluate`), at its own input length or at
others (`input_length_grid`: the dense reference's token budget and history size chosen on validation), and the
tables that put a run beside the baselines.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from recsys.config import RunConfig
from recsys.data.registry import dataset_slug, load_data
from recsys.errors import RecsysError
from recsys.models.datamodule import RecDataModule
from recsys.models.encoder import load_tokenizer, resolve_model_path
from recsys.models.tower import encode_texts, tower_scorers
from recsys.retrieval.evaluate import EvalResult, evaluate
from recsys.retrieval.metrics import METRIC_COLUMNS
from recsys.runs import check_lengths, load_run
from recsys.serving.materialize import materialize
from recsys.serving.quantize import simulate_int8
from recsys.tracking.records import markdown_table


def evaluate_module(module, dm, stages=("val", "test"), progress: bool = True) -> dict[str, EvalResult]:
    """Full-ranking evaluation of a two-tower module on `stages`: items encoded once, users in batches."""
    bs = module.train_cfg.eval_batch_size
    scorers = tower_scorers(module.user_tower, module.item_tower, dm.tokenizer, dm.item_texts, dm.split,
                            dm.data_cfg, stages, bs, progress)
    return {stage: evaluate(scorers[stage], dm.split, stage, bs, progress=progress) for stage in stages}


def served_tower(tower, cfg: RunConfig):
    """The tower as its route serves it, for evaluation: materialized, int8 simulated as its kernels compute
    (ONNX Runtime's scheme to 1e-5; torchao's real kernels), bf16 cast; fp32 as it is."""
    precision, backend = cfg.compress.precision, cfg.compress.int8_backend
    compact = materialize(tower) if tower.gates is not None else tower
    if precision == "int8":
        return simulate_int8(compact, cfg.compress.quantize_layers, backend)
    return compact.to(torch.bfloat16) if precision == "bf16" else compact


def evaluate_run(target: str | Path, stage: str = "test", progress: bool = True,
                 overrides: list[str] | None = None, served: bool = False) -> EvalResult:
    """Re-evaluate a trained run (folder or checkpoint) on `stage` with the run's own config (and dotted
    `overrides`, e.g. data.user_max_tokens=64 to read shorter user texts). `served`: the towers as
    compress.precision serves them (e.g. overrides compress.precision=int8 compress.int8_backend=onnxruntime:
    the accuracy of post-training int8)."""
    if stage not in ("val", "test"):
        raise RecsysError(f"stage must be 'val' or 'test', got '{stage}'")
    cfg, module = load_run(target, overrides)
    check_lengths(cfg, module)
    ds, split = load_data(cfg.data)
    dm = RecDataModule(ds, split, load_tokenizer(resolve_model_path(cfg.model.encoder)), cfg.data, cfg.train)
    if served:
        user = served_tower(module.user_tower, cfg)
        item = user if module.item_tower is module.user_tower else served_tower(module.item_tower, cfg)
        scorer = tower_scorers(user, item, dm.tokenizer, dm.item_texts, split, cfg.data, (stage,),
                               cfg.train.eval_batch_size, progress)[stage]
        return replace(evaluate(scorer, split, stage, cfg.train.eval_batch_size, progress=progress),
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
    return [{"model": k, **v} for k, v in json.loads(path.read_text())["models"].items()]
