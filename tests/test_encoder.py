import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, BertConfig, BertModel, DistilBertConfig  # noqa: E402

from recsys.efficiency.shape import LayerShape, Shape  # noqa: E402
from recsys.errors import RecsysError  # noqa: E402
from recsys.models.encoder import BertEncoder, load_tokenizer, resolve_model_path  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A random 4-layer BERT (hidden 32, 4 heads of 8, FFN 37) saved as a HF checkpoint."""
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, type_vocab_size=2, initializer_range=0.2,  # large init: peaky attention
    )
    path = tmp_path_factory.mktemp("tiny_bert")
    BertModel(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 99, (3, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 3:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 5:] = 1
    input_ids = input_ids * attention_mask  # pad id 0 at padding
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_matches_hf_tiny(tiny_bert, batch, impl):
    hf = AutoModel.from_pretrained(tiny_bert, attn_implementation=impl).eval()
    ours = BertEncoder.from_pretrained(tiny_bert, attn_implementation=impl).eval()
    assert ours.shape.is_dense and ours.shape.n_layers == 4
    assert ours.config_extras == {
        "layer_norm_eps": 1e-12, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    }
    out = ours(**batch)
    assert out.shape == (3, 11, 32)
    assert max_diff(out, hf(**batch).last_hidden_state) < TOL


@torch.no_grad()
def test_matches_hf_minilm():
    tok = load_tokenizer("minilm")
    assert tok.is_fast
    enc = tok(["A cozy mystery novel set in a seaside village.", "Noise-cancelling headphones"],
              padding=True, return_tensors="pt")
    hf = AutoModel.from_pretrained(resolve_model_path("minilm")).eval()
    ours = BertEncoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2").eval()
    assert ours.shape.heads_per_layer == (12,) * 6 and ours.shape.hidden == 384
    assert max_diff(ours(**enc), hf(**enc).last_hidden_state) < TOL


def random_shape(dense: Shape, seed: int = 0) -> Shape:
    """Different head sets and FFN widths per layer; layer 1 has no attention, layer 2 no FFN."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(dense.n_layers):
        heads = torch.randperm(dense.n_heads_dense, generator=g)[: 1 + i % dense.n_heads_dense].tolist()
        ffn = int(torch.randint(1, dense.ffn_dense + 1, (1,), generator=g))
        layers.append(LayerShape(() if i == 1 else tuple(heads), 0 if i == 2 else ffn))
    return dense.replace(layers=tuple(layers))


def n_params(shape: Shape) -> int:
    H, d = shape.hidden, shape.head_dim
    n = (shape.vocab_size + shape.max_positions + shape.type_vocab_size) * H + 2 * H  # embeddings + LayerNorm
    for layer in shape.layers:
        a = layer.n_heads * d
        n += (3 * (H * a + a) + a * H + H + 2 * H) if layer.has_attention else 0  # q, k, v, out, LayerNorm
        n += (2 * H * layer.ffn + layer.ffn + H + 2 * H) if layer.has_ffn else 0  # up, down, LayerNorm
    return n


@torch.no_grad()
def test_non_uniform_shape(tiny_bert, batch):
    dense = BertEncoder.from_pretrained(tiny_bert).eval()
    shape = random_shape(dense.shape)
    assert not shape.is_uniform and len(set(shape.heads_per_layer)) > 2 and len(set(shape.ffn_per_layer)) > 2
    model = BertEncoder.from_pretrained(tiny_bert, shape=shape).eval()
    assert model.layers[1].attn is None and model.layers[2].ffn is None
    assert sum(p.numel() for p in model.parameters()) == n_params(shape) < n_params(dense.shape)
    assert sum(p.numel() for p in dense.parameters()) == n_params(dense.shape)
    out = model(**batch)
    assert out.shape == (3, 11, 32) and torch.isfinite(out).all()
    # rebuilt from .shape and .config_extras, the module has the same parameters
    rebuilt = BertEncoder(model.shape, **model.config_extras)
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]
    # keeping every head and neuron (heads listed in any order) is the dense model
    full = shape.replace(layers=(LayerShape((3, 1, 0, 2), 37),) * 4)
    assert max_diff(BertEncoder.from_pretrained(tiny_bert, shape=full).eval()(**batch), dense(**batch)) == 0


@torch.no_grad()
def test_kept_heads_equal_zeroed_heads(tiny_bert, batch):
    dense = BertEncoder.from_pretrained(tiny_bert).eval()
    keep = (0, 2)
    shape = dense.shape.replace(layers=(LayerShape(keep, 20),) + dense.shape.layers[1:])
    pruned = BertEncoder.from_pretrained(tiny_bert, shape=shape).eval()
    # the dense model with heads 1, 3 of layer 0 silenced (their output-projection columns zeroed) and FFN
    # neurons 20.. of layer 0 silenced (their down-projection columns zeroed)
    d = dense.shape.head_dim
    for h in set(range(4)) - set(keep):
        dense.layers[0].attn.out.weight[:, h * d:(h + 1) * d] = 0
    dense.layers[0].ffn.down.weight[:, 20:] = 0
    x = dense.embed(batch["input_ids"], batch["token_type_ids"])
    mask = (1.0 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
    for impl in ("sdpa", "eager"):
        assert max_diff(pruned.layers[0].attn(x, mask, impl), dense.layers[0].attn(x, mask, impl)) < TOL
    assert max_diff(pruned(**batch), dense(**batch)) < TOL
    unzeroed = BertEncoder.from_pretrained(tiny_bert).eval()
    assert max_diff(pruned.layers[0].attn(x, mask, "sdpa"), unzeroed.layers[0].attn(x, mask, "sdpa")) > 1e-3


def test_unsupported_architecture(tmp_path):
    DistilBertConfig(vocab_size=99, dim=32, n_layers=1, n_heads=4, hidden_dim=37).save_pretrained(tmp_path)
    with pytest.raises(RecsysError, match="unsupported architecture 'distilbert'") as e:
        BertEncoder.from_pretrained(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_bad_paths(tmp_path, tiny_bert):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(RecsysError, match="does not exist") as e:
        BertEncoder.from_pretrained(missing)
    assert missing in str(e.value)
    with pytest.raises(RecsysError, match="no-such-org/no-such-model") as e:
        BertEncoder.from_pretrained("no-such-org/no-such-model")  # hub id, offline and not cached
    assert "\n" not in str(e.value)
    with pytest.raises(RecsysError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))  # a directory with no tokenizer files
    with pytest.raises(RecsysError, match=r"shape\.n_layers is 2 but the checkpoint has 4"):
        dense = Shape.dense_from_hf_config(BertConfig.from_pretrained(tiny_bert))
        BertEncoder.from_pretrained(tiny_bert, shape=dense.replace(layers=dense.layers[:2]))
    assert resolve_model_path(tiny_bert) == tiny_bert
    assert resolve_model_path("minilm") == resolve_model_path("all-MiniLM-L6-v2")
    with pytest.raises(RecsysError, match="attn_implementation"):
        BertEncoder.from_pretrained(tiny_bert, attn_implementation="flash")
