"""The train recipe: the typed function behind `recsys train`.

`train(cfg)` prepares what the module needs (`prepare_module`: teacher, cached item embeddings, importance
scores, latency tables), fits a two-tower model, keeps the best checkpoint by validation NDCG@10, evaluates it
on the test split and writes `results/runs/<name>/` (resolved config, metrics, per-user metrics, CSV log,
checkpoint, environment record). A notebook can call these functions directly.
"""
from __future__ import annotations

import datetime as dt
import os
import signal
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from recsys.config import RunConfig, read_yaml, save_config
from recsys.data.registry import dataset_slug, load_data
from recsys.efficiency.cost import SoftShape
from recsys.efficiency.latency import exclusive, measure, threads
from recsys.errors import RecsysError
from recsys.losses.penalties import CostNormaliser
from recsys.models.datamodule import RecDataModule
from recsys.models.encoder import load_tokenizer, resolve_model_path
from recsys.models.importance import importance_scores, init_gates_by_importance, prune_by_importance, prune_to_cost
from recsys.models.item_encoder import catalog_vectors
from recsys.models.sequence_tower import user_input_length
from recsys.models.two_tower import MONITOR
from recsys.recipes.deepspeed import check_deepspeed, deepspeed_final_module, deepspeed_strategy
from recsys.recipes.evaluate import evaluate_module
from recsys.retrieval.distributed import broadcast_from_zero, shard
from recsys.runs import build_module, check_lengths, init_item_tower, init_weights
from recsys.serving.latency_tables import SequenceInput, load_or_build
from recsys.serving.materialize import materialize
from recsys.serving.quantize import route_for
from recsys.serving.routes import request_calls
from recsys.tracking.records import environment_record, staged_dir, write_json

LAST = "checkpoints/last.ckpt"  # a fit's last full-state checkpoint, inside its staging folder


def interrupted_checkpoint(final: Path) -> Path:
    """The full-state checkpoint an interrupted fit of run folder `final` left (`<run>.partial/…/last.ckpt`)."""
    return final.with_name(final.name + ".partial") / LAST


class Throughput(pl.Callback):
    """Times training batches: examples/s of the optimisation steps, validation excluded."""

    def __init__(self):
        self.examples, self.seconds, self._t = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self._t
        self.examples += len(batch["users"])  # users of the batch (text or sequence towers)

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


def _online_latency(module, cfg: RunConfig, n_items: int) -> dict:
    """The run's online request measured once at the end of training (materialized user tower at batch 1 and
    its token budget, served at compress.precision, + exact retrieval): median and p90 ms on this machine."""
    tower = materialize(module.user_tower)
    user, search = request_calls(tower, user_input_length(cfg.model, cfg.data), n_items,
                                 route_for(cfg.compress.precision, cfg.compress.int8_backend),
                                 cfg.compress.quantize_layers)
    with threads(None), exclusive():
        t = measure(lambda: (user(), search()), min_seconds=1.0)
    return {"median": t.p50, "p90": t.p90, "route": route_for(cfg.compress.precision, cfg.compress.int8_backend)}


def wandb_summary(metrics: dict, cfg: RunConfig) -> dict:
    """Flat W&B summary keys: final val/test metrics, the structure report (shape, cost ratios, budget met),
    the measured online latency and the resolved config."""
    out = {f"final/{stage}/{k}": v for stage in ("val", "test") for k, v in metrics.get(stage, {}).items()}
    if "online_latency_ms" in metrics:
        out.update({f"online_latency_ms/{k}": v for k, v in metrics["online_latency_ms"].items()})
    structure = metrics.get("structure")
    if structure:
        out["structure/user_shape"] = structure["user_shape"]
        out.update({f"structure/user_ratio/{k}": v for k, v in structure["user_ratios"].items()})
        if "budget" in structure:
            out.update({f"structure/budget/{k}": v for k, v in structure["budget"].items()})
    out["config"] = cfg.to_dict()
    return out


def _trainer(**kwargs) -> pl.Trainer:
    """A Lightning Trainer; options Lightning rejects (accelerator, devices, strategy, precision) are user errors."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    try:
        return pl.Trainer(**kwargs)
    except (ValueError, TypeError, MisconfigurationException) as e:
        msg = " ".join(str(e).split())[:200]
        raise RecsysError(f"train.accelerator/devices/strategy/precision: Lightning rejected them ({msg})") from None


def _processes(train) -> int:
    """Processes a fit will run (devices given as a count or ids; 1 when Lightning decides: -1, "auto")."""
    d = train.devices
    if isinstance(d, str) and d != "auto":
        return len([p for p in d.split(",") if p.strip()])
    return d if isinstance(d, int) and d > 0 else 1


def _remove(path: Path) -> None:
    """A checkpoint file, or a DeepSpeed checkpoint folder (ZeRO shards), if present."""
    if path.is_dir():
        import shutil
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _finish(trainer: pl.Trainer, status: str = "success") -> None:
    """Close the loggers; end the W&B run so the next `train` in this process starts its own."""
    for lg in trainer.loggers:
        lg.finalize(status)
        if type(lg).__name__ == "WandbLogger":
            import wandb
            wandb.finish(exit_code=0 if status == "success" else 1)


def _stopped_by(trainer: pl.Trainer, cfg: RunConfig) -> str:
    """Why a fit ended: time_cap (train.max_minutes fired), early_stopping, or budget (its epochs ran out)."""
    from pytorch_lightning.callbacks import Timer
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None and cfg.train.max_minutes and timer.time_remaining() is not None \
            and timer.time_remaining() <= 0:
        return "time_cap"
    stopper = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    if stopper is not None and stopper.stopped_epoch > 0:
        return "early_stopping"
    return "budget"


def prepare_module(module, dm, cfg: RunConfig) -> None:
    """What the LightningModule needs from outside, prepared before fitting: a frozen item tower's catalog
    embeddings, the teacher's, the dense model's importance scores (post-hoc pruning, or importance-initialised
    gates) and the cost model of the gated towers (latency tables measured on this device, for the route the
    tower will be served by)."""


    if cfg.model.freeze_item_tower:  # the catalog once (a Hugging Face item encoder's: cached on disk)
        module.set_item_cache(catalog_vectors(module, dm.item_texts, dm.tokenizer, cfg.data, cfg.train.eval_batch_size),
                              torch.from_numpy(dm.split.cold_mask()))
        if len(dm.split.cold) and cfg.model.item_representation == "text+id":
            print(f"cold start: {len(dm.split.cold)} held-out items have no trained ID embedding (its row is zero); a "
                  "text+id tower scores them by their text alone", file=sys.stderr)
    if module.distiller is not None:
        module.distiller.cache_items(dm.item_texts, dm.tokenizer, cfg.data.item_max_tokens)
    c = cfg.compress
    scores = None
    if c.prune_ratio is not None or c.importance_init or c.prune_init:
        batches = list(islice(dm.train_dataloader(), c.prune_batches))  # scored on the dense model's training loss
        if c.prune_ratio is not None:  # post-hoc: prune once by importance, then recover
            kept = prune_by_importance(module, batches, c.prune_ratio)
            print(f"pruned by importance: kept {kept}", flush=True)
        elif c.importance_init:
            scores = init_gates_by_importance(module, batches, c.gate_init, c.importance_spread)
            print(f"gates initialised by importance: {', '.join(scores)}", flush=True)
        else:
            scores = importance_scores(module, batches)
    if module.costed:
        user_base = module.user_tower.shape.replace(seq_len=user_input_length(cfg.model, cfg.data), batch=1)
        needs_latency = c.lambda_latency > 0 or c.budget_metric == "latency"
        tables = (load_or_build(user_base, progress=False, route=route_for(c.precision, c.int8_backend),
                                sequence=SequenceInput.of(module.user_tower)) if needs_latency else None)
        item = None
        if module.separate and module.item_tower is not None and module.item_tower.gates is not None:
            item = CostNormaliser(module.item_tower.shape.replace(seq_len=cfg.data.item_max_tokens))
        index = cfg.retrieval if cfg.retrieval.index != "exact" else None  # served through an index: its cost
        index_model = None
        if index is not None and tables is not None:
            from recsys.serving.index_route import calibrate_index_latency  # faiss: imported only when used
            index_model = calibrate_index_latency(kinds=(index.index,))
        module.set_costs(CostNormaliser(user_base, dm.split.n_items, tables, index, index_model), item)
    if c.prune_init:  # prune-then-learn: the gates start where post-hoc pruning at the target's cost ends
        costs = module.user_costs

        def cost(shape) -> float:
            run = shape.replace(seq_len=costs.base.seq_len, batch=costs.base.batch)
            return float(costs(SoftShape.from_shape(run))[c.budget_metric])

        ratio, kept = prune_to_cost(module, scores, cost, c.budget_target, c.gate_init)
        print(f"pruned by importance to {c.budget_metric} {c.budget_target} (ratio {ratio:.3f}), gates learn from "
              f"there: kept {kept}", flush=True)


def train(cfg: RunConfig, callbacks: list | None = None, test: bool = True, resume: bool = False) -> dict:
    """`_train` (below) with `train.threads` torch threads (restored afterwards)."""
    with threads(cfg.train.threads):
        return _train(cfg, callbacks, test, resume)


def _train(cfg: RunConfig, callbacks: list | None = None, test: bool = True, resume: bool = False) -> dict:
    """Fit, select the best checkpoint on validation NDCG@10 (a gated run: its final model), test it (unless
    `test` is False: a sweep tests only its Pareto trials, after the search), and write the run folder.
    `callbacks` are extra Lightning callbacks (a sweep's pruning reporter). A failed or interrupted fit leaves
    its last full-state checkpoint (every `train.checkpoint_every_steps` steps) in `<run>.partial/`; `resume`
    continues from it, mid-epoch included, with the same config."""
    if cfg.train.strategy == "deepspeed":  # before anything is loaded or written: the package, a GPU
        check_deepspeed(cfg.train)
    ds, split = load_data(cfg.data)
    shard(len(split.eval_users), 0, _processes(cfg.train))  # more processes than evaluated users: one line
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.encoder))
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = build_module(cfg, n_catalog=split.n_items)
    check_lengths(cfg, module)
    if cfg.model.init_from:
        init_weights(module, cfg.model.init_from)
    if cfg.model.item_tower_from:
        init_item_tower(module, cfg.model.item_tower_from, cfg)
    sequence = cfg.model.user_tower == "sequence"  # batches carry item ids; user texts only for a text teacher
    dm = RecDataModule(ds, split, tokenizer, cfg.data, cfg.train, tokenize_items=not cfg.model.freeze_item_tower,
                       sequence_items=cfg.model.sequence_items if sequence else None,
                       user_text=not sequence or bool(cfg.distill.teacher))
    prepare_module(module, dm, cfg)
    name = cfg.tracking.run_name or f"{dataset_slug(cfg.data)}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    final = Path(cfg.tracking.results_dir) / "runs" / name
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:  # a DDP worker process: rank 0 alone writes the run
        final = Path(tempfile.mkdtemp(prefix="recsys-rank-")) / name
    elif final.exists() and not cfg.tracking.overwrite:  # checked before anything is written
        raise RecsysError(f"run {final} exists: choose another tracking.run_name, or tracking.overwrite=true to "
                          "replace it")
    last = interrupted_checkpoint(final)
    if resume and not last.is_file():
        raise RecsysError(f"--resume: no interrupted run {name} to continue ({last} missing)")
    if resume and read_yaml(last.parent.parent / "config.yaml") != cfg.to_dict():
        raise RecsysError(f"--resume: the config differs from the interrupted run's "
                          f"({last.parent.parent / 'config.yaml'})")
    if not resume and last.is_file() and not cfg.tracking.overwrite:
        raise RecsysError(f"an interrupted run {name} left a checkpoint ({last}): --resume to continue it, or "
                          "tracking.overwrite=true to start again")
    progress = cfg.tracking.progress_bar
    with staged_dir(final, keep=(LAST, "config.yaml"), resume=resume) as run_dir:
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
        if cfg.train.checkpoint_every_steps:  # full state (optimizer, schedule, loops), for --resume
            callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None,
                                             every_n_train_steps=cfg.train.checkpoint_every_steps, save_top_k=1,
                                             enable_version_counter=False))
        vci = cfg.train.val_check_interval
        trainer = _trainer(
            max_epochs=cfg.train.epochs,
            max_time=({"minutes": cfg.train.max_minutes} if cfg.train.max_minutes else None),
            accelerator=cfg.train.accelerator, devices=cfg.train.devices,
            strategy=deepspeed_strategy(cfg.train) if cfg.train.strategy == "deepspeed" else cfg.train.strategy,
            precision=cfg.train.precision, gradient_clip_val=cfg.train.grad_clip or None,
            val_check_interval=(int(vci) if vci > 1 else vci), num_sanity_val_steps=0,
            check_val_every_n_epoch=cfg.train.check_val_every_n_epoch,
            reload_dataloaders_every_n_epochs=1, logger=_loggers(cfg, run_dir, name), callbacks=callbacks,
            enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=cfg.tracking.log_every_steps,
            max_steps=cfg.train.max_steps or -1,
            default_root_dir=str(run_dir), deterministic=False,
        )
        t0 = time.perf_counter()
        try:
            if resume:
                state = torch.load(run_dir / LAST, map_location="cpu", weights_only=False)
                dm.resume_from(state["epoch"], state["global_step"])
            trainer.fit(module, datamodule=dm, ckpt_path=str(run_dir / LAST) if resume else None)
        except SystemExit:  # Lightning answers Ctrl-C with exit(1) (SIGINT ignored from then on)
            _finish(trainer, "failed")
            if trainer.interrupted:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt from None
            raise
        except BaseException:
            _finish(trainer, "failed")
            raise
        fit_minutes = (time.perf_counter() - t0) / 60
        stopped_by = _stopped_by(trainer, cfg)
        if stopped_by == "time_cap":
            print(f"warning: train.max_minutes={cfg.train.max_minutes} stopped training at step {trainer.global_step}"
                  " (a safety cap, not a budget: this run's accuracy depends on the machine's speed)", file=sys.stderr)
        best = ckpt.best_model_path
        if cfg.train.strategy == "deepspeed":  # the ZeRO checkpoint -> a plain fp32 state dict (recipes/deepspeed)
            module = deepspeed_final_module(trainer, module, cfg, best)
        elif best:  # rank 0 reads the best checkpoint and hands its weights to the other ranks, if any
            module.load_state_dict(broadcast_from_zero(
                lambda: torch.load(best, map_location="cpu", weights_only=True)["state_dict"]))
        # evaluated where it was fitted (Lightning's teardown moved it to the CPU); several ranks: users sharded
        module.to(trainer.strategy.root_device)
        results = evaluate_module(module, dm, ("val", "test") if test else ("val",), progress)
        module.to("cpu")
        if not trainer.is_global_zero:
            return {}
        _remove(run_dir / LAST)  # a finished run needs no resume state
        val = results["val"]
        val.write_per_user(run_dir / "per_user_val.csv", ds.user_ids)
        best_score = ckpt.best_model_score  # None for a gated run (it keeps its final model)
        metrics = {"val": val.metrics, "best_val_ndcg@10": None if best_score is None else float(best_score),
                   "epochs": trainer.current_epoch, "steps": trainer.global_step, "train_minutes": fit_minutes,
                   "stopped_by": stopped_by, "protocol": split.protocol,
                   "train_examples_per_s": speed.rate, "evaluated_users": int(len(val.users)),
                   "catalog_items": int(split.n_items)}
        if test:
            results["test"].write_per_user(run_dir / "per_user_test.csv", ds.user_ids)
            metrics["test"] = results["test"].metrics
            metrics["evaluated_users"] = int(len(results["test"].users))
        calibration = results["val"].cold_offset  # cold start: chosen on val, applied to every stage
        if calibration is not None:
            metrics["cold_offset"] = {k: v for k, v in calibration.items() if k != "uncalibrated"}
            metrics.update({f"{stage}_uncalibrated": r.cold_offset["uncalibrated"] for stage, r in results.items()})
            print(f"cold start: never-trained items' scores + {calibration['beta']:.4f} (train.cold_offset=val: "
                  f"{calibration['chosen_on']}, {len(calibration['grid'])} offsets tried)")
        if module.gated:
            metrics["structure"] = module.structure_report()
            budget = metrics["structure"].get("budget")
            if budget and not budget["met"]:
                print(f"warning: budget missed: {budget['metric']} ratio {budget['achieved']:.3f} > target "
                      f"{budget['target']} + tolerance {budget['tolerance']}", file=sys.stderr)
        wandb_logger = next((lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"), None)
        if wandb_logger is not None:  # the run's W&B summary: what a reader of the dashboard looks for
            metrics["online_latency_ms"] = _online_latency(module, cfg, split.n_items)
            wandb_logger.experiment.summary.update(wandb_summary(metrics, cfg))
        record = environment_record()
        # the machine its train_minutes / online_latency_ms were measured on, inside the file that holds them
        metrics["hardware"] = record["hardware"]
        write_json(run_dir / "metrics.json", metrics)
        write_json(run_dir / "record.json", {**record, "dataset": ds.stats()})
        _finish(trainer)
    return {"run_dir": str(final), **metrics}


# --- evaluate -----------------------------------------------------------------------------------------------


