"""Carry a sweep benchmark's studies across machines: the few files a study needs to resume, committed under
results/benchmarks/state/ (run folders, with their checkpoints, stay on the machine that trained them).

    python experiments/study_state.py save --config configs/sweeps/ml100k_recipe.yaml      # before a session ends
    python experiments/study_state.py restore --config configs/sweeps/ml100k_recipe.yaml   # on a fresh machine
    python experiments/study_state.py save --config configs/sweeps/ml100k_budget.yaml --budgets 59,240,480

A study resumes from its journal (every trial's parameters, validation metrics and measured costs). The report
evaluates only the Pareto trials on test; since a trial off the front now can never join it later (more trials
only add dominating points), `save` evaluates the current front trials on test (once, cached in their run
folders) and keeps their metrics.json, test_metrics.json and config.yaml, so the final report needs no
checkpoint of an earlier machine. Both the λ study and its post-hoc twin are saved, with the cached reference and
its input-length tuning; with `--budgets` (experiments/ml100k_pareto_budget.py) the pair of every budget.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import common  # noqa: F401  (quiets third-party noise before torch loads)

from recsys.errors import RecsysError
from recsys.search.budget import at_budget, steps_per_epoch
from recsys.search.objectives import disturbed, reference_costs
from recsys.search.posthoc import posthoc_config
from recsys.search.report import pareto_front, test_metrics
from recsys.search.study import load_sweep, open_study, reap_stale
from recsys.tracking.records import environment_record, write_json

RUN_FILES = ("metrics.json", "test_metrics.json", "config.yaml", "record.json")  # record: the machine it ran on
REPORT_FILES = ("summary.json", "pareto.csv", "trials.csv", "sweep.json")  # the report, beside the journal


def save(cfg, dest: Path) -> int:
    from optuna.trial import TrialState

    if not (cfg.folder / "journal.log").is_file():
        return 0
    study = open_study(cfg)
    reap_stale(study)  # a trial whose (stopped) worker is gone: FAIL and queued again, not RUNNING forever
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ref = reference_costs(cfg)
    front = pareto_front([t for t in done if not disturbed(t.user_attrs.get("costs", {}), ref,
                                                             cfg.max_reference_drift)], cfg.directions)
    out = dest / cfg.study
    shutil.rmtree(out, ignore_errors=True)
    (out / "runs").mkdir(parents=True)
    shutil.copy2(cfg.folder / "journal.log", out / "journal.log")
    for f in REPORT_FILES:  # the study's report as it stood (its summary carries the machine it was measured on)
        if (cfg.folder / f).is_file():
            shutil.copy2(cfg.folder / f, out / f)
    write_json(out / "machine.json", environment_record())  # where the state was saved (trials: runs/*/record.json)
    for t in front:
        run = Path(t.user_attrs["run_dir"])
        test_metrics(str(run))  # evaluated once, cached in the run folder
        (out / "runs" / run.name).mkdir()
        for f in RUN_FILES:
            shutil.copy2(run / f, out / "runs" / run.name / f)
    return len(front)


def restore(cfg, src: Path) -> bool:
    saved = src / cfg.study
    if (cfg.folder / "journal.log").is_file() or not (saved / "journal.log").is_file():
        return False
    shutil.copytree(saved, cfg.folder, dirs_exist_ok=True)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["save", "restore"])
    ap.add_argument("--config", default="configs/sweeps/ml100k_recipe.yaml")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--state", default="results/benchmarks/state")
    ap.add_argument("--budgets", default=None, help="steps per trial of experiments/ml100k_pareto_budget.py's studies")
    args = ap.parse_args(argv)
    state = Path(args.state)
    try:
        cfg = load_sweep(args.config, [], [f"data.data_dir={args.data_dir}"] if args.data_dir else [])
        tuned = sorted(cfg.folder.parent.glob("reference-*.json"))
        studies = [cfg]
        if args.budgets:
            per_epoch = steps_per_epoch(cfg)
            studies = [at_budget(cfg, steps, per_epoch) for steps in common.positive_ints(args.budgets, "--budgets")]
        if args.action == "save":
            state.mkdir(parents=True, exist_ok=True)
            for f in tuned:
                shutil.copy2(f, state / f.name)
            for c in (c for base in studies for c in (base, posthoc_config(base))):
                if c.tune_reference_input:
                    c.reference_overrides = c.reference_overrides or _tuned_overrides(cfg)
                print(f"{c.study}: saved with {save(c, state)} front trials' test metrics → {state / c.study}")
        else:
            cfg.folder.parent.mkdir(parents=True, exist_ok=True)
            for f in state.glob("reference-*.json"):
                if not (cfg.folder.parent / f.name).exists():
                    shutil.copy2(f, cfg.folder.parent / f.name)
            for c in (c for base in studies for c in (base, posthoc_config(base))):
                print(f"{c.study}: {'restored' if restore(c, state) else 'nothing to restore (present or unsaved)'}")
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _tuned_overrides(cfg) -> list[str]:
    """The reference's input length as experiments/ml100k_pareto.py chose it on validation."""
    return common.tuned_input(cfg.folder.parent, cfg.reference_run) or []


if __name__ == "__main__":
    sys.exit(main())
