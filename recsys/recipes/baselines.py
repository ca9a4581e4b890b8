"""The baselines recipe (`recsys baselines`): Popularity, ItemKNN and EASE^R (`recsys.retrieval.baselines`, their
hyper-parameters chosen on validation) and the zero-shot encoder, through the same full-ranking evaluation as
every model; writes results/baselines/<dataset>/ (CSV, Markdown, per-user CSVs, record).
"""
from __future__ import annotations

from pathlib import Path

from recsys.config import ModelConfig
from recsys.data.registry import data_identity, dataset_slug, load_data
from recsys.data.split import Split
from recsys.errors import RecsysError
from recsys.models.encoder import load_tokenizer, resolve_model_path
from recsys.models.sasrec import run_sasrec
from recsys.models.tower import tower_scorers
from recsys.models.two_tower import build_tower
from recsys.retrieval.baselines import check_ease, run_ease, run_itemknn, run_popularity
from recsys.retrieval.evaluate import EvalResult, evaluate
from recsys.retrieval.metrics import METRIC_COLUMNS
from recsys.tracking.records import environment_record, markdown_table, staged_dir, write_json


def run_zero_shot(dataset, split: Split, data_cfg, encoder: str = "minilm",
                  progress: bool = True) -> tuple[EvalResult, dict]:
    """The untrained encoder (mean pooling, cosine) on the same user/item texts as the two-tower."""
    tower = build_tower(encoder, ModelConfig(encoder=encoder))
    tok = load_tokenizer(resolve_model_path(encoder))
    scorers = tower_scorers(tower, tower, tok, dataset.item_texts, split, data_cfg, progress=progress)
    val = evaluate(scorers["val"], split, "val", progress=progress)
    test = evaluate(scorers["test"], split, "test", progress=progress)
    return test, {"encoder": encoder, "val": val.metrics}


BASELINES = ("popularity", "itemknn", "ease", "zero_shot")  # what `recsys baselines` runs by default
TRAINED = ("sasrec",)  # on request (--models ...,sasrec): trained, a grid chosen on validation (recsys.models.sasrec)


def run_baselines(cfg, models=BASELINES, progress: bool = True) -> dict:
    """Evaluate baselines on `cfg.data` (a RunConfig); write results/baselines/<dataset>/ (CSV, Markdown,
    per-user CSVs, record). Returns {model: {metrics..., hyper-parameters...}}."""
    unknown = [m for m in models if m not in BASELINES + TRAINED]
    if unknown:
        raise RecsysError(f"unknown baseline '{unknown[0]}' (known: {', '.join(BASELINES + TRAINED)})")
    ds, split = load_data(cfg.data)
    if "ease" in models:  # refused before anything is written when the catalog is too large for a dense N×N fit
        check_ease(split.n_items, cfg.baselines.ease_max_items)
    runners = {
        "popularity": lambda: run_popularity(split, progress),
        "itemknn": lambda: run_itemknn(split, progress=progress),
        "ease": lambda: run_ease(split, progress=progress, max_items=cfg.baselines.ease_max_items),
        "zero_shot": lambda: run_zero_shot(ds, split, cfg.data, cfg.model.encoder, progress),
        "sasrec": lambda: run_sasrec(split, cfg.sasrec, progress),
    }
    final = Path(cfg.tracking.results_dir) / "baselines" / dataset_slug(cfg.data)
    out, rows = {}, []
    with staged_dir(final) as folder:
        for name in models:
            test, info = runners[name]()
            test.write_per_user(folder / f"per_user_{name}.csv", ds.user_ids)
            out[name] = {**test.metrics, **{k: v for k, v in info.items() if k not in ("val", "grid")},
                         "val_ndcg@10": info.get("val", {}).get("ndcg@10")}
            rows.append({"model": name, **out[name]})
        columns = ["model", *METRIC_COLUMNS]
        with open(folder / "baselines.csv", "w") as f:
            f.write(",".join(columns) + ",hyperparameters\n")
            for r in rows:
                hp = ";".join(f"{k}={v}" for k, v in out[r["model"]].items()
                              if k in ("k", "lambda", "encoder", "hidden", "dropout", "max_len"))
                f.write(",".join(str(r[c]) for c in columns) + f",{hp}\n")
        (folder / "baselines.md").write_text(markdown_table(rows, columns) + "\n")
        write_json(folder / "baselines.json", {"dataset": cfg.data.name, "data": data_identity(cfg.data),
                                               "models": out, "users_evaluated": int(len(split.eval_users))})
        write_json(folder / "record.json", {**environment_record(), "dataset": ds.stats()})
    return out
