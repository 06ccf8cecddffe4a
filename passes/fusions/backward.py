"""Backward fusion for graphs that were differentiated *before* fusion.

The training pipeline normally fuses the forward graph first and differentiates the fused
graph (the fused ops' VJP rules emit ``graphc.*Grad`` ops directly). A graph handed in
already differentiated (outputs ``loss`` and ``grad.<w>``) carries the primitive rules'
backward of every layer norm, GELU, softmax and loss, and its forward patterns cannot be
fused on their own (their intermediates are read by the backward).

Rather than recognising each primitive rule's emitted arithmetic (a few dozen nodes per
pattern whose exact spelling is the autodiff rules' private business, with fan-in ``Sum``
nodes mixing several patterns' contributions), this pass *re-derives* the backward:

1. **split** the graph by its interface: the forward is everything the loss and the
   non-gradient outputs need; the gradients are the ``grad.<w>`` outputs; *post-gradient*
   nodes are those reading a gradient (an in-graph optimizer update, clipping applied
   after the ``grad.*`` outputs), kept as they are;
2. **prove** the gradients are exactly the autodiff of that forward: differentiate the
   unfused forward again and compare every ``grad.<w>`` by a structural hash of its whole
   computation (op types, attributes, constants by value, graph inputs by name; value and
   node names ignored). A graph whose backward was edited after differentiation (a
   gradient scaled, clipped or folded before its ``grad.*`` output) fails the proof and is
   left unchanged, with the reason in ``reasons``;
3. **rebuild**: fuse the forward (attention, layer norm, GELU, cross-entropy), differentiate
   the fused forward (fused VJPs -> fused backward ops), re-attach the post-gradient nodes,
   and restore the output order.

The result computes the same loss and gradients with the fused forward *and* backward ops.
"""

from __future__ import annotations

import hashlib

import onnx
from onnx import numpy_helper

from graphc.ir.node import constant_value

from graphc.ops import count_fused, ensure_functions

GRAD_PREFIX = "grad."


def structural_hashes(graph: onnx.GraphProto) -> dict[str, bytes]:
    """A hash per value of the computation producing it (Merkle style, names ignored
    except graph inputs'; Identity is transparent; constants hash by value)."""
    h: dict[str, bytes] = {}

    def digest(*parts) -> bytes:
        m = hashlib.sha1()
        for p in parts:
            m.update(p if isinstance(p, bytes) else repr(p).encode())
            m.update(b"\x00")
        return m.digest()

    def const_digest(arr) -> bytes:
        return digest("const", str(arr.dtype), arr.shape, arr.tobytes())

    inputs = {v.name for v in graph.input}
    for name in inputs:
        h[name] = digest("input", name)
    for t in graph.initializer:
        if t.name not in inputs:
            h[t.name] = const_digest(numpy_helper.to_array(t))
    for n in graph.node:
        if n.op_type == "Constant" and not n.domain:
            arr = constant_value(n) if len(n.attribute) == 1 else None
            if arr is not None:
                h[n.output[0]] = const_digest(arr)
                continue
        if n.op_type == "Identity" and not n.domain:
            h[n.output[0]] = h.get(n.input[0], digest("missing", n.input[0]))
            continue
        attrs = sorted(a.SerializeToString(deterministic=True) for a in n.attribute)
        key = digest(n.domain, n.op_type, *attrs, *(h.get(i, digest("missing", i)) if i else b"" for i in n.input))
        for k, o in enumerate(n.output):
            if o:
                h[o] = digest(key, k)
    return h


def _descendants(graph: onnx.GraphProto, roots: set[str]) -> tuple[list[int], set[str]]:
    """Nodes reading (transitively) any of ``roots`` and the values they write."""
    tainted = set(roots)
    nodes = []
    for i, n in enumerate(graph.node):
        if any(v in tainted for v in n.input if v):
            nodes.append(i)
            tainted.update(o for o in n.output if o)
    return nodes, tainted


class FuseBackward:
    """``(model) -> (model, changed)``: fused backward for an already differentiated graph."""

    name = "fuse_backward"

    def __init__(self, loss: str = "loss"):
        self.loss = loss
        self.stats: dict[str, int] = {}
        self.reasons: list[str] = []

    def explain(self, model: onnx.ModelProto) -> list[str]:
        self(model)
        return list(self.reasons)

    def _no(self, model, reason: str):
        self.reasons = [reason]
        self.stats = {}
        return model, False

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        from graphc.passes.autodiff import differentiate
        from graphc.passes.dce import DeadCodeElimination
        from graphc.passes.fusions.attention import fuse_attention
        from graphc.passes.fusions.cross_entropy import fuse_cross_entropy
        from graphc.passes.fusions.gelu import fuse_gelu
        from graphc.passes.fusions.layernorm import fuse_layernorm
        from graphc.passes.manager import run_passes

        g = model.graph
        outputs = [o.name for o in g.output]
        grads = [o for o in outputs if o.startswith(GRAD_PREFIX)]
        if not grads:
            return self._no(model, "no grad.* outputs: not a training graph")
        if self.loss not in outputs:
            return self._no(model, f"no {self.loss!r} output")
        leaves = {v.name for v in g.input} | {t.name for t in g.initializer}
        wrt = [o[len(GRAD_PREFIX):] for o in grads]
        missing = [w for w in wrt if w not in leaves]
        if missing:
            return self._no(model, f"gradient outputs of non-inputs: {missing[:3]}")

        # 1. split: post-gradient nodes read a grad.* value (or a value computed from one)
        post_idx, post_values = _descendants(g, set(grads))
        post_outputs = [o for o in outputs if o in post_values and o not in grads]
        forward_outputs = [o for o in outputs if o not in grads and o not in post_values]
        fwd = onnx.ModelProto()
        fwd.CopyFrom(model)
        del fwd.graph.output[:]
        fwd.graph.output.extend(o for o in g.output if o.name in forward_outputs)
        del fwd.graph.value_info[:]
        fwd, _ = DeadCodeElimination()(fwd)
        # drop the backward's Constant nodes DCE left unreferenced... (DCE already did)

        # 2. prove: the given gradients are the autodiff of this forward
        try:
            ref = differentiate(fwd, self.loss, wrt)
        except Exception as e:  # noqa: BLE001 - a forward the driver cannot differentiate
            return self._no(model, f"the forward part cannot be re-differentiated: {e}")
        mine, theirs = structural_hashes(g), structural_hashes(ref.graph)
        differ = [o for o in grads if mine.get(o) != theirs.get(o)]
        if differ:
            return self._no(model, f"{len(differ)} gradient(s) are not the plain autodiff of the forward graph "
                                   f"(edited after differentiation?), e.g. {differ[0]!r}")

        # 3. rebuild from the fused forward
        fused, report = run_passes(fwd, [fuse_layernorm(), fuse_gelu(), fuse_attention(), fuse_cross_entropy(),
                                         DeadCodeElimination()], verify=False, name="fuse_forward")
        if not any(report.fused.values()):
            return self._no(model, "nothing in the forward graph fuses")
        new = differentiate(fused, self.loss, wrt)
        new = ensure_functions(new)
        if post_idx:
            have = {v.name for v in new.graph.input} | {t.name for t in new.graph.initializer}
            have |= {o for n in new.graph.node for o in n.output}
            post_nodes = [g.node[i] for i in post_idx]
            produced = {o for n in post_nodes for o in n.output}
            needs = {v for n in post_nodes for v in n.input if v and v not in produced}
            inits = {t.name: t for t in g.initializer}
            lost = sorted(v for v in needs if v not in have and v not in inits)
            if lost:
                return self._no(model, f"post-gradient nodes read forward values the fused graph no longer has: "
                                       f"{lost[:3]}")
            new.graph.node.extend(post_nodes)
            new.graph.initializer.extend(inits[v] for v in sorted(needs) if v not in have and v in inits)
        by_name = {o.name: o for o in g.output}
        del new.graph.output[:]
        new.graph.output.extend(by_name[o] for o in outputs)
        del new.graph.value_info[:]
        new = ensure_functions(new)
        self.reasons = []
        self.stats = {k: v for k, v in count_fused(new).items() if v}
        self.stats["post_gradient_nodes"] = len(post_idx)
        self.stats["post_outputs"] = len(post_outputs)
        return new, True


def fuse_backward(loss: str = "loss") -> FuseBackward:
    return FuseBackward(loss)
