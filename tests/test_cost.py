"""Cost model: exact parameters and FLOPs against the real encoder, soft costs against finite differences."""
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from recsys.efficiency.cost import SoftShape, cost, online_cost, soft_cost
from recsys.efficiency.shape import LayerShape, Shape
from recsys.models.encoder import BertEncoder
from recsys.models.tower import Tower

BASE = Shape(layers=(LayerShape((0, 1, 2, 3), 64),) * 3, hidden=32, head_dim=8, n_heads_dense=4, ffn_dense=64,
             vocab_size=100, max_positions=40, type_vocab_size=2, seq_len=12, batch=3)


def random_shape(seed: int, output_dim=None) -> Shape:
    rng = random.Random(seed)
    layers = tuple(LayerShape(tuple(sorted(rng.sample(range(4), rng.randint(0, 4)))), rng.choice([0, 1, 17, 64]))
                   for _ in range(3))
    return BASE.replace(layers=layers, output_dim=output_dim)


def build(shape: Shape) -> torch.nn.Module:
    enc = BertEncoder(shape, attn_implementation="eager")
    return Tower(enc, shape.hidden, shape.output_dim).eval()


@pytest.mark.parametrize("seed", range(8))
def test_params_equal_numel_of_the_built_model(seed):
    shape = random_shape(seed, output_dim=[None, 16][seed % 2])
    model = build(shape)
    assert cost(shape)["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("seed", range(6))
def test_flops_match_torch_flop_counter_with_eager_attention(seed):
    shape = random_shape(seed, output_dim=[None, 16][seed % 2])
    model = build(shape)
    ids = torch.randint(0, 100, (shape.batch, shape.seq_len))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, torch.ones_like(ids))
    measured = counter.get_total_flops()
    assert cost(shape)["flops"] == pytest.approx(measured, rel=0.01)


def test_soft_cost_at_zero_one_equals_hard_and_gradients_match_finite_differences():
    shape = random_shape(3, output_dim=16)
    soft = SoftShape.from_shape(shape)
    assert float(soft_cost(soft).params) == cost(shape)["params"]
    torch.manual_seed(0)
    probs = [torch.rand_like(t, dtype=torch.float64).requires_grad_() for t in
             (soft.heads, soft.ffn, soft.attn_block, soft.ffn_block, soft.out)]

    def f(*p):
        c = soft_cost(SoftShape(shape, *p))
        return torch.stack([c.params, c.flops, c.weight_bytes])

    assert torch.autograd.gradcheck(f, probs, eps=1e-6, atol=1e-4)


def test_expected_cost_is_the_mean_over_sampled_hard_shapes():
    """Independent gates: the soft cost equals the average cost of hard shapes sampled from it."""
    shape = BASE
    g = torch.Generator().manual_seed(0)
    p_heads, p_attn = torch.full((3, 4), 0.5, dtype=torch.float64), torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    p_ffn, p_fblock = torch.ones(3, 64, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    expected = soft_cost(SoftShape(shape, p_heads, p_ffn, p_attn, p_fblock)).flops.item()
    total, n = 0.0, 3000
    for _ in range(n):
        heads = torch.rand(3, 4, generator=g, dtype=torch.float64) < p_heads
        attn = torch.rand(3, generator=g, dtype=torch.float64) < p_attn
        s = SoftShape(shape, heads.double(), p_ffn, attn.double(), p_fblock)
        total += soft_cost(s).flops.item()
    assert total / n == pytest.approx(expected, rel=0.02)


def test_online_cost_adds_catalog_scoring():
    shape = BASE.replace(output_dim=16)
    oc = online_cost(shape, n_items=1000)
    assert oc["retrieval_flops"] == 2 * 1000 * 16
    assert oc["flops"] == cost(shape.replace(batch=1))["flops"] + 32000
