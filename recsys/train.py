"""The train and evaluate recipes: typed functions behind `recsys train` and `recsys evaluate`.

`train(cfg)` fits a two-tower model, keeps the best checkpoint by validation NDCG@10, evaluates it on the test
split and writes `results/runs/<name>/` (resolved config, metrics, per-user metrics, CSV log, checkpoint,
environment record). A notebook can call these functions directly.
"""
from __future__ import annotations

import csv
import datetime as dt
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytorch_lightning as pl
import torch

from recsys.config import DataConfig, RunConfig, from_dict, read_yaml, save_config
from recsys.data.dataset import RecDataset
from recsys.data.split import Split, leave_last_out
from recsys.errors import RecsysError
from recsys.retrieval.evaluate import EvalResult, evaluate, tower_scorers
from recsys.tracking.records import environment_record, markdown_table, staged_dir, write_json

METRIC_COLUMNS = ["ndcg@10", "recall@10", "mrr@10", "ndcg@20", "recall@20"]


def load_data(cfg: DataConfig) -> tuple[RecDataset, Split]:
    from recsys.data.registry import load_dataset
    extra = {"n_users": cfg.synthetic_users, "n_items": cfg.synthetic_items} if cfg.name == "synthetic" else {}
    ds = load_dataset(cfg.name, path=cfg.path, data_dir=cfg.data_dir, seed=cfg.seed, min_rating=cfg.min_rating,
                      **extra)
    split = leave_last_out(ds)
    if len(split.eval_users) == 0:
        raise RecsysError(f"dataset '{cfg.name}': no user has the 3 interactions needed for evaluation")
    return ds, split


def dataset_slug(cfg: DataConfig) -> str:
    return cfg.name.replace(":", "_").replace("/", "_")


def evaluate_module(module, dm, stages=("val", "test"), progress: bool = True) -> dict[str, EvalResult]:
    """Full-ranking evaluation of a two-tower module on `stages`: items encoded once, users in batches."""
    bs = module.train_cfg.eval_batch_size
    scorers = tower_scorers(module.user_tower, module.item_tower, dm.tokenizer, dm.item_texts, dm.split,
                            dm.data_cfg, stages, bs, progress)
    return {stage: evaluate(scorers[stage], dm.split, stage, bs, progress=progress) for stage in stages}


class Throughput(pl.Callback):
    """Times training batches: examples/s of the optimisation steps, validation excluded."""

    def __init__(self):
        self.examples, self.seconds, self._t = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self._t
        self.examples += batch["user"]["input_ids"].shape[0]

    @property
    def rate(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


class Diverged(RecsysError):
    """The training loss became NaN or infinite."""


class StopOnDivergence(pl.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise Diverged(f"training diverged: loss is {float(loss)} at step {trainer.global_step}")


def _loggers(cfg: RunConfig, run_dir: Path, name: str) -> list:
    from pytorch_lightning.loggers import CSVLogger
    loggers = [CSVLogger(save_dir=str(run_dir), name="", version="log")]
    mode = os.environ.get("WANDB_MODE", cfg.tracking.wandb)
    if mode != "disabled":
        from pytorch_lightning.loggers import WandbLogger
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_SILENT", "true")
        # mode passed explicitly: wandb reads $WANDB_MODE once per process, so a W&B run started earlier in this
        # process (a sweep's summary) would otherwise fix it, online without a key
        loggers.append(WandbLogger(project=cfg.tracking.wandb_project, name=name, save_dir=str(run_dir),
                                   group=cfg.tracking.wandb_group, config=cfg.to_dict(), mode=mode))
    return loggers


def _trainer(**kwargs) -> pl.Trainer:
    """A Lightning Trainer; options Lightning rejects (accelerator, devices, strategy, precision) are user errors."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    try:
        return pl.Trainer(**kwargs)
    except (ValueError, TypeError, MisconfigurationException) as e:
        msg = " ".join(str(e).split())[:200]
        raise RecsysError(f"train.accelerator/devices/strategy/precision: Lightning rejected them ({msg})") from None


def _finish(trainer: pl.Trainer, status: str = "success") -> None:
    """Close the loggers; end the W&B run so the next `train` in this process starts its own."""
    for lg in trainer.loggers:
        lg.finalize(status)
        if type(lg).__name__ == "WandbLogger":
            import wandb
            wandb.finish(exit_code=0 if status == "success" else 1)


def check_lengths(cfg: RunConfig, module) -> None:
    """Token budgets within what the encoders can read (their position embeddings)."""
    for key, tower in (("user_max_tokens", module.user_tower), ("train_user_max_tokens", module.user_tower),
                       ("item_max_tokens", module.item_tower)):
        n, most = getattr(cfg.data, key), tower.encoder.shape.max_positions
        if n is not None and n > most:
            raise RecsysError(f"data.{key}: {n} tokens, but the encoder reads at most {most}")


def prepare_module(module, dm, cfg: RunConfig) -> None:
    """What the LightningModule needs from outside, prepared before fitting: a frozen item tower's catalog
    embeddings, and the dense model's importance scores (post-hoc pruning, or importance-initialised gates)."""
    from itertools import islice

    from recsys.efficiency.prune import init_gates_by_importance, prune_by_importance
    from recsys.models.tower import encode_texts

    if cfg.model.freeze_item_tower:
        module.set_item_cache(encode_texts(module.item_tower, dm.tokenizer, dm.item_texts, cfg.data.item_max_tokens,
                                           cfg.train.eval_batch_size, desc="encode items", progress=False))
    c = cfg.compress
    if c.prune_ratio is None and not c.importance_init:
        return
    batches = list(islice(dm.train_dataloader(), c.prune_batches))  # scored on the dense model's training loss
    if c.prune_ratio is not None:  # post-hoc: prune once by importance, then recover
        kept = prune_by_importance(module, batches, c.prune_ratio)
        print(f"pruned by importance: kept {kept}", flush=True)
    else:
        scores = init_gates_by_importance(module, batches, c.gate_init, c.importance_spread)
        print(f"gates initialised by importance: {', '.join(scores)}", flush=True)


def train(cfg: RunConfig, callbacks: list | None = None, test: bool = True) -> dict:
    """Fit, select the best checkpoint on validation NDCG@10 (a gated run: its final model), test it (unless
    `test` is False: a sweep tests only its Pareto trials, after the search), and write the run folder.
    `callbacks` are extra Lightning callbacks (a sweep's pruning reporter)."""
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    from recsys.models.datamodule import RecDataModule
    from recsys.models.encoder import load_tokenizer, resolve_model_path
    from recsys.models.two_tower import MONITOR, TwoTowerModule

    ds, split = load_data(cfg.data)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.encoder))
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = TwoTowerModule(model=asdict(cfg.model), train=asdict(cfg.train), compress=asdict(cfg.compress),
                            distill=asdict(cfg.distill))
    check_lengths(cfg, module)
    if cfg.model.init_from:
        init_weights(module, cfg.model.init_from)
    dm = RecDataModule(ds, split, tokenizer, cfg.data, cfg.train, tokenize_items=not cfg.model.freeze_item_tower)
    prepare_module(module, dm, cfg)
    name = cfg.tracking.run_name or f"{dataset_slug(cfg.data)}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    final = Path(cfg.tracking.results_dir) / "runs" / name
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:  # a DDP worker process: rank 0 alone writes the run
        final = Path(tempfile.mkdtemp(prefix="recsys-rank-")) / name
    progress = cfg.tracking.progress_bar
    with staged_dir(final) as run_dir:
        save_config(cfg, run_dir / "config.yaml")
        # A gated run keeps its final model: the best validation score of a run that is being pruned is its
        # densest early checkpoint, and the budget is only met at the end.
        gated = bool(cfg.compress.gates)
        ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=None if gated else MONITOR,
                               mode="max", save_top_k=1, save_weights_only=True)
        speed = Throughput()
        callbacks = [ckpt, speed, StopOnDivergence(), *(callbacks or [])]
        if not gated:
            callbacks.append(EarlyStopping(MONITOR, mode="max", patience=cfg.train.early_stopping_patience))
        vci = cfg.train.val_check_interval
        trainer = _trainer(
            max_epochs=cfg.train.epochs,
            max_time=({"minutes": cfg.train.max_minutes} if cfg.train.max_minutes else None),
            accelerator=cfg.train.accelerator, devices=cfg.train.devices, strategy=cfg.train.strategy,
            precision=cfg.train.precision, gradient_clip_val=cfg.train.grad_clip or None,
            val_check_interval=(int(vci) if vci > 1 else vci), num_sanity_val_steps=0,
            reload_dataloaders_every_n_epochs=1, logger=_loggers(cfg, run_dir, name), callbacks=callbacks,
            enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=10,
            default_root_dir=str(run_dir), deterministic=False,
        )
        t0 = time.perf_counter()
        try:
            trainer.fit(module, datamodule=dm)
        except BaseException:
            _finish(trainer, "failed")
            raise
        fit_minutes = (time.perf_counter() - t0) / 60
        if not trainer.is_global_zero:
            return {}
        best = ckpt.best_model_path
        if best:
            module.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
        module.to("cpu")
        results = evaluate_module(module, dm, ("val", "test") if test else ("val",), progress)
        val = results["val"]
        val.write_per_user(run_dir / "per_user_val.csv", ds.user_ids)
        best_score = ckpt.best_model_score  # None for a gated run (it keeps its final model)
        metrics = {"val": val.metrics, "best_val_ndcg@10": None if best_score is None else float(best_score),
                   "epochs": trainer.current_epoch, "steps": trainer.global_step, "train_minutes": fit_minutes,
                   "train_examples_per_s": speed.rate, "evaluated_users": int(len(val.users)),
                   "catalog_items": int(split.n_items)}
        if test:
            results["test"].write_per_user(run_dir / "per_user_test.csv", ds.user_ids)
            metrics["test"] = results["test"].metrics
            metrics["evaluated_users"] = int(len(results["test"].users))
        if module.gated:
            metrics["structure"] = module.structure_report()
            budget = metrics["structure"].get("budget")
            if budget and not budget["met"]:
                print(f"warning: budget missed: {budget['metric']} ratio {budget['achieved']:.3f} > target "
                      f"{budget['target']} + tolerance {budget['tolerance']}", file=sys.stderr)
        write_json(run_dir / "metrics.json", metrics)
        write_json(run_dir / "record.json", {**environment_record(), "dataset": ds.stats()})
        _finish(trainer)
    return {"run_dir": str(final), **metrics}


# --- evaluate -----------------------------------------------------------------------------------------------

def _run_paths(target: str | Path) -> tuple[Path, Path]:
    p = Path(target)
    if p.is_file() and p.suffix == ".ckpt":
        return p.parent.parent, p
    if p.is_dir():
        ckpt = p / "checkpoints" / "best.ckpt"
        if not (p / "config.yaml").is_file():
            raise RecsysError(f"{p}: not a run folder (no config.yaml)")
        if not ckpt.is_file():
            raise RecsysError(f"{p}: run has no checkpoint ({ckpt} missing)")
        return p, ckpt
    raise RecsysError(f"run not found: {p} (expected a run folder under results/runs/ or a .ckpt file)")


def load_checkpoint_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state["state_dict"]
    except Exception as e:  # any unpickling/zip error: the file is not a checkpoint we wrote
        raise RecsysError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__})") from None


def load_run(target: str | Path, overrides: list[str] | None = None) -> tuple[RunConfig, "TwoTowerModule"]:  # noqa: F821
    """A trained run's resolved config (with dotted `overrides`, e.g. another data.user_max_tokens to serve
    it at) and its module with the checkpoint's weights (eval mode, CPU). A distilled run loads without its
    teacher (the distillation projections are training-only)."""
    from recsys.config import load_config
    from recsys.models.two_tower import TwoTowerModule

    run_dir, ckpt = _run_paths(target)
    cfg = (load_config(run_dir / "config.yaml", overrides) if overrides
           else from_dict(RunConfig, read_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml")))
    state = load_checkpoint_state(ckpt)
    module = TwoTowerModule(model=asdict(cfg.model), train=asdict(cfg.train), compress=asdict(cfg.compress))
    state = {k: v for k, v in state.items() if not k.startswith("distiller.")}
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise RecsysError(f"{ckpt}: weights do not match the run's model ({str(e).splitlines()[0]})") from None
    return cfg, module.eval()


def init_weights(module, source: str | Path) -> None:
    """Copy a finished run's tower weights into `module` (whose gates, budget multipliers and an identity-
    initialised projection may be new), e.g. to prune a fine-tuned dense model. Anything else missing or of
    another size is an error."""
    _, ckpt = _run_paths(source)
    state, own = load_checkpoint_state(ckpt), module.state_dict()
    fresh_projection = module.model_cfg.projection_dim is None  # added by output gates: identity
    for k, v in own.items():
        if k in state:
            if state[k].shape != v.shape:
                raise RecsysError(f"model.init_from: {ckpt}: {k} has shape {tuple(state[k].shape)}, "
                                  f"this model {tuple(v.shape)}")
        elif not (".gates." in k or k.startswith(("budget.", "distiller."))
                  or (fresh_projection and ".projection." in k)):
            raise RecsysError(f"model.init_from: {ckpt} has no weight {k} (a different architecture?)")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def evaluate_run(target: str | Path, stage: str = "test", progress: bool = True,
                 overrides: list[str] | None = None) -> EvalResult:
    """Re-evaluate a trained run (folder or checkpoint) on `stage` with the run's own config (and dotted
    `overrides`, e.g. data.user_max_tokens=64 to read shorter user texts)."""
    from recsys.models.datamodule import RecDataModule
    from recsys.models.encoder import load_tokenizer, resolve_model_path

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
    from recsys.models.encoder import load_tokenizer, resolve_model_path
    from recsys.models.tower import encode_texts

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


def read_per_user(path: str | Path, metric: str) -> dict[str, float]:
    """{user id: value} of one metric from a per-user CSV written by a run or a baseline."""
    p = Path(path)
    if p.is_dir():
        p = p / "per_user_test.csv"
    if not p.is_file():
        raise RecsysError(f"per-user metrics not found: {p}")
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and metric not in rows[0]:
        raise RecsysError(f"{p}: no column '{metric}'")
    return {r["user"]: float(r[metric]) for r in rows}


def results_table(rows: list[dict]) -> str:
    return markdown_table(rows, ["model", *METRIC_COLUMNS])


def baseline_rows(cfg: RunConfig) -> list[dict]:
    """The baselines' test metrics for this dataset, if `recsys baselines` has been run."""
    import json
    path = Path(cfg.tracking.results_dir) / "baselines" / dataset_slug(cfg.data) / "baselines.json"
    if not path.is_file():
        return []
    return [{"model": k, **v} for k, v in json.loads(path.read_text())["models"].items()]
