"""`recsys sweep`: an Optuna study over training settings (λ values, budgets, any dotted config field) for the
accuracy–cost Pareto front.

A sweep YAML names the base training config, the search space, the objectives, the sampler and the number of
trials (see configs/sweeps/). Each trial trains a run under `results/sweeps/<study>/runs/`, is scored on
**validation** (accuracy) and by the latency harness (the materialized user tower at batch 1 plus exact
retrieval, measured under the machine-wide lock so parallel workers do not disturb each other), and never on
test: after the search, the Pareto trials alone are evaluated on test, once. A base config whose `retrieval.index`
is not exact scores both through that index — validation ranked from its candidates (the exact metrics and its
recall against exact search kept beside), the request timed with its search — so index settings (e.g.
`retrieval.nprobe`) are search dimensions like any other. With `retrieval.recall` (a recall@10 target) each trial's
nprobe / efSearch is tuned on its own validation users (`recsys.retrieval.index_tuning`): the index dimension is
then nlist / M / the index kind at equal recall, and the chosen value and its recall are kept with the trial.

Storage: a journal file `results/sweeps/<study>/journal.log` by default (safe for local parallel workers), or any
RDB URL (PostgreSQL for workers on several machines; heartbeats plus a retry callback re-run the trial of a dead
worker). Workers join one study by running the same command; `--workers N` starts N local processes. A claim lock
(a file lock next to the journal; a PostgreSQL advisory lock for postgresql:// URLs) makes "count trials, then
start one" atomic, so the study records exactly `n_trials` completed trials. Re-running the command resumes.

A trial that raises, diverges (NaN loss) or runs out of memory is marked FAIL with its reason and the sweep goes
on. Validation NDCG@10 is reported after every validation so that single-objective studies can prune;
Optuna does not prune multi-objective studies, so multi-objective trials always run to the end.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytorch_lightning as pl

from recsys.config import load_config
from recsys.errors import RecsysError
from recsys.recipes.train import train
from recsys.search.objectives import disturbed, measure_online, reference_costs
from recsys.search.report import write_report
from recsys.search.study import SweepConfig, _worker_id, claim_lock, count_claimed, make_sampler, open_study, reap_stale

# --- storage, sampler, the claim lock -------------------------------------------------------------------------


# --- one trial --------------------------------------------------------------------------------------------------


class Reporter(pl.Callback):
    """Reports validation NDCG@10 to the trial after every validation; prunes single-objective studies."""

    def __init__(self, trial, single_objective: bool):
        self.trial, self.single, self.curve = trial, single_objective, []

    def on_validation_end(self, trainer, module):
        import optuna

        value = trainer.callback_metrics.get("val/ndcg@10")
        if value is None or trainer.sanity_checking:
            return
        self.curve.append((trainer.global_step, float(value)))
        if self.single:
            self.trial.report(float(value), trainer.global_step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {trainer.global_step}")


TUNED_BY_RECALL = ("retrieval.nprobe", "retrieval.ef_search")  # what retrieval.recall chooses per trial


def check_index_dimension(cfg: SweepConfig, run_cfg) -> None:
    """A recall target chooses nprobe / efSearch on each trial's validation users: searching over them too would
    be a dimension the tuning overwrites (search nlist, M or the index kind instead)."""
    searched = sorted(set(cfg.params) & set(TUNED_BY_RECALL))
    if run_cfg.retrieval.recall and searched:
        raise RecsysError(f"{cfg.study}: params {', '.join(searched)} with retrieval.recall="
                          f"{run_cfg.retrieval.recall}: the recall target tunes them per trial; search "
                          f"retrieval.nlist, retrieval.hnsw_m or retrieval.index instead, or drop the target")


def run_trial(trial, cfg: SweepConfig) -> list[float]:
    """Train one trial's run (no test evaluation), measure its costs, return the objective values."""

    overrides = [f"{k}={spec.suggest(trial, k)}" for k, spec in cfg.params.items()]
    name = f"trial-{trial.number:04d}"
    run_cfg = load_config(cfg.base_config, [*cfg.overrides, *overrides, f"tracking.results_dir={cfg.folder}",
                                            f"tracking.run_name={name}", f"tracking.wandb_group={cfg.study}",
                                            "tracking.progress_bar=false"])
    check_index_dimension(cfg, run_cfg)
    t0 = time.perf_counter()
    reporter = Reporter(trial, len(cfg.objectives) == 1)
    out = train(run_cfg, callbacks=[reporter], test=False)
    t1 = time.perf_counter()
    trial.set_user_attr("run_dir", out["run_dir"])
    if run_cfg.retrieval.index != "exact":  # scored as served: validation ranked through the run's index
        from recsys.recipes.retrieval_index import evaluate_run_index  # faiss: imported only when used
        through = evaluate_run_index(out["run_dir"], None, "val", progress=False)
        trial.set_user_attr("val_exact", out["val"])
        tuned = through.tuning  # retrieval.recall: nprobe / efSearch tuned on this trial's validation users
        trial.set_user_attr("index", {"spec": through.spec, **through.recall_vs_exact,
                                      "ann_recall@10": through.ann_recall, "queries": "validation users",
                                      **({"tuned": {k: tuned[k] for k in ("param", "value", "recall", "target")}}
                                         if tuned else {})})
        out["val"] = through.index.metrics
    trial.set_user_attr("val", out["val"])
    trial.set_user_attr("val_curve", reporter.curve)
    trial.set_user_attr("overrides", overrides)
    costs = {}
    if set(cfg.objectives) & {"latency", "params", "flops"}:
        ref = reference_costs(cfg)
        for _ in range(3):
            costs = measure_online(out["run_dir"], cfg.seq_len, reference=ref["run"] if ref else None,
                                   reference_overrides=cfg.reference_overrides)
            why = disturbed(costs, ref, cfg.max_reference_drift)
            if why is None:
                break
        else:
            raise RecsysError(why)
        if ref:  # the latency at the machine speed the reference was measured at: ratio × reference ms
            costs["latency_measured"] = costs["latency"]
            costs["latency"] = costs["latency_ratio"] * ref["latency"]
    trial.set_user_attr("costs", costs)
    trial.set_user_attr("own_seconds", time.perf_counter() - t0)
    trial.set_user_attr("train_seconds", t1 - t0)
    return [out["val"][o] if o in out["val"] else costs[o] for o in cfg.objectives]


# --- the worker loop ----------------------------------------------------------------------------------------------


def run_worker(cfg: SweepConfig) -> int:
    """Run trials until the study holds `n_trials` completed (or running) trials; returns how many ran here."""
    import optuna

    study = open_study(cfg)
    ran = 0
    while True:
        lock = claim_lock(cfg)
        lock.__enter__()
        held = True

        def objective(trial, lock=lock):
            nonlocal held
            trial.set_user_attr("worker", _worker_id())
            lock.__exit__(None, None, None)  # the trial exists (RUNNING): other workers may count it now
            held = False
            t0 = time.perf_counter()
            try:
                values = run_trial(trial, cfg)
            except optuna.TrialPruned:
                raise
            except KeyboardInterrupt:  # Optuna marks it FAIL and re-raises: the study resumes from the next one
                trial.set_user_attr("fail_reason", "interrupted")
                raise
            except Exception as e:
                reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                trial.set_user_attr("fail_reason", reason)
                print(f"trial {trial.number} failed: {reason}", file=sys.stderr, flush=True)
                raise
            progress(study, cfg, trial, values, (time.perf_counter() - t0) / 60)
            return values

        try:
            if cfg.storage:  # RDB: heartbeats find stale trials, the retry callback queues them again
                optuna.storages.fail_stale_trials(study)
            else:
                reap_stale(study)
            if count_claimed(study) >= cfg.n_trials:
                break
            failed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
            if failed >= (cfg.max_failed or cfg.n_trials):
                print(f"warning: stopping: {failed} trials failed (max_failed {cfg.max_failed or cfg.n_trials})",
                      file=sys.stderr)
                break
            # under the claim lock the trial count is this trial's number: one seed per trial, the same draws
            # whether the study ran in one go, was resumed, or is shared by several workers
            study.sampler = make_sampler(cfg, offset=len(study.get_trials(deepcopy=False)))
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
            ran += 1
        finally:
            if held:
                lock.__exit__(None, None, None)
    return ran


def progress(study, cfg: SweepConfig, trial, values: list[float], minutes: float) -> None:
    """One line per finished trial: its parameters, objectives, minutes, and the study's count and ETA."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    mean = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done) / 60 / max(1, len(done))
    left = max(0, cfg.n_trials - len(done) - 1)  # this trial is not COMPLETE until the objective returns
    params = ", ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                       for k, v in trial.params.items())
    objectives = ", ".join(f"{o} {v:.4g}" for o, v in zip(cfg.objectives, values, strict=True))
    print(f"trial {trial.number} done in {minutes:.1f} min: {params} → {objectives}; "
          f"{len(done) + 1}/{cfg.n_trials} complete, ETA {left * (mean or minutes):.0f} min", flush=True)


def _gpu_ids() -> list[str]:
    """The CUDA devices this process may use ($CUDA_VISIBLE_DEVICES, else all), as ids; [] without CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def sweep(cfg: SweepConfig, workers: int = 1, config_path: str | None = None, overrides: list[str] | None = None,
          report: bool = True) -> dict | None:
    """Run the study with `workers` local processes (this one included), then write the report."""
    import datetime as dt


    try:  # before any trial starts (the base alone may be incomplete without a trial's params: then per trial)
        base = load_config(cfg.base_config, list(cfg.overrides))
    except RecsysError:
        base = None
    if base is not None:
        check_index_dimension(cfg, base)
    t0, since = time.perf_counter(), dt.datetime.now()
    procs = []
    if workers > 1:
        if config_path is None:
            raise RecsysError("--workers needs the sweep to come from a config file")
        cmd = [sys.executable, "-m", "recsys.cli", "sweep", "--config", config_path, "--no-report",
               *(overrides or [])]
        gpus = _gpu_ids()  # local workers each on their own GPU (round robin): this one the first, worker i the i-th
        procs = [subprocess.Popen(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus
                                  else None) for i in range(1, workers)]
    try:
        run_worker(cfg)
    finally:
        codes = [p.wait() for p in procs]
    if any(codes):
        print(f"warning: {sum(1 for c in codes if c)} worker process(es) exited with an error", file=sys.stderr)
    if not report:
        return None
    return write_report(cfg, wall_seconds=time.perf_counter() - t0, workers=workers, since=since)

