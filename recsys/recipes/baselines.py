"""The baselines recipe (`recsys baselines`): Popularity, ItemKNN and EASE^R (`recsys.retrieval.baselines`, their
hyper-parameters chosen on validation) and the zero-shot encoder, through the same full-ranking evaluation as
every model; writes results/baselines/<dataset>/ (CSV, Markdown, per-user CSVs, record).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import threading
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
    per-user CSVs, record). Returns {model: {metrics..., hyper-parameters...}}.

    Each model's row is written as it finishes (`<dataset>.partial/row_<model>.json` with its per-user CSV): a run
    stopped (SIGTERM, Ctrl-C, an error) keeps the models it finished there and no lock, says so in one line, and the
    same command runs only the models still missing (finished rows of the same data and settings are reused)."""
    unknown = [m for m in models if m not in BASELINES + TRAINED]
    if unknown:
        raise RecsysError(f"unknown baseline '{unknown[0]}' (known: {', '.join(BASELINES + TRAINED)})")
    ds, split = load_data(cfg.data)
    if "ease" in models:  # refused before anything is written when the catalog is too large for a dense N×N fit
        check_ease(split.n_items, cfg.baselines.ease_max_items)
    knn_ks = tuple(k or None for k in cfg.baselines.itemknn_k)  # 0 = all neighbours
    runners = {
        "popularity": lambda: run_popularity(split, progress),
        "itemknn": lambda: run_itemknn(split, grid=knn_ks, progress=progress),
        "ease": lambda: run_ease(split, grid=tuple(cfg.baselines.ease_lambdas), progress=progress,
                                 max_items=cfg.baselines.ease_max_items),
        "zero_shot": lambda: run_zero_shot(ds, split, cfg.data, cfg.model.encoder, progress),
        "sasrec": lambda: run_sasrec(split, cfg.sasrec, progress),
    }
    final = Path(cfg.tracking.results_dir) / "baselines" / dataset_slug(cfg.data)
    # what decides a finished model's row: a partial row is reused only under the same settings
    settings = {k: v for k, v in cfg.to_dict().items() if k in ("data", "model", "baselines", "sasrec")}
    keep = (STATE, *(f for m in models for f in (f"row_{m}.json", f"per_user_{m}.csv")))
    out, rows, done = {}, [], []
    with staged_dir(final, keep=keep, resume=True) as folder, stopped_by_sigterm():
        _reuse_or_clear(folder, settings)
        write_json(folder / STATE, settings)
        try:
            for name in models:
                row_file = folder / f"row_{name}.json"
                if row_file.is_file() and (folder / f"per_user_{name}.csv").is_file():
                    out[name] = json.loads(row_file.read_text())
                    print(f"{name}: finished in an earlier run (reused from {folder})", flush=True)
                else:
                    test, info = runners[name]()
                    test.write_per_user(folder / f"per_user_{name}.csv", ds.user_ids)
                    out[name] = {**test.metrics, **{k: v for k, v in info.items() if k not in ("val", "grid")},
                                 "val_ndcg@10": info.get("val", {}).get("ndcg@10")}
                    write_json(row_file, out[name])  # atomically: the row survives a stop from here on
                done.append(name)
                rows.append({"model": name, **out[name]})
        except BaseException as e:
            if done:
                print(f"baselines stopped ({_why(e)}): {', '.join(done)} finished, kept in {folder}; the same "
                      f"command runs only the rest", file=sys.stderr, flush=True)
            else:  # nothing to keep: the staged folder goes entirely
                (folder / STATE).unlink(missing_ok=True)
            raise
        for name in models:
            (folder / f"row_{name}.json").unlink()
        (folder / STATE).unlink()
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


STATE = "baselines_state.json"  # in a stopped run's partial folder: the settings its finished rows were made with


def _reuse_or_clear(folder: Path, settings: dict) -> None:
    """A partial folder left by a stopped run keeps its finished rows when they were made with these settings;
    anything else in it (another run's rows, other settings) is removed (the folder is ours: `<final>.partial`)."""
    state = folder / STATE
    try:
        same = json.loads(state.read_text()) == json.loads(json.dumps(settings))
    except (OSError, ValueError):
        same = False
    if same:
        return
    for f in folder.iterdir():
        shutil.rmtree(f) if f.is_dir() else f.unlink()


def _why(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return str(e) or "interrupted"
    return f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (so every `finally` and staged folder cleans up as for Ctrl-C)."""


@contextlib.contextmanager
def stopped_by_sigterm():
    """While the block runs, SIGTERM raises `Terminated` instead of killing the process outright (main thread
    only; the previous handler is restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
