"""TensorRT legalisation: graphc's graphs -> ONNX that TensorRT's parser accepts.

Three rewrites, each keeping the graph's outputs exactly what onnxruntime computes before
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

import numpy as np
import onnx
import onnx.inliner

from graphc.ir.builder import GraphBuilder
from graphc.ir.node import attr, with_graph

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
    nodes, count = [], 0
    for node in model.graph.node:
        drop = DROPPED_ATTRIBUTES.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()
        if any(a.name in drop for a in node.attribute):
            new = onnx.NodeProto()
            new.CopyFrom(node)
            del new.attribute[:]
            new.attribute.extend(a for a in node.attribute if a.name not in drop)
            node, count = new, count + 1
        nodes.append(node)
    return (with_graph(model, nodes=nodes), count) if count else (model, 0)


def _static_shape(model: onnx.ModelProto, name: str) -> list | None:
    """The shape of ``name`` (ints or dim_param strings) from graph IO / value_info."""
    g = model.graph
    for v in (*g.input, *g.value_info, *g.output):
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in v.type.tensor_type.shape.dim]
    return None


def _elem_type(model: onnx.ModelProto, name: str) -> int | None:
    g = model.graph
    for v in (*g.input, *g.value_info, *g.output):
        if v.name == name:
            return v.type.tensor_type.elem_type
    for t in g.initializer:
        if t.name == name:
            return t.data_type
    return None


def _why_not_onehot(model: onnx.ModelProto, node: onnx.NodeProto) -> str | None:
    """None when the ScatterND-add can become a one-hot matmul, else the reason."""
    data, indices = _static_shape(model, node.input[0]), _static_shape(model, node.input[1])
    if data is None or indices is None:
        return "unknown shapes (run shape inference first)"
    if len(data) != 2:
        return f"data has rank {len(data)}, the rewrite handles rank-2 tables"
    if indices[-1] != 1:
        return f"indices' last dim is {indices[-1]!r}, the rewrite handles 1 (whole rows)"
    if _elem_type(model, node.input[2]) is None:
        return "unknown update dtype"
    return None


def scatter_add_to_onehot_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace each row-scatter ``ScatterND(data[V, C], idx[..., 1], upd[..., C], add)``.

    out = data + Gemm(onehot(idx)ᵀ, upd as [N, C]), onehot[n, v] = (idx[n] mod⁺ V == v)
    (negative indices count from the end, as ScatterND's do).
    """
    targets = [n for n in model.graph.node if n.op_type == "ScatterND" and attr(n, "reduction", "none") == "add"]
    if not targets:
        return model, 0
    b = GraphBuilder.wrap(model.graph)
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in model.graph.node:
        if node not in targets or _why_not_onehot(model, node) is not None:
            new_nodes.append(node)
            continue
        data, indices, updates = node.input
        b.nodes = []
        with b.scope(node.name or "scatter_add"):
            rows = b.Gather(b.Shape(data, name="table_shape"), b.i64(0), axis=0, name="rows")        # [1]
            idx = b.Reshape(indices, b.i64(-1, 1), name="idx_col")                                   # [N, 1]
            idx = b.Where(b.Less(idx, b.const(np.array(0, np.int64)), name="negative"),
                          b.Add(idx, rows, name="wrapped"), idx, name="idx")                         # [N, 1]
            zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
            vocab = b.Range(zero, b.Squeeze(rows, b.i64(0), name="rows_scalar"), one, name="row_ids")  # [V]
            onehot = b.Cast(b.Equal(idx, vocab, name="onehot_bool"), to=_elem_type(model, updates),
                            name="onehot")                                                          # [N, V]
            width = b.Shape(data, start=1, name="row_width")                                         # [1] = [C]
            upd = b.Reshape(updates, b.Concat(b.i64(-1), width, axis=0, name="upd_shape"), name="upd_2d")  # [N, C]
            rows_sum = b.Gemm(onehot, upd, transA=1, name="rows_sum")                                # [V, C]
            b.op("Add", data, rows_sum, outputs=[node.output[0]], name="scatter_add")
        new_nodes.extend(b.nodes)
        count += 1
    return with_graph(model, nodes=new_nodes, initializers=b.initializers), count
