"""The export recipe (`recsys export`): a gated run's towers materialized, written in a serving format
(`recsys.serving.export`) and checked against the gated model's embeddings.
"""
from __future__ import annotations

from pathlib import Path

import torch

from recsys.errors import RecsysError
from recsys.models.encoder import load_tokenizer, resolve_model_path
from recsys.models.tower import tokenize
from recsys.runs import load_run, run_paths
from recsys.serving.export import FORMATS, export_tower, run_exported
from recsys.serving.materialize import materialize
from recsys.tracking.records import staged_dir, write_json


def export_run(target: str | Path, fmt: str, out: str | Path | None = None) -> dict:
    """Materialize a gated run's tower(s), export them to `out` (default `<run>/export/<fmt>`), reload each
    artifact and check that its embeddings equal the gated model's (max |Δ| reported; > 1e-4 is an error)."""
    if fmt not in FORMATS:
        raise RecsysError(f"--format: unknown format {fmt!r} (expected {', '.join(FORMATS)})")
    run_dir, _ = run_paths(target)
    cfg, module = load_run(target)
    if module.sequence:  # its transformer reads item vectors, not tokens: no HF / token-input format fits it
        raise RecsysError(f"{run_dir}: recsys export writes text towers; a sequence user tower is served from its "
                          "run folder (recsys.recipes.profile.online_request), not exported")
    if not module.gated:
        raise RecsysError(f"{run_dir}: run has no gates to materialize (train it with compress.gates=[...])")
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.encoder))
    towers = {"user": module.user_tower}
    if module.separate:
        towers["item"] = module.item_tower
    texts = ["a probe sentence for the exported tower", "toy story. genres: animation, children's, comedy"]
    final = Path(out) if out is not None else run_dir / "export" / fmt
    report = {"run": str(run_dir), "format": fmt, "towers": {}}
    with staged_dir(final) as staging:
        for name, tower in towers.items():
            compact = materialize(tower)
            written = export_tower(compact, tokenizer, staging / name, fmt)
            batch = tokenize(tokenizer, texts, cfg.data.user_max_tokens)
            with torch.inference_mode():
                kept = tower.gates.kept()["output"]
                ref = tower(**batch)[:, kept > 0] if kept is not None else tower(**batch)
            got = run_exported(staging / name, written, batch["input_ids"], batch["attention_mask"])
            err = float((got - ref).abs().max())
            if err > 1e-4:
                raise RecsysError(f"export {name}: exported embeddings differ from the gated model by {err:.2e}")
            report["towers"][name] = {"written_format": written, "shape": compact.encoder.shape.to_dict(),
                                      "dim": compact.dim, "max_abs_diff": err,
                                      "params": sum(p.numel() for p in compact.parameters())}
        write_json(staging / "export.json", report)
    report["path"] = str(final)
    return report
