"""The evaluate recipe: full-ranking evaluation of a trained run (`recsys evaluate`), at its own input length or at
others (`input_length_grid`: the dense reference's token budget and history size chosen on validation), and the
tables that put a run beside the baselines.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from recsys.config import RunConfig
from recsys.data.registry import dataset_slug, load_data
from recsys.errors import RecsysError
from recsys.models.datamodule import RecDataModule
from recsys.models.encoder import load_tokenizer, resolve_model_path
from recsys.models.tower import encode_texts, tower_scorers
from recsys.retrieval.evaluate import EvalResult, evaluate
from recsys.retrieval.metrics import METRIC_COLUMNS
from recsys.runs import check_lengths, load_run
from recsys.tracking.records import markdown_table


def evaluate_module(module, dm, stages=("val", "test"), progress: bool = True) -> dict[str, EvalResult]:
    """Full-ranking evaluation of a two-tower module on `stages`: items encoded once, users in batches."""
    bs = module.train_cfg.eval_batch_size
    scorers = tower_scorers(module.user_tower, module.item_tower, dm.tokenizer, dm.item_texts, dm.split,
                            dm.data_cfg, stages, bs, progress)
    return {stage: evaluate(scorers[stage], dm.split, stage, bs, progress=progress) for stage in stages}


def evaluate_run(target: str | Path, stage: str = "test", progress: bool = True,
                 overrides: list[str] | None = None) -> EvalResult:
    """Re-evaluate a trained run (folder or checkpoint) on `stage` with the run's own config (and dotted
    `overrides`, e.g. data.user_max_tokens=64 to read shorter user texts)."""

    if stage not in ("val", "test"):
        raise RecsysError(f"stage must be 'val' or 'test', got '{stage}'")
    cfg, module = load_run(target, overrides)
    check_lengths(cfg, module)
    ds, split = load_data(cfg.data)
    dm = RecDataModule(ds, split, load_tokenizer(resolve_model_path(cfg.model.encoder)), cfg.data, cfg.train)
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
