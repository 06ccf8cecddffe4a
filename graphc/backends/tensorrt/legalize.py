"""TensorRT legalisation: graphc's graphs -> ONNX that TensorRT's parser accepts.

Three rewrites (the graph surgery through onnx-graphsurgeon), each keeping the graph's outputs exactly what onnxruntime computes before
(``tests/test_tensorrt_legalize.py`` runs both on onnxruntime and compares):

* **inline graphc's local functions** (``graphc.AttentionGrad``, ``LayerNormGrad``,
  ``GeluGrad``, ``CrossEntropy``, ``CrossEntropyGrad``): TensorRT has no layers of those
  names, so it gets their reference bodies (standard ONNX ops), which its builder fuses
  again (Myelin fuses the elementwise/reduction chains into single kernels);
* **ScatterND(reduction="add") -> one-hot matmul**: TensorRT's ScatterND has no reduction,
  and the embedding gradient is a scatter-add of the token rows
  (``grad.wte = data + scatter_add(tokens, dx)``). With ``N`` updates of width ``C`` into a
  table of ``V`` rows: ``onehot[n, v] = (idx[n] == v)`` and ``out = data + onehotᵀ @ upd``,
  one GEMM that TensorRT runs on tensor cores (``onehot`` is ``N x V`` in the gradient's
  dtype: 1.6 GB in BF16, 3.3 GB in FP32 for N = 16K tokens and GPT-2's padded vocabulary,
  the price of avoiding atomics);
* **attributes TensorRT's parser refuses are dropped** (:data:`DROPPED_ATTRIBUTES`):
  ``Attention``'s ``softmax_precision`` (the BF16 pass asks for an FP32 softmax; TensorRT's
  parser rejects the attribute, and IAttention chooses its softmax precision itself --
  its fused kernels accumulate the softmax in FP32; the engine-vs-onnxruntime comparison
  against ``emulate_bf16`` is what checks the numerics where an engine can run).

Standard ONNX ``Attention`` stays as it is otherwise: the parser maps it to TensorRT's IAttention
(fused MHA where a kernel exists; see ``network.py``); attention under the KV-cache mask
was already fused to ``Attention(..., attn_mask)`` by the ``infer:tensorrt`` pipeline
(``fuse_masked_attention``), before the precision pass.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx.inliner
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

# graphc's commands print contracts on stdout: only real errors from onnx-graphsurgeon's logger
G_LOGGER.severity = G_LOGGER.ERROR

GRAPHC_DOMAIN = "graphc"
# op type -> attributes TensorRT's ONNX parser rejects and whose absence keeps the semantics
DROPPED_ATTRIBUTES = {"Attention": ("softmax_precision",)}


class LegalizeForTensorRT:
    """The pass: ``(model) -> (model, changed)`` with ``stats`` of what it rewrote."""

    name = "legalize_tensorrt"

    def __init__(self):
        self.stats: dict[str, int] = {}

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        inlined = inline_graphc_functions(model)
        n_inlined = len(model.functions) - len(inlined.functions)
        out, n_scatter = scatter_add_to_onehot_matmul(inlined)
        out, n_dropped = drop_refused_attributes(out)
        self.stats = {"functions_inlined": n_inlined, "scatter_add_to_matmul": n_scatter,
                      "attributes_dropped": n_dropped}
        return out, bool(n_inlined or n_scatter or n_dropped)


def legalize(model: onnx.ModelProto) -> onnx.ModelProto:
    return LegalizeForTensorRT()(model)[0]


def inline_graphc_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline every local function of the ``graphc`` domain (and drop the domain import)."""
    ids = [(f.domain, f.name) for f in model.functions if f.domain == GRAPHC_DOMAIN]
    if not ids:
        return model
    out = onnx.inliner.inline_selected_functions(model, ids, exclude=False)
    still_used = any(n.domain == GRAPHC_DOMAIN for n in out.graph.node) or any(
        f.domain == GRAPHC_DOMAIN for f in out.functions)
    if not still_used:
        keep = [o for o in out.opset_import if o.domain != GRAPHC_DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(keep)
    return out


def drop_refused_attributes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Remove :data:`DROPPED_ATTRIBUTES` from the main graph's nodes; returns (model, count)."""
    graph = gs.import_onnx(model)
    count = 0
    for node in graph.nodes:
        for name in DROPPED_ATTRIBUTES.get(node.op, ()) if node.domain in (None, "", "ai.onnx") else ():
            if node.attrs.pop(name, None) is not None:
                count += 1
    return (_export(graph, model), count) if count else (model, 0)


def _export(graph: "gs.Graph", like: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` back to ONNX with ``like``'s IR version, opsets and metadata."""
    out = gs.export_onnx(graph.cleanup().toposort(), do_type_check=False)
    out.ir_version = like.ir_version
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    out.producer_name, out.producer_version = like.producer_name, like.producer_version
    return out


def _onnx_dtype(dtype) -> int:
    """onnx-graphsurgeon's tensor dtype (a numpy dtype, or already ONNX's enum) as ONNX's enum."""
    return dtype if isinstance(dtype, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _why_not_onehot(node: "gs.Node") -> str | None:
    """None when the ScatterND-add can become a one-hot matmul, else the reason."""
    data, indices, updates = node.inputs
    if data.shape is None or indices.shape is None:
        return "unknown shapes (run shape inference first)"
    if len(data.shape) != 2:
        return f"data has rank {len(data.shape)}, the rewrite handles rank-2 tables"
    if indices.shape[-1] != 1:
        return f"indices' last dim is {indices.shape[-1]!r}, the rewrite handles 1 (whole rows)"
    if updates.dtype is None:
        return "unknown update dtype"
    return None


def scatter_add_to_onehot_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace each row-scatter ``ScatterND(data[V, C], idx[..., 1], upd[..., C], add)``
    (onnx-graphsurgeon: the node is cut out and the subgraph below put in its place).

    out = data + Gemm(onehot(idx)ᵀ, upd as [N, C]), onehot[n, v] = (idx[n] mod⁺ V == v)
    (negative indices count from the end, as ScatterND's do).
    """
    graph = gs.import_onnx(model)
    fresh = itertools.count()
    targets = [n for n in graph.nodes if n.op == "ScatterND" and n.attrs.get("reduction", "none") == "add"
               and _why_not_onehot(n) is None]
    for node in targets:
        data, indices, updates = node.inputs
        out = node.outputs[0]
        node.outputs.clear()                      # detached: cleanup() removes it
        p = f"{node.name or 'scatter_add'}/"

        def op(op_type, inputs, **attrs):
            name = f"{p}{op_type.lower()}_{next(fresh)}"
            return graph.layer(op=op_type, name=name, inputs=inputs, outputs=[gs.Variable(f"{name}_out")],
                               attrs=attrs)[0]

        def const(value):
            return gs.Constant(f"{p}const_{next(fresh)}", np.asarray(value, np.int64))

        shape = op("Shape", [data])
        rows = op("Gather", [shape, const([0])], axis=0)                                    # [1] = [V]
        idx = op("Reshape", [indices, const([-1, 1])])                                      # [N, 1]
        wrapped = op("Where", [op("Less", [idx, const(0)]), op("Add", [idx, rows]), idx])   # [N, 1]
        row_ids = op("Range", [const(0), op("Squeeze", [rows, const([0])]), const(1)])      # [V]
        onehot = op("Cast", [op("Equal", [wrapped, row_ids])], to=_onnx_dtype(updates.dtype))            # [N, V]
        width = op("Shape", [data], start=1)                                                # [1] = [C]
        upd = op("Reshape", [updates, op("Concat", [const([-1]), width], axis=0)])          # [N, C]
        rows_sum = op("Gemm", [onehot, upd], transA=1)                                      # [V, C]
        graph.layer(op="Add", name=f"{p}scatter_add", inputs=[data, rows_sum], outputs=[out])
    return (_export(graph, model), len(targets)) if targets else (model, 0)
