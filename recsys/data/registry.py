"""Dataset names: where each dataset's files live, how to load them, what the downloader fetches.

Names are `synthetic`, `ml-100k`, `ml-1m`, `amazon2018:<Category>` (any Amazon Reviews 2018 category file
prefix, e.g. `amazon2018:Gift_Cards`), `mind` and `custom`. A dataset's folder is an explicit path if given,
else `<data dir>/<default folder>` with the data dir taken from the argument, `$RECSYS_DATA_DIR` or `./data`.
Loaders are named as `module:function` and imported on first use, so listing names imports nothing heavy.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.config import DataConfig
from recsys.data.dataset import RecDataset
from recsys.data.split import Split, hold_out_items, leave_last_out
from recsys.errors import RecsysError

DATA_DIR_ENV = "RECSYS_DATA_DIR"
DEFAULT_DATA_DIR = Path("data")
AMAZON = "amazon2018:<Category>"
_AMAZON_PREFIX = "amazon2018:"


@dataclass(frozen=True)
class DatasetSpec:
    """How to find and load one dataset."""

    loader: str  # "module:function"; called as loader(folder, **options) (synthetic: loader(seed=..., ...))
    folder: str | None  # default folder under the data dir; None: generated, or explicit path only
    archive: str | None  # what `recsys data download` fetches; None: not downloadable
    summary: str


DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(
        "recsys.data.synthetic:generate", None, None, "generated users, items and texts"
    ),
    "ml-100k": DatasetSpec("recsys.data.movielens:load_ml100k", "ml-100k", "ml-100k.zip", "MovieLens 100K"),
    "ml-1m": DatasetSpec("recsys.data.movielens:load_ml1m", "ml-1m", "ml-1m.zip", "MovieLens 1M"),
    AMAZON: DatasetSpec(
        "recsys.data.amazon:load_amazon2018",
        "amazon2018",
        "<Category>_5.json.gz, meta_<Category>.json.gz",
        "Amazon Reviews 2018, one category (5-core reviews + metadata)",
    ),
    "mind": DatasetSpec(
        "recsys.data.mind:load_mind", "mind", "MINDsmall_train.zip", "MIND small (train) news clicks"
    ),
    "custom": DatasetSpec(
        "recsys.data.custom:load_custom", None, None, "your own interactions.csv + items.csv (needs --path)"
    ),
}


def list_datasets() -> list[str]:
    """The dataset names, `amazon2018:<Category>` standing for every Amazon category."""
    return list(DATASETS)


def get_spec(name: str) -> tuple[DatasetSpec, dict[str, Any]]:
    """The spec for `name` and the options its name carries (the Amazon category)."""
    if name.startswith(_AMAZON_PREFIX):
        category = name[len(_AMAZON_PREFIX) :]
        if not re.fullmatch(r"[A-Za-z0-9_]+", category):
            raise RecsysError(
                f"dataset {name!r}: the category must be an Amazon 2018 file prefix such as 'Gift_Cards' "
                "(letters, digits, underscores)"
            )
        return DATASETS[AMAZON], {"category": category}
    if name in DATASETS and name != AMAZON:
        return DATASETS[name], {}
    known = list_datasets()
    candidates = {n.split(":")[0]: n for n in known}  # "amazon2018" stands for amazon2018:<Category>
    close = difflib.get_close_matches(name.split(":")[0], list(candidates), n=1)
    guess = f" (did you mean {candidates[close[0]]!r}?)" if close else ""
    raise RecsysError(f"unknown dataset {name!r}{guess}; known: {', '.join(known)}")


def require_file(folder: Path, filename: str, dataset: str) -> Path:
    """`folder/filename` if it is a file, else a RecsysError naming the missing path and how to get it."""
    path = Path(folder) / filename
    if path.is_file():
        return path
    spec, _ = get_spec(dataset)
    where = "" if Path(folder).is_dir() else f" (folder {folder} does not exist)"
    if spec.archive is not None:
        hint = f"run `recsys data download {dataset}` or pass --data-dir DIR"
    else:
        hint = (
            "pass --path DIR holding interactions.csv (user_id,item_id,timestamp), items.csv (item_id,text)"
        )
    raise RecsysError(f"{path}: file not found{where}; {hint}")


def resolve_folder(name: str, path: str | Path | None = None, data_dir: str | Path | None = None) -> Path:
    """`path` if given, else `<data_dir | $RECSYS_DATA_DIR | ./data>/<default folder of name>`."""
    spec, _ = get_spec(name)
    if path is not None:
        return Path(path).expanduser()
    if spec.folder is None:
        if name == "synthetic":
            raise RecsysError("dataset 'synthetic' is generated and has no folder")
        raise RecsysError(f"dataset {name!r} needs an explicit path (--path DIR)")
    base = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(base).expanduser() / spec.folder


def _import(target: str) -> Callable[..., RecDataset]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def load_dataset(
    name: str,
    path: str | Path | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    min_rating: float | None = None,
    **synthetic_options: Any,
) -> RecDataset:
    """Load dataset `name` (see `list_datasets`); `synthetic_options` go to the synthetic generator only."""
    spec, options = get_spec(name)
    loader = _import(spec.loader)
    if name == "synthetic":
        if path is not None or min_rating is not None:
            raise RecsysError("dataset 'synthetic' is generated: it takes no path and no min_rating")
        try:
            inspect.signature(loader).bind(seed=seed, **synthetic_options)
        except TypeError as e:
            raise RecsysError(f"dataset 'synthetic': bad option ({e})") from None
        return loader(seed=seed, **synthetic_options)
    if synthetic_options:
        raise RecsysError(
            f"options {', '.join(sorted(synthetic_options))} apply to 'synthetic' only, not {name!r}"
        )
    if min_rating is not None:
        if name not in ("ml-100k", "ml-1m"):
            raise RecsysError(
                f"min_rating applies to ml-100k and ml-1m only, not {name!r} (implicit feedback)"
            )
        options["min_rating"] = min_rating
    return loader(resolve_folder(name, path, data_dir), **options)


def load_data(cfg: DataConfig) -> tuple[RecDataset, Split]:
    """The dataset a run config names, and its leave-last-out split."""
    extra = {"n_users": cfg.synthetic_users, "n_items": cfg.synthetic_items} if cfg.name == "synthetic" else {}
    ds = load_dataset(cfg.name, path=cfg.path, data_dir=cfg.data_dir, seed=cfg.seed, min_rating=cfg.min_rating,
                      **extra)
    dropped = ds.info.get("dropped_no_text", 0)
    if dropped:  # it can change a user's held-out item: say so wherever the data is used, not only in `data stats`
        print(f"warning: dataset '{cfg.name}': {dropped} interactions dropped because their item has no text "
              f"({len(ds.item_texts)} items with text kept)", file=sys.stderr)
    split = hold_out_items(leave_last_out(ds), cfg.cold_items, cfg.cold_seed)  # cold start: data.cold_items
    if len(split.eval_users) == 0:
        raise RecsysError(f"dataset '{cfg.name}': no user has the 3 interactions needed for evaluation")
    warn_masked_targets(split, cfg.name)
    return ds, split


MASKED_WARNING = 0.05  # a share of evaluated users above this, whose target their own history masks, is said aloud


def masked_targets(split: Split) -> dict[str, float]:
    """Per stage, the share of evaluated users whose held-out target is an item of their own history. Evaluation
    masks history items, so such a target can never be ranked: a user like that scores 0 in every model (e.g.
    duplicated (user, item, timestamp) rows make every test target equal its validation item)."""
    users = split.eval_users
    out = {}
    for stage in ("val", "test"):
        seen = split.matrix(stage)  # [n_users, n_items] what the user's history holds at this stage
        hit = np.asarray(seen[users, split.target(stage)[users]]).ravel() > 0
        out[stage] = float(hit.mean()) if len(users) else 0.0
    return out


def warn_masked_targets(split: Split, name: str, shares: dict[str, float] | None = None) -> None:
    """One warning line when a stage's masked-target share (see masked_targets) is above MASKED_WARNING."""
    shares = masked_targets(split) if shares is None else shares
    high = {s: v for s, v in shares.items() if v > MASKED_WARNING}
    if high:
        n = len(split.eval_users)
        said = ", ".join(f"{'validation' if s == 'val' else 'test'} {v:.0%} ({round(v * n)} of {n})"
                         for s, v in high.items())
        print(f"warning: dataset '{name}': the held-out target of evaluated users is an item of their own history, "
              f"which evaluation masks (it can never be ranked: those users score 0): {said}; duplicated "
              f"(user, item, timestamp) rows?", file=sys.stderr)


def dataset_slug(cfg: DataConfig) -> str:
    """The dataset as a folder name (results/baselines/<slug>/, run names): `data.label` if set; a `custom`
    dataset by its folder's name (`custom-<folder>`: two custom datasets never share results); else its name."""
    if cfg.label:
        return cfg.label
    if cfg.name == "custom" and cfg.path:
        folder = Path(cfg.path).expanduser().resolve().name
        return f"custom-{folder}" if folder else "custom"
    return cfg.name.replace(":", "_").replace("/", "_")


def data_identity(cfg: DataConfig) -> dict:
    """What decides which interactions a run evaluates on, recorded with results read back by another command
    (`recsys train` prints the baselines of the same data only): the dataset, its resolved folder, the rating
    filter, and a synthetic dataset's seed and size."""
    out: dict[str, Any] = {"name": cfg.name, "min_rating": cfg.min_rating}
    if cfg.name == "synthetic":
        out.update(seed=cfg.seed, users=cfg.synthetic_users, items=cfg.synthetic_items)
    else:
        try:
            out["path"] = str(resolve_folder(cfg.name, cfg.path, cfg.data_dir).resolve())
        except RecsysError:
            out["path"] = None
    return out
