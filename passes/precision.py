"""BF16 mixed precision as graph passes: :func:`to_bf16` and :func:`emulate_bf16`.

``to_bf16`` rewrites an (optimised, fused) float32 graph so that it computes in bfloat16
where llm.c's mixed-precision trainer does, and in float32 where precision matters:

================================  =========================================================
bf16 (storage and compute)        GEMMs (``Gemm``/``MatMul``), ``Attention`` operands and
                                  output, ``Gelu``, the residual stream and embeddings,
                                  activation gradients, the KV cache
float32 inside a bf16 op          ``LayerNormalization`` statistics (``stash_type=1``),
                                  ``Attention``'s softmax (``softmax_precision=FLOAT``),
                                  every ``graphc`` kernel (``LayerNormGrad`` recomputes its
                                  statistics, ``AttentionGrad`` its softmax, the
                                  cross-entropy its log-sum-exp): they read bf16 tensors,
                                  compute in float32 and store bf16, as a fused kernel does
float32                           the loss, master parameters (training), parameter
                                  gradient outputs ``grad.*``, ``logits``, and every op the
                                  policy table does not know
================================  =========================================================

The policy is a table (:data:`RULES`) from ``(domain, op_type)`` to a :class:`Rule`, not an
if-chain. Ops not in the table compute in float32 (a safe default: an unknown op never
silently loses precision). Layout/elementwise ops *follow* their inputs: float32 if any
computed input is float32, else bf16. Parameters count as bf16 (llm.c keeps its working
copy of the weights in bf16): with ``master_params=True`` they stay float32 graph inputs
and one ``Cast`` per parameter makes the bf16 copy their uses read; with
``master_params=False`` (inference, export) they become bf16 inputs. Constants have no
preference and are cast (initializers converted) to what their use computes in.

``graphc`` kernels are ONNX local functions whose body is the float32 reference math.
The pass wraps each body used here so that it casts its float inputs to float32 on entry
and its outputs back to the dtype of its activation input on exit (``CastLike``): the
"compute in float32" lives *inside* the op, where a kernel does it, and the same body
still serves float32 callers (every cast is then a no-op).

``emulate_bf16`` turns the bf16 graph back into a float32 one in which every value the
bf16 graph holds in bf16 is rounded to bf16 exactly where it is produced (``Cast`` to
BFLOAT16 and back). onnxruntime's CPU has no bf16 GEMM/attention kernels; the emulation
runs there and is the reference every GPU/TensorRT bf16 kernel is compared with: a real
bf16 kernel differs from it only by its float32 summation order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphc.ir.builder import GRAPHC_DOMAIN, all_names
from graphc.ir.node import with_graph
from graphc.passes.verify import infer_shapes

BF16, FP32 = TensorProto.BFLOAT16, TensorProto.FLOAT
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.BFLOAT16, TensorProto.FLOAT16, TensorProto.DOUBLE}
KV_INPUT_PREFIXES = ("past.", "past_key_values.")
KV_OUTPUT_PREFIXES = ("present.",)


# ----------------------------------------------------------------------------- the policy
@dataclass(frozen=True)
class Rule:
    """How one op type computes under BF16 mixed precision.

    ``kind``:
      * ``bf16``: float inputs cast to bf16, float outputs bf16 (except ``fp32_outputs``);
      * ``kernel``: a ``graphc`` local function computing in float32 inside: computed
        inputs pass as they are, parameters as bf16; outputs take the dtype of input
        ``like`` (bf16), except ``fp32_outputs``;
      * ``follow``: computes in float32 if any computed float input is float32, else bf16;
      * ``fp32``: float inputs cast to float32 (also every op not in :data:`RULES`);
      * ``any``: reads only shapes; inputs untouched.
    ``attrs`` are set on the node (the float32 parts of a standard op); ``fp32_inside``
    names, for the report, what the op keeps in float32.
    """

    kind: str
    fp32_outputs: tuple[int, ...] = ()
    like: int = 0
    attrs: tuple[tuple[str, int], ...] = ()
    fp32_inside: str = ""


BF16_OP, KERNEL, FOLLOW, FP32_OP, ANY = "bf16", "kernel", "follow", "fp32", "any"

RULES: dict[tuple[str, str], Rule] = {
    ("", "Gemm"): Rule(BF16_OP),
    ("", "MatMul"): Rule(BF16_OP),
    ("", "Gelu"): Rule(BF16_OP),
    ("", "Attention"): Rule(BF16_OP, attrs=(("softmax_precision", FP32),), fp32_inside="softmax"),
    ("", "LayerNormalization"): Rule(BF16_OP, fp32_outputs=(1, 2), attrs=(("stash_type", 1),),
                                     fp32_inside="statistics"),
    (GRAPHC_DOMAIN, "AttentionGrad"): Rule(KERNEL, like=1, fp32_inside="softmax"),
    (GRAPHC_DOMAIN, "LayerNormGrad"): Rule(KERNEL, like=1, fp32_inside="statistics"),
    (GRAPHC_DOMAIN, "GeluGrad"): Rule(KERNEL, like=1, fp32_inside="math"),
    (GRAPHC_DOMAIN, "CrossEntropy"): Rule(KERNEL, fp32_outputs=(0,), fp32_inside="log-softmax, loss"),
    (GRAPHC_DOMAIN, "CrossEntropyGrad"): Rule(KERNEL, like=1, fp32_inside="softmax"),
    **{("", op): Rule(FOLLOW) for op in (
        "Add", "Sub", "Mul", "Div", "Neg", "Sum", "Max", "Min", "Where", "ReduceSum",
        "Identity", "Reshape", "Transpose", "Slice", "Split", "Concat", "Squeeze", "Unsqueeze",
        "Expand", "Flatten", "Tile", "Gather", "Pad", "ScatterND", "TensorScatter")},
    ("", "Shape"): Rule(ANY),
    ("", "Size"): Rule(ANY),
}
DEFAULT_RULE = Rule(FP32_OP)


def rule_for(node: onnx.NodeProto) -> Rule:
    return RULES.get((node.domain or "", node.op_type), DEFAULT_RULE)


def is_kv_input(name: str) -> bool:
    return name.startswith(KV_INPUT_PREFIXES)


def is_kv_output(name: str) -> bool:
    return name.startswith(KV_OUTPUT_PREFIXES)


# ----------------------------------------------------------------------------- helpers
def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value (inputs, initializers, node outputs) after inference."""
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in [*g.input, *g.value_info, *g.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for n in g.node:
        if n.op_type == "Constant" and not n.domain:
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


class _Names:
    """Fresh value names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = all_names(graph)
        self.nodes = {n.name for n in graph.node if n.name}

    def __call__(self, hint: str) -> str:
        return self._fresh(hint, self.used)

    def _fresh(self, hint: str, used: set[str]) -> str:
        name, k = hint, 1
        while name in used:
            name, k = f"{hint}_{k}", k + 1
        used.add(name)
        return name

    def cast(self, x: str, y: str, to: int) -> onnx.NodeProto:
        """``y = Cast(x, to)`` with a fresh node name."""
        return helper.make_node("Cast", [x], [y], to=to, name=self._fresh(f"{y}/Cast", self.nodes))


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def fp32_inside(fn: onnx.FunctionProto, float_inputs: set[int], fp32_outputs: set[int],
                like: int) -> onnx.FunctionProto:
    """``fn`` computing in float32 whatever its float inputs are: ``Cast`` each float
    input to FLOAT on entry, ``CastLike`` each output not in ``fp32_outputs`` back to the
    type of input ``like`` on exit. For float32 callers every cast is a no-op."""
    out = onnx.FunctionProto()
    out.CopyFrom(fn)
    entry = []
    for i, name in enumerate(fn.input):
        if i in float_inputs:
            out.input[i] = f"{name}__in"
            entry.append(helper.make_node("Cast", [f"{name}__in"], [name], to=FP32))
    like_name = out.input[like]
    renamed = {o: f"{o}__f32" for i, o in enumerate(fn.output) if i not in fp32_outputs}
    body = []
    for n in fn.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.input[:] = [renamed.get(x, x) for x in n.input]
        m.output[:] = [renamed.get(x, x) for x in n.output]
        body.append(m)
    exit_ = [helper.make_node("CastLike", [renamed[o], like_name], [o]) for o in fn.output if o in renamed]
    del out.node[:]
    out.node.extend([*entry, *body, *exit_])
    out.doc_string = (fn.doc_string + "\n\n" if fn.doc_string else "") + \
        "Computes in float32 inside (inputs cast on entry, outputs cast back to the activation dtype)."
    return out


# ----------------------------------------------------------------------------- to_bf16
@dataclass
class _Plan:
    """Phase 1 of the rewrite: the dtype of every float value and each node's compute dtype."""

    dtype: dict[str, int] = field(default_factory=dict)        # float value -> FP32/BF16 in the new graph
    params: set[str] = field(default_factory=set)               # castable parameters (prefer bf16)
    consts: set[str] = field(default_factory=set)               # castable constants (no preference)
    wants: dict[tuple[int, int], int] = field(default_factory=dict)  # (node, input) -> dtype it must read


def _plan(model: onnx.ModelProto, params: set[str], master_params: bool) -> _Plan:
    g = model.graph
    types = elem_types(model)
    is_float = lambda v: bool(v) and types.get(v) in FLOAT_TYPES   # noqa: E731
    plan = _Plan()
    for v in g.input:
        if not is_float(v.name):
            continue
        if v.name in params:
            plan.dtype[v.name] = FP32 if master_params else BF16
            if master_params:
                plan.params.add(v.name)
        else:
            plan.dtype[v.name] = BF16 if is_kv_input(v.name) else FP32
    input_names = {v.name for v in g.input}
    for t in g.initializer:
        if t.name in input_names or t.data_type not in FLOAT_TYPES:
            continue
        plan.dtype[t.name] = FP32
        (plan.params if t.name in params else plan.consts).add(t.name)
    soft = lambda v: v in plan.params or v in plan.consts   # noqa: E731

    for k, n in enumerate(g.node):
        floats = [(i, x) for i, x in enumerate(n.input) if is_float(x)]
        r = rule_for(n)
        if n.op_type == "Constant" and not n.domain:
            for o in n.output:
                if is_float(o):
                    plan.dtype[o] = FP32
                    plan.consts.add(o)
            continue
        if r.kind == ANY:
            compute = None
        elif r.kind in (BF16_OP, KERNEL):
            compute = BF16
        elif r.kind == FOLLOW:
            hard = [plan.dtype[x] for _, x in floats if not soft(x)]
            if hard:
                compute = FP32 if FP32 in hard else BF16
            else:
                compute = BF16 if any(x in plan.params for _, x in floats) else FP32
        else:
            compute = FP32
        for i, x in floats:
            if compute is None:
                continue
            if r.kind == KERNEL:
                want = BF16 if x in plan.params else plan.dtype[x]   # computed inputs as they are
            else:
                want = compute
            plan.wants[(k, i)] = want
        for j, o in enumerate(n.output):
            if not is_float(o):
                continue
            if r.kind in (BF16_OP, KERNEL, FOLLOW):
                plan.dtype[o] = FP32 if j in r.fp32_outputs else compute
            else:
                plan.dtype[o] = types[o]
    return plan


class PrecisionBF16:
    """The BF16 rewrite as a pass (``precision_bf16``); see :func:`to_bf16`."""

    name = "precision_bf16"

    def __init__(self, params: set[str] | None = None, master_params: bool = True):
        self.params, self.master_params = params, master_params
        self.stats: dict = {}

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        model = infer_shapes(model)
        g = model.graph
        types = elem_types(model)
        params = set(self.params) if self.params is not None else {
            v.name for v in g.input if types.get(v.name) in FLOAT_TYPES and not is_kv_input(v.name)}
        plan = _plan(model, params, self.master_params)
        fresh = _Names(g)

        # graph outputs: KV cache bf16, everything else float32 (cast at the output)
        produced = {o for n in g.node for o in n.output}
        out_dtype = {v.name: (BF16 if is_kv_output(v.name) else FP32)
                     for v in g.output if v.name in produced and plan.dtype.get(v.name) is not None}
        out_rename = {o: fresh(f"{o}/{'bf16' if plan.dtype[o] == BF16 else 'fp32'}")
                      for o, dt in out_dtype.items() if plan.dtype[o] != dt}

        init_by_name = {t.name: t for t in g.initializer}
        # initializers every use of which wants one dtype are converted in place
        init_uses: dict[str, set[int]] = {}
        for (k, i), want in plan.wants.items():
            x = g.node[k].input[i]
            if x in init_by_name and x in plan.dtype:
                init_uses.setdefault(x, set()).add(want)
        outputs = {v.name for v in g.output}
        in_place = {x: next(iter(w)) for x, w in init_uses.items() if len(w) == 1 and x not in outputs}
        new_inits = []
        for t in g.initializer:
            if in_place.get(t.name) == BF16:
                new_inits.append(_to_dtype(t, BF16, t.name))
                plan.dtype[t.name] = BF16
            else:
                new_inits.append(t)

        casts: dict[tuple[str, int], str] = {}
        nodes: list[onnx.NodeProto] = []
        n_casts = 0

        def read(x: str, want: int) -> str:
            nonlocal n_casts
            if plan.dtype[x] == want:
                return out_rename.get(x, x)
            if (x, want) not in casts:
                y = fresh(f"{x}/{'bf16' if want == BF16 else 'fp32'}")
                if x in init_by_name and x not in outputs:
                    new_inits.append(_to_dtype(init_by_name[x], want, y))
                else:
                    nodes.append(fresh.cast(out_rename.get(x, x), y, want))
                    n_casts += 1
                casts[(x, want)] = y
            return casts[(x, want)]

        kernels: dict[tuple[str, str], tuple[set[int], Rule]] = {}
        bf16_ops = fp32_ops = 0
        inside = Counter()
        for k, n in enumerate(g.node):
            m = onnx.NodeProto()
            m.CopyFrom(n)
            r = rule_for(n)
            for i, x in enumerate(n.input):
                if (k, i) in plan.wants:
                    m.input[i] = read(x, plan.wants[(k, i)])
            m.output[:] = [out_rename.get(o, o) for o in n.output]
            for a, v in r.attrs:
                _set_attr(m, a, v)
            if r.kind == KERNEL:
                fl = {i for i in range(len(n.input)) if (k, i) in plan.wants}
                kernels.setdefault((n.domain, n.op_type), (fl, r))
            if r.fp32_inside:
                inside[f"{n.op_type} {r.fp32_inside}"] += 1
            outs = [plan.dtype[o] for o in n.output if o in plan.dtype]
            if outs and n.op_type != "Constant":
                bf16_ops += BF16 in outs
                fp32_ops += BF16 not in outs and r.kind != ANY
            nodes.append(m)
        for o, y in out_rename.items():
            nodes.append(fresh.cast(y, o, out_dtype[o]))
            n_casts += 1

        functions = []
        for fn in model.functions:
            if (fn.domain, fn.name) in kernels:
                fl, r = kernels[(fn.domain, fn.name)]
                fn = fp32_inside(fn, fl, set(r.fp32_outputs), r.like)
            functions.append(fn)

        out = with_graph(model, nodes=nodes, initializers=new_inits, value_info=[], functions=functions)
        for v in out.graph.input:
            if plan.dtype.get(v.name) == BF16:
                v.type.tensor_type.elem_type = BF16
        for v in out.graph.output:
            if v.name in out_dtype:
                v.type.tensor_type.elem_type = out_dtype[v.name]

        fp32_kept = [f"{name} x{c}" if c > 1 else name for name, c in (
            ("loss", sum(o == "loss" for o in out_dtype)),
            ("grad.*", sum(o.startswith("grad.") for o in out_dtype)),
            ("logits", sum(o == "logits" for o in out_dtype)),
            ("master params", len(plan.params) if self.master_params else 0)) if c]
        self.stats = {
            "casts": n_casts,
            "bf16_initializers": sum(1 for t in new_inits if t.data_type == BF16),
            "bf16_ops": bf16_ops,
            "fp32_ops": fp32_ops,
            "fp32_kept": ", ".join(fp32_kept),
            "fp32_inside": ", ".join(f"{k} x{v}" for k, v in inside.items()),
        }
        return out, True


def _to_dtype(t: onnx.TensorProto, dtype: int, name: str) -> onnx.TensorProto:
    arr = numpy_helper.to_array(t).astype(np.float32)
    if dtype == BF16:
        arr = arr.astype(ml_dtypes.bfloat16)
    return numpy_helper.from_array(arr, name)


def to_bf16(model: onnx.ModelProto, *, params: set[str] | None = None, master_params: bool = True) -> onnx.ModelProto:
    """The BF16 mixed-precision rewrite of an fp32 graph (see the module docstring).

    ``params``: the parameter inputs (default: every float graph input that is not a KV
    cache ``past.*``); ``master_params=True`` (training) keeps them float32 inputs cast to
    bf16 at their uses, ``False`` (inference) makes them bf16 inputs (and bf16 initializers
    for parameters bound as initializers).
    """
    return PrecisionBF16(params, master_params)(model)[0]


# ----------------------------------------------------------------------------- emulation
class EmulateBF16:
    """The bf16 graph in float32 with every bf16 value rounded where it is produced
    (``emulate_bf16``); see :func:`emulate_bf16`."""

    name = "emulate_bf16"

    def __init__(self):
        self.stats: dict = {}

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        model = infer_shapes(model)
        g = model.graph
        types = elem_types(model)
        fresh = _Names(g)
        nodes: list[onnx.NodeProto] = []
        rounded = 0

        def rounding(src: str, dst: str) -> None:
            nonlocal rounded
            mid = fresh(f"{dst}/bf16")
            nodes.extend([fresh.cast(src, mid, BF16), fresh.cast(mid, dst, FP32)])
            rounded += 1

        rename: dict[str, str] = {}
        for v in g.input:
            if types.get(v.name) == BF16:
                rename[v.name] = fresh(f"{v.name}/rounded")
                rounding(v.name, rename[v.name])
        for n in g.node:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.input[:] = [rename.get(x, x) for x in n.input]
            if n.op_type == "Cast" and not n.domain and types.get(n.output[0]) == BF16:
                mid = fresh(f"{n.output[0]}/bf16")
                m.output[0] = mid
                nodes.extend([m, fresh.cast(mid, n.output[0], FP32)])
                rounded += 1
                continue
            if n.op_type == "Constant" and not n.domain:
                for a in m.attribute:
                    if a.name == "value" and a.t.data_type == BF16:
                        a.t.CopyFrom(_to_dtype(a.t, FP32, a.t.name))
                nodes.append(m)
                continue
            bf16_outs = [j for j, o in enumerate(n.output) if o and types.get(o) == BF16]
            for j in bf16_outs:
                m.output[j] = fresh(f"{n.output[j]}/unrounded")
            nodes.append(m)
            for j in bf16_outs:
                rounding(m.output[j], n.output[j])
        inits = [_to_dtype(t, FP32, t.name) if t.data_type == BF16 else t for t in g.initializer]
        out = with_graph(model, nodes=nodes, initializers=inits, value_info=[])
        for v in [*out.graph.input, *out.graph.output]:
            if v.type.tensor_type.elem_type == BF16:
                v.type.tensor_type.elem_type = FP32
        self.stats = {"roundings": rounded}
        return out, True


def emulate_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (a bf16 graph from :func:`to_bf16`) in float32, every value it holds in
    bf16 rounded to bf16 exactly there (``Cast`` to BFLOAT16 and back): runnable on
    onnxruntime's CPU, and the numeric reference for bf16 kernels."""
    return EmulateBF16()(model)[0]
