"""Int8 for a tower: quantization-aware training (QAT), post-training quantization (PTQ), and the serving routes
the latency harness compares.

Two int8 schemes, one per kernel backend (`compress.int8_backend`), each with a fake-quantiser that reproduces
its real kernels in float, so QAT trains for exactly what is served and PTQ is the same deployment of a float
tower:
- torchao (CPUs with VNNI/AMX, GPUs): int8 symmetric per-channel weights, int8 asymmetric per-token dynamic
  activations. QAT: torchao's `IntxFakeQuantizeConfig`; served by `Int8DynamicActivationInt8WeightConfig
  (act_mapping_type=ASYMMETRIC)` + `torch.compile` (`quantize_int8`). torchao's own QAT convert target, an
  IntxWeight config, has no fast CPU kernel; its QAT supports asymmetric per-token activations only.
- onnxruntime (any x86; measured 1.55× faster than fp32 eager on an AVX2 EPYC where torchao's int8 path is 17×
  slower): `quantize_dynamic` with per-channel weights. Its weights are int8 symmetric per output channel in
  7 bits ([-64, 64], `reduce_range`: the u8×s8 AVX2 kernels saturate their int16 sums at full range) and its
  activations uint8 asymmetric per tensor, computed at run time (`DynamicQuantizeLinear`). QAT:
  `OrtFakeQuantLinear` (torch's fake-quantize ops, straight-through gradients), per example so that a training
  batch sees what a batch-1 request sees — tested against the ONNX Runtime session.
Both quantize the Linear layers named by `compress.quantize_layers` (attention q/k/v/out, FFN up/down, and with
torchao the projection); embeddings, LayerNorms and attention's activation×activation products stay float.

Serving routes (`serve`): fp32 eager, fp32 `torch.compile` (freezing), bf16 + compile, torchao int8 + compile,
ONNX Runtime fp32 and ONNX Runtime int8.

References: Jacob et al. 2018 (integer-arithmetic-only inference and QAT, arXiv:1712.05877); Zafrir et al.
2019 (Q8BERT, arXiv:1910.06188); Bengio et al. 2013 (straight-through estimator, arXiv:1308.3432).
"""
from __future__ import annotations

import ast
import copy
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from recsys.config import Int8Backend, ServingPrecision, check_quantize_layers, choices
from recsys.errors import RecsysError
from recsys.serving.export import OPSET

# module-path suffixes of the Linear layers behind each quantizable layer name (config.QuantizableLayer)
LAYERS = {"attention": (".attn.q", ".attn.k", ".attn.v", ".attn.out"), "ffn": (".ffn.up", ".ffn.down"),
          "projection": ("projection",)}
PRECISIONS = choices(ServingPrecision)
BACKENDS = choices(Int8Backend)
ROUTES = ("fp32", "fp32-compile", "bf16-compile", "int8-compile", "ort-fp32", "ort-int8")
ROUTE_OF = {"fp32": "fp32", "bf16": "bf16-compile", "int8": "int8-compile"}  # how each precision is served
DTYPE_OF = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}  # the Shape's dtype name


def route_for(precision: str, backend: str = "torchao") -> str:
    """The serving route of a precision; int8 by `backend` (compress.int8_backend)."""
    return "ort-int8" if precision == "int8" and backend == "onnxruntime" else ROUTE_OF[precision]


def _suffixes(layers, backend: str = "torchao") -> tuple[str, ...]:
    check_quantize_layers(layers, backend)
    return tuple(s for name in layers for s in LAYERS[name])


def _filter(layers, backend: str = "torchao") -> Callable[[nn.Module, str], bool]:
    suffixes = _suffixes(layers, backend)
    return lambda m, fqn: isinstance(m, nn.Linear) and fqn.endswith(suffixes)


class OrtFakeQuantLinear(nn.Linear):
    """A Linear layer computing what ONNX Runtime's dynamic int8 MatMul computes (see the module docstring), in
    float with straight-through gradients. Holds the same parameters as the Linear it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, ..., in]
        return nn.functional.linear(ort_fake_quant_activation(x), ort_fake_quant_weight(self.weight), self.bias)


def ort_fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] → int8 symmetric per output channel, 7-bit range [-64, 64], back to float."""
    scale = (w.detach().abs().amax(1) / 64).clamp_min(torch.finfo(torch.float32).tiny).float()  # [out]
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -64, 64)


def ort_fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """x [B, ...] → uint8 asymmetric over each example's whole tensor (its range widened to include 0, as
    DynamicQuantizeLinear does at batch 1), back to float."""
    flat = x.reshape(x.shape[0], -1)  # [B, n]
    lo = flat.detach().amin(1).clamp(max=0)
    hi = flat.detach().amax(1).clamp(min=0)
    scale = ((hi - lo) / 255).float()
    scale = torch.where(scale > torch.finfo(torch.float32).tiny, scale, torch.ones_like(scale))  # [B]
    zero = torch.round(-lo / scale).clamp(0, 255).to(torch.int32)
    return torch.fake_quantize_per_channel_affine(flat, scale, zero, 0, 0, 255).reshape(x.shape)


def _swap(tower: nn.Module, keep: Callable[[nn.Module, str], bool], to: type[nn.Linear]) -> None:
    """Replace each Linear for which keep(module, name) holds by a `to` layer holding the same parameters."""
    for name, m in list(tower.named_modules()):
        if keep(m, name):
            new = to(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            new.weight, new.bias = m.weight, m.bias
            parent, _, child = name.rpartition(".")
            setattr(tower.get_submodule(parent) if parent else tower, child, new)


def _fake_quant_configs():
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weights = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    return activations, weights


def prepare_qat(tower: nn.Module, layers=("attention", "ffn"), backend: str = "torchao") -> nn.Module:
    """Insert int8 fake-quantisation of `backend`'s scheme into `tower`'s Linear layers in place (parameters are
    kept, so an optimizer built before or after sees the same tensors); forward and backward run in float."""
    if backend not in BACKENDS:
        raise RecsysError(f"int8_backend: unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    if backend == "onnxruntime":
        keep = _filter(layers, backend)
        _swap(tower, lambda m, fqn: type(m) is nn.Linear and keep(m, fqn), OrtFakeQuantLinear)
        return tower
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    act, weight = _fake_quant_configs()
    quantize_(tower, QATConfig(activation_config=act, weight_config=weight, step="prepare"),
              filter_fn=_filter(layers))
    return tower


def convert_qat(tower: nn.Module) -> nn.Module:
    """Remove the fake quantisers in place: plain float Linear layers holding the QAT-trained weights."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    _swap(tower, lambda m, fqn: isinstance(m, OrtFakeQuantLinear), nn.Linear)
    if is_qat(tower):
        quantize_(tower, QATConfig(step="convert"), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return tower


def is_qat(tower: nn.Module) -> bool:
    from torchao.quantization.qat.linear import FakeQuantizedLinear
    return any(isinstance(m, (FakeQuantizedLinear, OrtFakeQuantLinear)) for m in tower.modules())


def simulate_int8(tower: nn.Module, layers=("attention", "ffn"), backend: str = "torchao") -> nn.Module:
    """An eager copy of `tower` computing the numbers its int8 route serves, for evaluation: torchao's real
    int8 kernels (`quantize_int8`), or the ONNX Runtime scheme's fake-quantisation (equal to the session up to
    float rounding, tested) — a QAT tower's own quantisers are replaced by the same."""
    if backend == "torchao":
        return quantize_int8(tower, layers)
    sim = convert_qat(copy.deepcopy(tower)).eval()
    return prepare_qat(sim, layers, backend)


def quantize_int8(tower: nn.Module, layers=("attention", "ffn")) -> nn.Module:
    """A copy of `tower` with real int8 weights and dynamic int8 activations (torchao), the scheme QAT trains
    for: PTQ of a float tower, deployment of a QAT tower (whose fake quantisers are removed first)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from torchao.quantization.quant_primitives import MappingType

    tower = copy.deepcopy(tower).eval()
    if is_qat(tower):
        convert_qat(tower)
    quantize_(tower, Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC),
              filter_fn=_filter(layers))
    return tower


def _compiled(module: nn.Module) -> Callable:
    import torch._inductor.config as inductor

    inductor.freezing = True  # constant-fold the weights (the fast CPU inference path)
    return torch.compile(module, dynamic=False)


def _linear_nodes(model, layers) -> list[str]:
    """Names of the ONNX MatMul nodes that the torch exporter emitted for the Linear layers in `layers` (it
    records each node's module path in the `pkg.torch.onnx.name_scopes` metadata); [] for a tower without any
    (every block pruned)."""
    suffixes, nodes, traced = _suffixes(layers, "onnxruntime"), [], False
    for node in model.graph.node:
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props
                       if p.key == "pkg.torch.onnx.name_scopes"), [])
        traced |= bool(scopes)
        if node.op_type == "MatMul" and len(scopes) >= 2 and scopes[-2].endswith(suffixes):
            nodes.append(node.name)
    if not traced:
        raise RecsysError("ONNX Runtime int8: the exported graph records no module paths (pkg.torch.onnx.name_scopes)"
                          "; cannot tell which MatMuls are the quantize_layers")
    return nodes


def _onnx_session(tower: nn.Module, example: dict[str, torch.Tensor], int8: bool, workdir: Path,
                  layers=("attention", "ffn")):
    import onnxruntime as ort

    path = workdir / "tower.onnx"
    torch.onnx.export(tower, (example["input_ids"], example["attention_mask"]), str(path),
                      input_names=["input_ids", "attention_mask"], output_names=["tower_output"], opset_version=OPSET,
                      dynamo=True, verbose=False)
    if int8:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
        q = workdir / "tower.int8.onnx"
        # the Linear layers in `layers` only (as torchao's route): no embedding Gather, no activation×activation.
        # reduce_range: 7-bit weights, so the u8×s8 AVX2 kernels (no VNNI) cannot saturate their int16 sums —
        # with full-range weights the tiny test tower's embeddings moved by 0.30, with 7 bits by 0.006
        nodes = _linear_nodes(onnx.load(path), layers)
        if nodes:  # (a tower whose blocks are all pruned has nothing to quantize)
            quantize_dynamic(str(path), str(q), per_channel=True, weight_type=QuantType.QInt8, reduce_range=True,
                             op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                             extra_options={"MatMulConstBOnly": True})
            path = q
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    # no spinning: after a run ORT's idle threads spin on the cores that the request's retrieval (PyTorch) and,
    # in an interleaved benchmark, the next route need — measured here, the PyTorch call after an ORT call ran
    # 1.8× slower (13.8 → 24.9 ms); without spinning ORT itself is ≈ 10% slower and disturbs nothing
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def serve(tower: nn.Module, route: str, example: dict[str, torch.Tensor],
          layers=("attention", "ffn")) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """A callable inputs → embeddings [B, d] serving a copy of `tower` by `route` (see ROUTES), built and warmed
    on `example` (compiled routes are specialised to its shape)."""
    if route not in ROUTES:
        raise RecsysError(f"route: unknown serving route {route!r} (expected one of {', '.join(ROUTES)})")
    base = copy.deepcopy(tower).eval()
    if is_qat(base):
        convert_qat(base)
    if route.startswith("ort-"):
        with tempfile.TemporaryDirectory(prefix="recsys-ort-") as tmp:
            session = _onnx_session(base, example, route == "ort-int8", Path(tmp), layers)

        def run(inputs):
            feed = {k: inputs[k].numpy() for k in ("input_ids", "attention_mask")}
            return torch.from_numpy(session.run(None, feed)[0])
    else:
        if route == "int8-compile":
            model = _compiled(quantize_int8(base, layers))
        elif route == "bf16-compile":
            model = _compiled(base.to(torch.bfloat16))
        elif route == "fp32-compile":
            model = _compiled(base)
        else:
            model = base

        @torch.inference_mode()
        def run(inputs):
            return model(**inputs).float()
    run(example)  # compile / warm up
    return run
