"""Cost penalties on a tower's soft shape: λ-weighted (penalty mode) or a Lagrangian budget (budget mode).

Both read normalised costs r = cost(soft shape) / cost(dense shape) from the cost model
(`recsys.efficiency.cost.soft_cost`, `recsys.efficiency.predictor.predict_soft`):

- params:  the tower's parameters;
- flops:   one forward of the tower at its run conditions, plus retrieval over the catalog for an online (user)
           tower: exact scoring, or the search of the run's retrieval index (recsys/efficiency/index_cost.py);
- latency: predicted online latency, user tower at batch 1 plus retrieval (differentiable latency tables; an
           index's search from its latency model calibrated on this device).

Penalty mode:  loss = task + λp·P/P_dense + λf·F/F_dense + λl·T/T_dense.

Budget mode (CoFi, Xia, Zhong & Chen 2022, "Structured Pruning Learns Compact and Accurate Models", ACL; after
Wang, Wohlwend & Lei 2020): for one cost ratio r and a target t,

    L_budget = λ1·(r − t') + λ2·(r − t')²,

where the multipliers λ1, λ2 are trained by gradient *ascent* (they grow while the constraint is violated) and
the target t' is ramped linearly from 1 (dense) to t over the first `warmup` fraction of training.

The fair schedule (`compress.target_by`, issue 27): the expected cost is to reach t by a fraction b of the training
steps, after which the structure is fixed and the rest of training recovers. The ramp then spans b/2, from the
gates' starting cost (`from_start`), and the target is held for the other half; the gates are projected onto t'
after every step (`recsys.models.gates.project_expected_cost`), so the schedule does not depend on how fast the
multipliers happen to grow on a given model.

Example:
    >>> costs = CostNormaliser(user_shape, n_items=1682)            # dense references computed once
    >>> ratios = costs(gates.soft_shape())                           # {"params": r_p, "flops": r_f, ...}
    >>> penalty = PenaltyLoss(lambda_params=0.1)(ratios)             # λp·r_p
"""
from __future__ import annotations

import torch
from torch import nn

from recsys.config import RetrievalConfig
from recsys.efficiency.cost import SoftShape, retrieval_flops, soft_cost
from recsys.efficiency.index_cost import IndexLatencyModel, index_work
from recsys.efficiency.predictor import LatencyTables, predict_soft
from recsys.efficiency.shape import Shape

METRICS = ("params", "flops", "latency")


class CostNormaliser:
    """Cost ratios of soft shapes against the dense shape of `base` (its run conditions and output dim).

    `n_items` > 0 makes it the online cost (retrieval over the catalog added to FLOPs and latency); latency
    needs `tables` (only for an online tower: the predictor is per request, batch 1). With a retrieval `index`
    (not exact) retrieval is that index's search: its counted work, and with latency its time from
    `index_model` (`recsys.serving.index_route.calibrate_index_latency`)."""

    def __init__(self, base: Shape, n_items: int = 0, tables: LatencyTables | None = None,
                 index: RetrievalConfig | None = None, index_model: IndexLatencyModel | None = None):
        self.base, self.n_items, self.tables = base, n_items, tables
        self.index = index if index is not None and index.index != "exact" and n_items else None
        if self.index is not None and tables is not None and index_model is None:
            raise ValueError("a latency cost through a retrieval index needs its latency model (index_model)")
        self.index_model = index_model
        if self.index is not None:  # the index's work is affine in the embedding dim d: w0 + w1·d
            w0 = index_work(self.index, n_items, 0)["madds"]
            self.index_madds = (w0, index_work(self.index, n_items, 1)["madds"] - w0)
        self.dense = {k: float(v) for k, v in self._costs(SoftShape.from_shape(base.dense())).items()}

    def _costs(self, s: SoftShape) -> dict[str, torch.Tensor]:
        c = soft_cost(s)
        dim = s.out.sum() if s.out is not None else float(s.base.hidden)
        if self.index is not None:
            madds = self.index_madds[0] + self.index_madds[1] * dim  # differentiable in output gates
            flops = c.flops + 2 * madds
        else:
            flops = c.flops + (retrieval_flops(self.n_items, dim) if self.n_items else 0.0)
        out = {"params": c.params, "flops": flops}
        if self.tables is not None:
            if self.index is not None:
                kind = self.index.index
                search = self.index_model.scale[kind] * madds / 1e6 + self.index_model.overhead_ms[kind]
                out["latency"] = predict_soft(self.tables, s, None) + search
            else:
                out["latency"] = predict_soft(self.tables, s, self.n_items or None)
        return out

    def __call__(self, s: SoftShape) -> dict[str, torch.Tensor]:
        """{"params", "flops"[, "latency"]} → cost / dense cost, differentiable in `s`."""
        return {k: v / self.dense[k] for k, v in self._costs(s).items()}


class PenaltyLoss(nn.Module):
    """λp·r_params + λf·r_flops + λl·r_latency over cost ratios (a term whose λ is 0 is skipped)."""

    def __init__(self, lambda_params: float = 0.0, lambda_flops: float = 0.0, lambda_latency: float = 0.0):
        super().__init__()
        self.lambdas = {"params": lambda_params, "flops": lambda_flops, "latency": lambda_latency}

    @property
    def active(self) -> bool:
        return any(v > 0 for v in self.lambdas.values())

    def forward(self, ratios: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for k, lam in self.lambdas.items():
            if lam > 0:
                total = total + lam * ratios[k]
        return total


class BudgetLoss(nn.Module):
    """CoFi's Lagrangian λ1·(r − t') + λ2·(r − t')² for one metric, multipliers ascended by their gradient.

    `forward(ratio, progress)` takes the cost ratio r and the fraction of training done (for the ramp of t').
    `from_start`: t' ramps from the ratio of the first step (the gates' starting cost, kept with the checkpoint)
    instead of from 1, so a start below 1 is not first pushed back up to it."""

    def __init__(self, metric: str, target: float, warmup: float = 0.5, from_start: bool = False):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"budget metric: unknown {metric!r} (expected {', '.join(METRICS)})")
        if not 0 < target <= 1:
            raise ValueError(f"budget target: must be in (0, 1], got {target}")
        self.metric, self.target, self.warmup = metric, target, warmup
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))
        for p in (self.lambda1, self.lambda2):
            p.register_hook(torch.neg)  # gradient ascent on the multipliers with any minimising optimizer
        if from_start:
            self.register_buffer("start", torch.tensor(float("nan")))  # the first step's ratio
        self.from_start = from_start

    def current_target(self, progress: float) -> float:
        ramp = min(1.0, progress / self.warmup) if self.warmup > 0 else 1.0
        start = float(self.start) if self.from_start and not torch.isnan(self.start) else 1.0
        start = max(start, self.target)
        return start - (start - self.target) * ramp

    def forward(self, ratio: torch.Tensor, progress: float) -> torch.Tensor:
        if self.from_start and torch.isnan(self.start):
            self.start.fill_(float(ratio.detach()))
        gap = ratio - self.current_target(progress)
        return self.lambda1 * gap + self.lambda2 * gap * gap
