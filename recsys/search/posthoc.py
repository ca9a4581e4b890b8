"""The post-hoc front: the same trial budget spent on pruning the dense fine-tuned two-tower by importance
(`recsys.models.importance`) at a range of ratios, each with the same recovery fine-tuning as a λ trial, scored
with the same objectives and reference — so its hypervolume is comparable with the λ study's.
`recsys sweep --config <λ sweep> --baseline posthoc` runs it as its own study, `<study>-posthoc`.
"""
from __future__ import annotations

from recsys.search.study import ParamSpec, SweepConfig


def posthoc_config(cfg: SweepConfig, low: float = 0.1, high: float = 0.9) -> SweepConfig:
    """The post-hoc twin of a λ sweep: the same base, budget of trials, objectives and reference, one
    parameter (the pruning ratio), penalties and budgets switched off, its own study."""
    from dataclasses import replace

    fixed = [o for o in cfg.overrides  # the λ run's structure options (its schedule, its start) are not post-hoc's
             if not o.startswith(("compress.lambda_", "compress.budget_", "compress.importance_", "compress.target_by",
                                  "compress.prune_init"))]
    fixed += ["compress.gates=[heads,ffn]", "compress.lambda_params=0", "compress.lambda_flops=0",
              "compress.lambda_latency=0"]
    # the input knobs (data.*: token budget, history items) are searched by both studies alike
    inputs = {k: v for k, v in cfg.params.items() if k.startswith("data.")}
    return replace(cfg, study=f"{cfg.study}-posthoc", overrides=fixed, sampler="random",
                   params={"compress.prune_ratio": ParamSpec(type="float", low=low, high=high), **inputs})
