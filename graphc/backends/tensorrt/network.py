"""ONNX -> strongly typed TensorRT network, attention flags and optimisation profiles.

* **Strongly typed**: every tensor's type comes from graphc's graph (the BF16 pass decides
  what is BF16); TensorRT does not pick precisions itself.
* **Attention**: the parser maps ONNX ``Attention`` to an ``IAttention`` (shown as
  ``ATTENTION_INPUT`` / ``ATTENTION_OUTPUT`` boundary layers). TensorRT's fused MHA kernels
  are BF16/FP16; an FP32 attention fails the build ("not supported by a dedicated kernel")
  unless it may be decomposed into GEMM + softmax + GEMM, so FP32 attentions are marked
  decomposable here, and the build report says how many ended up fused.
* **Profiles**: one optimisation profile over the graph's symbolic dims, from
  :data:`DIM_RANGES` (batch and sequence up to ``--max-batch`` / ``--max-seq``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from graphc.errors import GraphcError

# symbolic dim name -> (min, opt, max) given (max_batch, max_seq). The names are those
# graphc's graph builders use (models/gpt2.py, models/kv_cache.py).
DIM_RANGES = {
    "B": lambda mb, ms: (1, mb, mb),              # batch
    "T": lambda mb, ms: (1, ms, ms),              # sequence (prompt, training window)
    "S": lambda mb, ms: (1, 1, ms),               # new tokens per decode step (1 when generating)
}
# symbolic dims TensorRT needs static, -> their value given (max_batch, max_seq):
# TensorScatter becomes a KV-cache update layer, which wants a static cache length, so an
# engine's cache capacity is --max-seq.
STATIC_DIMS = {
    "capacity": lambda mb, ms: ms,
}


def fix_static_dims(model: onnx.ModelProto, max_batch: int, max_seq: int) -> onnx.ModelProto:
    """A copy of ``model`` with the :data:`STATIC_DIMS` of its inputs and outputs made static."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for v in (*out.graph.input, *out.graph.output):
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in STATIC_DIMS:
                d.dim_value = STATIC_DIMS[d.dim_param](max_batch, max_seq)
    return out


@dataclass
class Shapes:
    """An optimisation profile: input name -> (min, opt, max) shapes."""

    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def key(self) -> str:
        return ";".join(f"{k}:{v}" for k, v in sorted(self.profile.items()))


def profile_shapes(model: onnx.ModelProto, max_batch: int, max_seq: int) -> Shapes:
    """min/opt/max shapes for every graph input with a symbolic dim."""
    shapes = Shapes()
    for v in model.graph.input:
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            continue
        lo, opt, hi = [], [], []
        for d in dims:
            if d.HasField("dim_value"):
                r = (d.dim_value,) * 3
            elif d.dim_param in DIM_RANGES:
                r = DIM_RANGES[d.dim_param](max_batch, max_seq)
            else:
                raise ValueError(f"input {v.name}: no profile range for dim {d.dim_param!r} (known: {sorted(DIM_RANGES)})")
            for acc, x in zip((lo, opt, hi), r):
                acc.append(x)
        shapes.profile[v.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def one_line(text: str) -> str:
    """TensorRT's multi-line messages as one line (graphc reports errors in one line)."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def parse_onnx(flavor, builder, logger, model: onnx.ModelProto, where: str | None):
    """A strongly typed network from ``model``; a parser error is one line naming the node."""
    trt = flavor.trt
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0]
        raise GraphcError(where, f"TensorRT {flavor.name} {flavor.version} cannot parse node "
                                 f"{first.node_name()!r} ({first.node_operator()}): {one_line(first.desc())}", "graph")
    return network, parser


def attention_layers(flavor, network) -> list:
    """Every IAttention of the parsed network (found through its output boundary layers)."""
    trt = flavor.trt
    found = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.ATTENTION_OUTPUT:
            layer.__class__ = trt.IAttentionOutputLayer   # the bindings return the base class
            found.append(layer.attention)
    return found


def allow_decomposed_fp32_attention(flavor, network) -> list[str]:
    """Mark FP32 attentions decomposable (no fused FP32 kernel exists); returns their names."""
    trt = flavor.trt
    names = []
    for attention in attention_layers(flavor, network):
        if attention.get_input(0).dtype == trt.DataType.FLOAT:
            attention.decomposable = True
            names.append(attention.name)
    return names


def add_profile(flavor, builder, config, shapes: Shapes) -> None:
    if not shapes.profile:
        return
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.profile.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
