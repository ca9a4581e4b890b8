"""The export recipe (`recsys export`): a gated run's towers materialized, written in a serving format
(`recsys.serving.export`) and checked against the gated model's embeddings; a sequence run's user tower (gated or
not) with its item tower and the catalog vectors a request reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from recsys.data.registry import load_data
from recsys.errors import RecsysError
from recsys.models.encoder import load_tokenizer, resolve_model_path
from recsys.models.sequence_tower import lookup, recent_items
from recsys.models.tower import encode_texts, tokenize
from recsys.runs import load_run, run_paths
from recsys.serving.export import FORMATS, export_sequence_tower, export_tower, run_exported, run_exported_sequence
from recsys.serving.materialize import materialize
from recsys.tracking.records import staged_dir, write_json

# what an export writes at its top level (an export.json without a file list: an export of an older version)
EXPORT_NAMES = frozenset({"user", "item", "export.json", "catalog_items.npy", "catalog_keys.npy", "item_ids.json"})


def export_run(target: str | Path, fmt: str, out: str | Path | None = None, overwrite: bool = False) -> dict:
    """Materialize a gated run's tower(s), export them to `out` (default `<run>/export/<fmt>`), reload each
    artifact and check that its embeddings equal the gated model's (max |Δ| reported; > 1e-4 is an error).

    Nothing the export did not write is ever removed: an existing `out` that is not an earlier export (or is the
    run folder, or holds it) is refused; an earlier export is replaced only with `overwrite`, by a swap once the new
    one is complete and checked."""
    if fmt not in FORMATS:
        raise RecsysError(f"--format: unknown format {fmt!r} (expected {', '.join(FORMATS)})")
    run_dir, _ = run_paths(target)
    out = Path(out) if out is not None else run_dir / "export" / fmt
    check_output(run_dir, out, overwrite)
    cfg, module = load_run(target)
    if module.sequence:
        return export_sequence_run(run_dir, cfg, module, fmt, out)
    if not module.gated:
        raise RecsysError(f"{run_dir}: run has no gates to materialize (train it with compress.gates=[...])")
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.encoder))
    towers = {"user": module.user_tower}
    if module.separate:
        towers["item"] = module.item_tower
    texts = ["a probe sentence for the exported tower", "toy story. genres: animation, children's, comedy"]
    final = Path(out)
    report = {"run": str(run_dir), "format": fmt, "towers": {}}
    with staged_dir(final) as staging:
        for name, tower in towers.items():
            report["towers"][name] = _export_checked(name, tower, tokenizer, texts, cfg.data.user_max_tokens,
                                                     staging / name, fmt)
        _write_report(staging, report)
    report["path"] = str(final)
    return report


def check_output(run_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output the export would destroy something in (see export_run): one line each."""
    where, run = out.resolve(), run_dir.resolve()
    if where == run or where in run.parents:
        raise RecsysError(f"--output {out}: is the run folder {run_dir}{'' if where == run else ' or holds it'}; "
                          f"an export never replaces it (default: {run_dir / 'export' / '<format>'})")
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir() or out.is_symlink():
        raise RecsysError(f"--output {out}: exists and is not a folder; choose another --output")
    if not any(out.iterdir()):
        return
    files = _exported_files(out)
    if files is None:
        raise RecsysError(f"--output {out}: exists and is not an export (no export.json); refusing to replace it, "
                          f"choose another --output")
    others = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                    if not p.is_dir() and str(p.relative_to(out)) not in files
                    and (files or p.relative_to(out).parts[0] not in EXPORT_NAMES))
    if others:
        raise RecsysError(f"--output {out}: an earlier export that also holds files it did not write "
                          f"({', '.join(others[:3])}{', …' if len(others) > 3 else ''}); move them or choose another "
                          f"--output")
    if not overwrite:
        raise RecsysError(f"--output {out}: holds an earlier export; pass --overwrite to replace it")


def _exported_files(folder: Path) -> set[str] | None:
    """The files an earlier export in `folder` wrote (empty: an older export without a file list, judged by
    EXPORT_NAMES); None when `folder` holds no export."""
    try:
        report = json.loads((folder / "export.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not {"run", "format", "towers"} <= set(report):
        return None
    return set(report.get("files") or ())


def _write_report(staging: Path, report: dict) -> None:
    """export.json, with the list of files the export wrote (what a later --overwrite may replace)."""
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if not p.is_dir())
    write_json(staging / "export.json", {**report, "files": [*files, "export.json"]})


def _max_diff(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |Δ| between an exported artifact's embeddings and the run's; above 1e-4 an error."""
    err = float((got - ref).abs().max())
    if err > 1e-4:
        raise RecsysError(f"export {name}: exported embeddings differ from the run's tower by {err:.2e}")
    return err


def _export_checked(name: str, tower, tokenizer, texts: list[str], max_tokens: int, dest: Path, fmt: str) -> dict:
    """A text tower materialized, exported to `dest` in `fmt`, reloaded and run on `texts`: its embeddings must equal
    the run's tower's (its kept output dims, when gated). Returns the tower's report entry."""
    compact = materialize(tower)
    written = export_tower(compact, tokenizer, dest, fmt)
    batch = tokenize(tokenizer, texts, max_tokens)
    with torch.inference_mode():
        kept = tower.gates.kept()["output"] if tower.gates is not None else None
        ref = tower(**batch)[:, kept > 0] if kept is not None else tower(**batch)
    err = _max_diff(name, run_exported(dest, written, batch["input_ids"], batch["attention_mask"]), ref)
    return {"written_format": written, "shape": compact.encoder.shape.to_dict(), "dim": compact.dim,
            "max_abs_diff": err, "params": sum(p.numel() for p in compact.parameters())}


def export_sequence_run(run_dir: Path, cfg, module, fmt: str, out: str | Path | None = None) -> dict:
    """A sequence run for serving, in `out` (default `<run>/export/<fmt>`): `user/` the (materialized) sequence
    tower (`recsys.serving.export.export_sequence_tower`), `item/` its item tower as a text tower in the same format,
    and the catalog it needs at request time — `catalog_items.npy` [n_items, d_item] (the item tower's vectors a
    history is looked up in), `catalog_keys.npy` (what users are scored against: through the adaptor when the tower
    has one) and `item_ids.json` (their row order). Checked on real users' histories against the run's tower."""
    ds, split = load_data(cfg.data)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.encoder))
    with torch.inference_mode():
        items = encode_texts(module.item_tower, tokenizer, ds.item_texts, cfg.data.item_max_tokens,
                             cfg.train.eval_batch_size, progress=False)  # [n_items, d_item]
        keys = module.user_tower.represent_catalog(items)  # [n_items, d]
    final = Path(out) if out is not None else run_dir / "export" / fmt
    report = {"run": str(run_dir), "format": fmt, "user_tower": "sequence", "towers": {}}
    users = split.eval_users[:8]
    ids = recent_items([split.history(int(u), "test") for u in users], module.user_tower.n_items)  # [8, N]
    vectors, mask = lookup(ids, items)
    with staged_dir(final) as staging:
        compact = materialize(module.user_tower)
        written = export_sequence_tower(compact, staging / "user", fmt)
        with torch.inference_mode():
            ref = module.user_tower(vectors, mask)
        err = _max_diff("user", run_exported_sequence(staging / "user", written, vectors, mask.long()), ref)
        report["towers"]["user"] = {"written_format": written, "shape": compact.shape.to_dict(), "dim": compact.dim,
                                    "n_history": compact.n_items, "item_dim": compact.item_dim,
                                    "max_abs_diff": err, "params": sum(p.numel() for p in compact.parameters())}
        report["towers"]["item"] = _export_checked("item", module.item_tower, tokenizer, ds.item_texts[:2],
                                                   cfg.data.item_max_tokens, staging / "item", fmt)
        np.save(staging / "catalog_items.npy", items.numpy())
        np.save(staging / "catalog_keys.npy", keys.numpy())
        write_json(staging / "item_ids.json", list(ds.item_ids))
        _write_report(staging, report)
    report["path"] = str(final)
    return report
