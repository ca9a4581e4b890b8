"""Int8 for a tower: quantization-aware training (QAT), post-training quantization (PTQ), and the serving routes
the latency harness compares.

One scheme everywhere: int8 symmetric per-channel weights and int8 asymmetric per-token dynamic activations on
the encoder's Linear layers (`compress.quantize_layers`: attention q/k/v/out, FFN up/down, the projection).
torchao's QAT fake-quantiser for that scheme (`IntxFakeQuantizeConfig`, inserted by `prepare_qat`) reproduces
torchao's real int8 kernels (`Int8DynamicActivationInt8WeightConfig(act_mapping_type=ASYMMETRIC)`, applied by
`quantize_int8`) to float precision — tested — so a QAT-trained tower is deployed through the real kernels,
and PTQ is the same call on a float-trained tower. (torchao's own QAT convert target, an IntxWeight config,
has no fast CPU kernel.) torchao's QAT supports asymmetric per-token activations only, hence that choice.
CPUs without VNNI/AMX have no fast torchao int8 path (measured: 17× slower than fp32 on an AVX2 EPYC), so
`compress.int8_backend=onnxruntime` serves int8 through ONNX Runtime instead (post-training: its per-tensor
activations are not the scheme torchao's QAT simulates, so QAT is refused with that backend).

Serving routes (`serve`): fp32 eager, fp32 `torch.compile` (freezing), bf16 + compile, torchao int8 + compile,
ONNX Runtime fp32 and ONNX Runtime int8 (`quantize_dynamic`, per-channel weights; its activations are
per-tensor, so it is PTQ-like even for a QAT tower).

References: Jacob et al. 2018 (integer-arithmetic-only inference and QAT, arXiv:1712.05877); Zafrir et al.
2019 (Q8BERT, arXiv:1910.06188).
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from recsys.errors import RecsysError

LAYERS = {"attention": (".attn.q", ".attn.k", ".attn.v", ".attn.out"), "ffn": (".ffn.up", ".ffn.down"),
          "projection": ("projection",)}
PRECISIONS = ("fp32", "bf16", "int8")
ROUTES = ("fp32", "fp32-compile", "bf16-compile", "int8-compile", "ort-fp32", "ort-int8")
ROUTE_OF = {"fp32": "fp32", "bf16": "bf16-compile", "int8": "int8-compile"}  # how each precision is served
BACKENDS = ("torchao", "onnxruntime")  # int8 kernels: torchao (AMX/VNNI CPUs, GPUs) or ONNX Runtime (any x86)
DTYPE_OF = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}  # the Shape's dtype name


def route_for(precision: str, backend: str = "torchao") -> str:
    """The serving route of a precision; int8 by `backend` (compress.int8_backend)."""
    return "ort-int8" if precision == "int8" and backend == "onnxruntime" else ROUTE_OF[precision]


def check_layers(layers: list[str] | tuple[str, ...]) -> None:
    for name in layers:
        if name not in LAYERS:
            raise ValueError(f"quantize_layers: {name!r} cannot be quantized to int8 "
                             f"(supported: {', '.join(LAYERS)}; embeddings and LayerNorms stay float)")


def _filter(layers) -> Callable[[nn.Module, str], bool]:
    check_layers(layers)
    suffixes = tuple(s for name in layers for s in LAYERS[name])
    return lambda m, fqn: isinstance(m, nn.Linear) and fqn.endswith(suffixes)


def _fake_quant_configs():
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weights = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    return activations, weights


def prepare_qat(tower: nn.Module, layers=("attention", "ffn")) -> nn.Module:
    """Insert int8 fake-quantisation into `tower`'s Linear layers in place (parameters are kept, so an
    optimizer built before or after sees the same tensors); forward and backward run in float."""
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

    quantize_(tower, QATConfig(step="convert"), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return tower


def is_qat(tower: nn.Module) -> bool:
    from torchao.quantization.qat.linear import FakeQuantizedLinear
    return any(isinstance(m, FakeQuantizedLinear) for m in tower.modules())


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


def _onnx_session(tower: nn.Module, example: dict[str, torch.Tensor], int8: bool, workdir: Path):
    import onnxruntime as ort

    from recsys.efficiency.export import OPSET
    path = workdir / "tower.onnx"
    torch.onnx.export(tower, (example["input_ids"], example["attention_mask"]), str(path),
                      input_names=["input_ids", "attention_mask"], output_names=["tower_output"], opset_version=OPSET,
                      dynamo=True, verbose=False)
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        q = workdir / "tower.int8.onnx"
        # weight matmuls only (the Linear layers, as torchao's route): no embedding Gather, no activation×activation.
        # reduce_range: 7-bit weights, so the u8×s8 AVX2 kernels (no VNNI) cannot saturate their int16 sums —
        # with full-range weights the tiny test tower's embeddings moved by 0.30, with 7 bits by 0.006
        quantize_dynamic(str(path), str(q), per_channel=True, weight_type=QuantType.QInt8, reduce_range=True,
                         op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": True})
        path = q
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
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
            session = _onnx_session(base, example, route == "ort-int8", Path(tmp))

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
