"""Hard-concrete gates, soft/hard shapes, cost penalties, the budget Lagrangian, and materialization."""
import math

import pytest
import torch

from recsys.config import CompressConfig, ModelConfig
from recsys.efficiency.cost import cost, soft_cost
from recsys.losses.penalties import BudgetLoss, CostNormaliser, PenaltyLoss
from recsys.models.gates import BETA, GAMMA, ZETA, HardConcrete
from recsys.models.two_tower import build_tower
from recsys.serving.materialize import materialize


def _gated_tower(tiny_model, gates=("heads", "ffn", "blocks", "output"), projection_dim=None, ffn_group=1):
    cfg = ModelConfig(encoder=tiny_model, projection_dim=projection_dim, dropout=0.0)
    return build_tower(tiny_model, cfg, CompressConfig(gates=list(gates), ffn_group=ffn_group))


def _inputs(n=5, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, L), generator=g)
    mask = torch.ones(n, L, dtype=torch.long)
    mask[0, 7:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def _randomise(tower, seed=0, low=-6.0, high=6.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tower.gates.parameters():
            p.copy_(torch.empty(p.shape).uniform_(low, high, generator=g))


def test_hard_concrete_open_probability_matches_sampling():
    torch.manual_seed(0)
    gate = HardConcrete(5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
    samples = torch.stack([gate() for _ in range(20000)])  # train mode: sampled
    assert samples.min() >= 0 and samples.max() <= 1
    assert torch.allclose((samples > 0).float().mean(0), gate.open_prob().detach(), atol=0.015)
    # the closed form, by hand for log α = 0
    assert gate.open_prob()[2].item() == pytest.approx(1 / (1 + math.exp(BETA * math.log(-GAMMA / ZETA))))
    gate.eval()
    expected = (torch.sigmoid(gate.log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    assert torch.equal(gate(), expected) and gate()[0] == 0 and gate()[4] == 1


def test_gated_tower_starts_dense(tiny_model):
    tower = _gated_tower(tiny_model).eval()
    plain = build_tower(tiny_model, ModelConfig(encoder=tiny_model, dropout=0.0)).eval()
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(tower(**x), plain(**x), atol=1e-6)
    assert tower.gates.hard_shape().layers == tower.shape.layers  # every unit kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_materialized_tower_matches_gated_and_is_smaller(tiny_model, seed):
    tower = _gated_tower(tiny_model, projection_dim=16, ffn_group=2 if seed == 2 else 1)
    _randomise(tower, seed)
    tower.eval()
    compact = materialize(tower)
    x = _inputs(seed=seed)
    with torch.no_grad():
        gated, small = tower(**x), compact(**x)
    kept = tower.gates.kept()["output"] > 0  # closed output dims are zeros in the gated embedding
    assert 0 < kept.sum() < 16 and (gated[:, ~kept] == 0).all()
    assert torch.allclose(small, gated[:, kept], atol=1e-4)
    shape = tower.gates.hard_shape()
    assert compact.encoder.shape == shape.replace(output_dim=None) and compact.dim == shape.output_dim
    n_params = sum(p.numel() for p in compact.parameters())
    assert n_params == cost(shape)["params"]  # the cost model counts the compact tower exactly
    dense_params = sum(p.numel() for n, p in tower.named_parameters() if "gates" not in n)
    assert n_params < dense_params


def test_materialize_drops_whole_sublayers(tiny_model):
    tower = _gated_tower(tiny_model, gates=("heads", "ffn", "blocks"))
    with torch.no_grad():
        tower.gates.attn_block.log_alpha[0] = -6.0  # layer 0 attention closed as a block
        tower.gates.heads.log_alpha[1] = -6.0  # layer 1: every head closed → attention absent too
        tower.gates.ffn.log_alpha[1, :40] = -6.0  # layer 1 keeps 24 of 64 neurons
    tower.eval()
    shape = tower.gates.hard_shape()
    assert [ls.has_attention for ls in shape.layers] == [False, False]
    assert shape.ffn_per_layer == (64, 24)
    compact = materialize(tower)
    assert all(layer.attn is None for layer in compact.encoder.layers)
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(compact(**x), tower(**x), atol=1e-4)


def test_soft_shape_penalty_has_gradients_and_dense_ratio_one(tiny_model):
    tower = _gated_tower(tiny_model, projection_dim=16)
    base = tower.shape.replace(seq_len=16, batch=1)
    costs = CostNormaliser(base, n_items=100)
    ratios = costs(tower.gates.soft_shape(base))
    # at init every unit is open with probability ~0.99: ratios just under 1
    assert all(0.9 < r.item() <= 1.0 for r in ratios.values())
    # exactly 1 for the dense hard shape
    from recsys.efficiency.cost import SoftShape
    assert all(float(r) == pytest.approx(1.0) for r in costs(SoftShape.from_shape(base.dense())).values())
    PenaltyLoss(lambda_params=1.0, lambda_flops=1.0)(ratios).backward()
    for name in ("heads", "ffn", "attn_block", "ffn_block", "output"):
        g = getattr(tower.gates, name).log_alpha.grad
        assert g is not None and (g > 0).all(), name  # closing any unit lowers the cost


def test_soft_cost_of_gates_is_expected_cost_under_sampling(tiny_model):
    """The soft shape's FLOPs equal the Monte Carlo mean of the hard shapes' FLOPs under independent gates."""
    tower = _gated_tower(tiny_model, gates=("heads", "ffn", "blocks"))
    _randomise(tower, 3, -1.5, 1.5)
    base = tower.shape.replace(seq_len=16, batch=1)
    expected = soft_cost(tower.gates.soft_shape(base)).flops.item()
    torch.manual_seed(0)
    total, n = 0.0, 3000
    from recsys.efficiency.cost import SoftShape
    for _ in range(n):
        z = tower.gates.values()  # train mode: a sample
        s = SoftShape(base, (z["heads"] > 0).double(), (z["ffn"] > 0).double(), (z["attn_block"] > 0).double(),
                      (z["ffn_block"] > 0).double())
        total += float(soft_cost(s).flops)
    assert total / n == pytest.approx(expected, rel=0.02)


def test_penalty_loss_exact():
    ratios = {"params": torch.tensor(0.5), "flops": torch.tensor(0.25), "latency": torch.tensor(0.8)}
    assert float(PenaltyLoss(0.1, 0.2, 0.3)(ratios)) == pytest.approx(0.1 * 0.5 + 0.2 * 0.25 + 0.3 * 0.8)
    assert float(PenaltyLoss(0.0, 2.0, 0.0)({"params": torch.tensor(0.5), "flops": torch.tensor(0.25)})) == 0.5
    assert not PenaltyLoss().active


def test_budget_loss_exact_ramp_and_ascent():
    b = BudgetLoss("flops", target=0.25, warmup=0.5)
    assert b.current_target(0.0) == 1.0
    assert b.current_target(0.25) == pytest.approx(0.625)
    assert b.current_target(0.9) == pytest.approx(0.25)
    with torch.no_grad():
        b.lambda1.fill_(0.5)
        b.lambda2.fill_(2.0)
    ratio = torch.tensor(0.6, requires_grad=True)
    loss = b(ratio, progress=1.0)
    assert float(loss) == pytest.approx(0.5 * 0.35 + 2.0 * 0.35**2)
    loss.backward()
    assert float(ratio.grad) == pytest.approx(0.5 + 2 * 2.0 * 0.35)  # pushes the ratio down
    # multipliers ascend: their stored gradient is minus d loss / d λ, so SGD raises them while r > t
    assert float(b.lambda1.grad) == pytest.approx(-0.35) and float(b.lambda2.grad) == pytest.approx(-0.35**2)
    torch.optim.SGD(b.parameters(), lr=1.0).step()
    assert float(b.lambda1) > 0.5 and float(b.lambda2) > 2.0


@pytest.mark.parametrize("bad, message", [
    ({"lambda_flops": -1.0}, "lambda_flops must be in [0, inf]"),
    ({"budget_metric": "flops", "budget_target": 1.5, "gates": ["heads"]}, "budget_target must be in (0, 1]"),
    ({"budget_metric": "flops", "budget_target": 0.0, "gates": ["heads"]}, "budget_target must be in (0, 1]"),
    ({"budget_metric": "flops"}, "budget_metric and budget_target go together"),
    ({"budget_metric": "speed", "budget_target": 0.5, "gates": ["heads"]}, "budget_metric must be one of"),
    ({"gates": ["head"]}, "did you mean 'heads'"),
    ({"lambda_params": 0.1}, "cost penalties need gates"),
    ({"lambda_params": 0.1, "budget_metric": "flops", "budget_target": 0.5, "gates": ["heads"]}, "not both"),
])
def test_compress_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=None) as e:
        CompressConfig(**bad)
    assert message in str(e.value)


def test_output_gates_without_projection_get_identity_projection(tiny_model):
    tower = _gated_tower(tiny_model, gates=("output",)).eval()
    plain = build_tower(tiny_model, ModelConfig(encoder=tiny_model, dropout=0.0)).eval()
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(tower(**x), plain(**x), atol=1e-6)
    assert tower.projection is not None and tower.gates.output.log_alpha.shape == (32,)
