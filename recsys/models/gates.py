"""Hard-concrete (L0) gates over a tower's prunable units, and the soft / hard shapes they define.

A gate z ∈ [0, 1] multiplies one unit: an attention head's context, an FFN neuron (or a group of neurons), a
whole attention or FFN sublayer, or one output embedding dimension. While training z is sampled from the
hard-concrete distribution (Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through L0
Regularization", ICLR; the CoFi parametrisation of Xia et al. 2022):

    u ~ U(0, 1),  s = sigmoid((log u − log(1 − u) + log α) / β),  z = clamp(s·(ζ − γ) + γ, 0, 1)

with β = 2/3, γ = −0.1, ζ = 1.1. At evaluation z is deterministic: ẑ = clamp(sigmoid(log α)·(ζ − γ) + γ, 0, 1),
which is exactly 0 or 1 unless |log α| < 2.4; sublayer gates are rounded to {0, 1} (a half-present
sublayer cannot be materialized), the others keep their value, which materialization folds into weights.
The probability that a unit is open, P(z > 0) = sigmoid(log α − β·log(−γ/ζ)), is the soft shape the cost model
takes; units with ẑ > 0 form the hard shape. Gates start at log α = `init` (3.0: every ẑ = 1, the dense model).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from recsys.config import CompressConfig, GateKind, choices
from recsys.efficiency.cost import SoftShape
from recsys.efficiency.shape import LayerShape, Shape
from recsys.errors import RecsysError

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
KINDS = choices(GateKind)  # what can be gated (config `compress.gates`)


class HardConcrete(nn.Module):
    """`shape` independent hard-concrete gates; `forward()` → z of that shape (sampled in train mode)."""

    def __init__(self, *shape: int, init: float = 3.0):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(shape, float(init)))

    def forward(self) -> torch.Tensor:
        if not self.training:
            return self.deterministic()
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        return (torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def open_prob(self) -> torch.Tensor:
        """P(z > 0), differentiable in log α (the expected L0 norm per unit)."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))


class TowerGates(nn.Module):
    """The gates of one tower. `values()` gives the per-forward gate tensors the encoder and tower consume:
    heads [n_layers, n_heads], ffn [n_layers, ffn_dense], attn_block / ffn_block [n_layers], output [d]
    (only the kinds that are gated; missing kinds mean "always 1")."""

    def __init__(self, base: Shape, kinds: tuple[str, ...], ffn_group: int = 1, init: float = 3.0):
        super().__init__()
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"compress.gates: unknown gate kind {unknown[0]!r} (known: {', '.join(KINDS)})")
        if base.ffn_dense % ffn_group:
            raise ValueError(f"compress.ffn_group: {ffn_group} does not divide the FFN width {base.ffn_dense}")
        if "output" in kinds and base.output_dim is None:
            raise ValueError("compress.gates: 'output' needs a projection (set model.projection_dim)")
        self.base, self.kinds, self.ffn_group = base, tuple(kinds), ffn_group
        self.frozen = False  # fixed structure: deterministic values in train mode too, not trained
        n = base.n_layers
        self.heads = HardConcrete(n, base.n_heads_dense, init=init) if "heads" in kinds else None
        self.ffn = HardConcrete(n, base.ffn_dense // ffn_group, init=init) if "ffn" in kinds else None
        self.attn_block = HardConcrete(n, init=init) if "blocks" in kinds else None
        self.ffn_block = HardConcrete(n, init=init) if "blocks" in kinds else None
        self.output = HardConcrete(base.output_dim, init=init) if "output" in kinds else None

    def _expand(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.ffn_group, dim=-1) if name == "ffn" else t  # groups → neurons

    def values(self) -> dict[str, torch.Tensor]:
        """Gate values for one forward: sampled in train mode, deterministic (blocks rounded) in eval mode."""
        out = {}
        for name in ("heads", "ffn", "attn_block", "ffn_block", "output"):
            gate = getattr(self, name)
            if gate is None:
                continue
            z = self._expand(name, gate.deterministic() if self.frozen else gate())
            if (self.frozen or not self.training) and name.endswith("_block"):
                z = (z >= 0.5).to(z.dtype)
            out[name] = z
        return out

    def soft_shape(self, base: Shape | None = None) -> SoftShape:
        """Open probabilities as a `SoftShape` (at `base`'s run conditions; default: the gates' base)."""
        base = base or self.base
        dense = SoftShape.from_shape(base.dense(), dtype=torch.float32)
        probs = {}
        for name in ("heads", "ffn", "attn_block", "ffn_block", "output"):
            gate = getattr(self, name)
            fixed = getattr(dense, "out" if name == "output" else name)
            probs[name] = self._expand(name, gate.open_prob()) if gate is not None else fixed
        return SoftShape(base, probs["heads"], probs["ffn"], probs["attn_block"], probs["ffn_block"],
                         probs["output"])

    @torch.no_grad()
    def kept(self) -> dict[str, torch.Tensor]:
        """Deterministic gate values with every kind present (1 where not gated): what the eval model uses."""
        was = self.training
        self.eval()
        z = self.values()
        self.train(was)
        b = self.base
        ones = {"heads": torch.ones(b.n_layers, b.n_heads_dense), "ffn": torch.ones(b.n_layers, b.ffn_dense),
                "attn_block": torch.ones(b.n_layers), "ffn_block": torch.ones(b.n_layers),
                "output": torch.ones(b.output_dim) if b.output_dim else None}
        z = {k: z.get(k, v) for k, v in ones.items()}
        # a sublayer whose heads (neurons) are all closed is absent: the same model, and no empty blocks
        z["attn_block"] = z["attn_block"] * (z["heads"] > 0).any(1)
        z["ffn_block"] = z["ffn_block"] * (z["ffn"] > 0).any(1)
        return z

    def freeze(self) -> None:
        """Fix the structure (e.g. for recovery fine-tuning): deterministic gates, no gradients."""
        self.frozen = True
        self.requires_grad_(False)

    @torch.no_grad()
    def set_mask(self, keep: dict[str, torch.Tensor], value: float = 10.0) -> None:
        """Open (log α = +value; ẑ = 1 for value ≥ 2.4) or close (−value, ẑ = 0) units from boolean masks of the
        gated kinds' shapes (heads [n_layers, n_heads], ffn [n_layers, ffn_dense / ffn_group], ...). At 10 the
        pattern is fixed in practice (no gradient reaches it); at a smaller value (prune-then-learn) it can move."""
        for name, mask in keep.items():
            getattr(self, name).log_alpha.copy_(torch.where(mask, value, -value))

    def hard_shape(self) -> Shape:
        """The compact shape: units with deterministic gate > 0, sublayers whose block gate is open."""
        z = self.kept()
        layers = []
        for i in range(self.base.n_layers):
            heads = tuple(int(h) for h in torch.nonzero(z["heads"][i] > 0).flatten()) if z["attn_block"][i] else ()
            ffn = int((z["ffn"][i] > 0).sum()) if z["ffn_block"][i] else 0
            layers.append(LayerShape(heads, ffn))
        out = int((z["output"] > 0).sum()) if z["output"] is not None else None
        if out == 0:
            raise ValueError("gates closed every output dimension; the tower has no embedding left")
        return self.base.replace(layers=tuple(layers), output_dim=out)


class _Shift:
    """Every gated kind's log α moved by one common offset from where they stood when this was made."""

    def __init__(self, gates: TowerGates):
        self.params = [g.log_alpha for g in (gates.heads, gates.ffn, gates.attn_block, gates.ffn_block, gates.output)
                       if g is not None]
        self.start = [p.detach().clone() for p in self.params]

    def __call__(self, delta: float) -> None:
        for p, s in zip(self.params, self.start, strict=True):
            p.copy_(s + delta)


def _boundary(within: Callable[[float], bool], lo: float = -30.0, hi: float = 30.0, iterations: int = 40) -> float:
    """The largest δ in [lo, hi] with `within(δ)` (true below some point, false above it): bisection."""
    if within(hi):
        return hi
    for _ in range(iterations):  # invariant: within(lo) or lo is the bound, not within(hi)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if within(mid) else (lo, mid)
    return lo


@torch.no_grad()
def project_expected_cost(gates: TowerGates, cost: Callable[[SoftShape], float], target: float,
                          base: Shape | None = None) -> float | None:
    """Shift every gated kind's log α by one common offset δ so that the expected cost `cost(soft shape)` (at
    `base`'s run conditions) is `target`; the relative log α, which units are kept first, are unchanged. The cost
    grows with δ; δ is found by bisection on [−30, 30]. Returns δ: 0 (nothing changed) when every gate open is
    within `target`, None (nothing changed) when every gate closed (δ = −30) still costs more."""
    shift = _Shift(gates)

    def within(delta: float) -> bool:
        shift(delta)
        return cost(gates.soft_shape(base)) <= target

    if within(30.0):  # every gate open is within the target
        shift(0.0)
        return 0.0
    if not within(-30.0):
        shift(0.0)
        return None
    delta = _boundary(within)
    shift(delta)
    return delta


@torch.no_grad()
def project_hard_cost(gates: TowerGates, cost: Callable[[Shape], float], target: float) -> float | None:
    """Shift every gated kind's log α by the largest common δ in [−30, 30] whose hard shape costs at most `target`
    by `cost` (a ratio to dense): the structure about to be fixed spends the budget as the expected cost did,
    sublayer rounding included (a half-open sublayer gate in the expectation is all or nothing in the hard shape).
    None (nothing changed) when no valid shape reaches the target."""
    shift = _Shift(gates)

    def within(delta: float) -> bool:
        shift(delta)
        try:
            return cost(gates.hard_shape()) <= target
        except ValueError:  # every output dim closed: no embedding left (below any reachable target)
            return True

    delta = _boundary(within)
    shift(delta)
    try:
        if cost(gates.hard_shape()) <= target:
            return delta
    except ValueError:
        pass
    shift(0.0)
    return None


def gates_for(shape: Shape, compress: CompressConfig | None) -> TowerGates | None:
    """The gates `compress.gates` asks for on a tower of `shape` (None when it asks for none); an impossible
    request (e.g. an FFN group that does not divide the width) is one line."""
    kinds = compress.gates if compress is not None else []
    if not kinds:
        return None
    try:
        return TowerGates(shape, tuple(kinds), compress.ffn_group, compress.gate_init)
    except ValueError as e:
        raise RecsysError(str(e)) from None
