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
CANDIDATE_TYPES = {FP32, BF16}   # values the policy places; float16/float64 ones are left as they are
_SUFFIX = {FP32: "fp32", BF16: "bf16"}
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
    (GRAPHC_DOMAIN, "GeluGrad"): Rule(KERNEL, like=1, fp32_inside="GELU backward"),
    (GRAPHC_DOMAIN, "CrossEntropy"): Rule(KERNEL, fp32_outputs=(0,), fp32_inside="loss"),
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
    """Phase 1 of the rewrite: the dtype of every float value in the bf16 graph, and the
    dtype each node input must be read in (a cast goes where the two differ)."""

    dtype: dict[str, int] = field(default_factory=dict)
    params: set[str] = field(default_factory=set)     # float32 masters their uses read as bf16
    consts: set[str] = field(default_factory=set)     # constants: cast to what their use computes in
    wants: dict[tuple[int, int], int] = field(default_factory=dict)   # (node, input) -> dtype

    def soft(self, value: str) -> bool:
        """Castable at no loss of meaning: parameters and constants (not computed values)."""
        return value in self.params or value in self.consts

    def compute_dtype(self, rule: Rule, inputs: list[str]) -> int | None:
        if rule.kind == ANY:
            return None
        if rule.kind in (BF16_OP, KERNEL):
            return BF16
        if rule.kind == FOLLOW:
            hard = {self.dtype[x] for x in inputs if not self.soft(x)}
            if hard:
                return FP32 if FP32 in hard else BF16
            return BF16 if any(x in self.params for x in inputs) else FP32
        return FP32

    def input_dtype(self, rule: Rule, compute: int, x: str) -> int:
        if rule.kind == KERNEL:   # the kernel upcasts itself: computed inputs come as they are
            return BF16 if x in self.params else self.dtype[x]
        return compute


def plan_bf16(model: onnx.ModelProto, params: set[str], master_params: bool) -> _Plan:
    """Walk the graph in order and decide every float value's dtype (see :data:`RULES`)."""
    g = model.graph
    types = elem_types(model)
    is_float = lambda v: bool(v) and types.get(v) in CANDIDATE_TYPES   # noqa: E731
    plan = _Plan()
    for v in g.input:
        if not is_float(v.name):
            continue
        if v.name in params:
            plan.dtype[v.name] = FP32 if master_params else BF16
            if master_params:
                plan.params.add(v.name)
        else:
            plan.dtype[v.name] = BF16 if is_kv_input(v.name) else types[v.name]
    inputs = {v.name for v in g.input}
    for t in g.initializer:
        if t.name not in inputs and is_float(t.name):
            plan.dtype[t.name] = t.data_type
            (plan.params if t.name in params else plan.consts).add(t.name)
    for k, n in enumerate(g.node):
        if n.op_type == "Constant" and not n.domain:
            plan.consts.update(o for o in n.output if is_float(o))
            plan.dtype.update({o: types[o] for o in n.output if is_float(o)})
            continue
        r = rule_for(n)
        floats = [(i, x) for i, x in enumerate(n.input) if is_float(x)]
        compute = plan.compute_dtype(r, [x for _, x in floats])
        if compute is not None:
            plan.wants.update({(k, i): plan.input_dtype(r, compute, x) for i, x in floats})
        for j, o in enumerate(n.output):
            if is_float(o):
                follows = r.kind in (BF16_OP, KERNEL, FOLLOW)
                plan.dtype[o] = (FP32 if j in r.fp32_outputs else compute) if follows else types[o]
    return plan


class _Rewrite:
    """Phase 2: emit the bf16 graph a plan describes. One cast per (value, dtype), placed
    before its first reader; constants are converted rather than cast; initializers all
    of whose readers want bf16 become bf16 in place (the weights of an exported model)."""

    def __init__(self, model: onnx.ModelProto, plan: _Plan):
        self.model, self.plan, g = model, plan, model.graph
        self.fresh = _Names(g)
        self.outputs = {v.name for v in g.output}
        produced = {o for n in g.node for o in n.output}
        # graph outputs: the KV cache bf16, everything else float32 (a cast at the output)
        self.out_dtype = {v.name: (BF16 if is_kv_output(v.name) else FP32)
                          for v in g.output if v.name in produced and v.name in plan.dtype}
        self.out_rename = {o: self.fresh(f"{o}/{_SUFFIX[plan.dtype[o]]}")
                           for o, dt in self.out_dtype.items() if plan.dtype[o] != dt}
        self.inits = {t.name: t for t in g.initializer}
        self.nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self.casts: dict[tuple[str, int], str] = {}
        self.n_casts = 0

    def convert_initializers(self) -> None:
        readers: dict[str, set[int]] = {}
        for (k, i), want in self.plan.wants.items():
            x = self.model.graph.node[k].input[i]
            if x in self.inits:
                readers.setdefault(x, set()).add(want)
        for t in self.model.graph.initializer:
            if readers.get(t.name) == {BF16} and t.name not in self.outputs:
                t = _to_dtype(t, BF16, t.name)
                self.plan.dtype[t.name] = BF16
            self.new_inits.append(t)

    def read(self, x: str, want: int) -> str:
        """The name under which ``x`` is available in dtype ``want``."""
        if self.plan.dtype[x] == want:
            return self.out_rename.get(x, x)
        if (x, want) not in self.casts:
            y = self.fresh(f"{x}/{_SUFFIX[want]}")
            if x in self.inits and x not in self.outputs:
                self.new_inits.append(_to_dtype(self.inits[x], want, y))
            else:
                self.nodes.append(self.fresh.cast(self.out_rename.get(x, x), y, want))
                self.n_casts += 1
            self.casts[(x, want)] = y
        return self.casts[(x, want)]

    def run(self) -> onnx.ModelProto:
        self.convert_initializers()
        kernels: dict[tuple[str, str], tuple[set[int], Rule]] = {}
        for k, n in enumerate(self.model.graph.node):
            m = onnx.NodeProto()
            m.CopyFrom(n)
            r = rule_for(n)
            reads = [i for i in range(len(n.input)) if (k, i) in self.plan.wants]
            for i in reads:
                m.input[i] = self.read(n.input[i], self.plan.wants[(k, i)])
            m.output[:] = [self.out_rename.get(o, o) for o in n.output]
            for a, v in r.attrs:
                _set_attr(m, a, v)
            if r.kind == KERNEL:
                kernels.setdefault((n.domain, n.op_type), (set(reads), r))
            self.nodes.append(m)
        for o, y in self.out_rename.items():
            self.nodes.append(self.fresh.cast(y, o, self.out_dtype[o]))
            self.n_casts += 1
        functions = []
        for fn in self.model.functions:
            if (fn.domain, fn.name) in kernels:
                reads, r = kernels[(fn.domain, fn.name)]
                fn = fp32_inside(fn, reads, set(r.fp32_outputs), r.like)
            functions.append(fn)
        out = with_graph(self.model, nodes=self.nodes, initializers=self.new_inits, value_info=[],
                         functions=functions)
        for v in out.graph.input:
            if self.plan.dtype.get(v.name) == BF16:
                v.type.tensor_type.elem_type = BF16
        for v in out.graph.output:
            if v.name in self.out_dtype:
                v.type.tensor_type.elem_type = self.out_dtype[v.name]
        return out


def _summary(model: onnx.ModelProto, plan: _Plan, rw: _Rewrite, master_params: bool) -> dict:
    """The pass's report: casts inserted, what computes in bf16, what stayed float32."""
    bf16_ops = fp32_ops = 0
    inside: Counter = Counter()
    for n in model.graph.node:
        r = rule_for(n)
        inside[r.fp32_inside] += bool(r.fp32_inside)
        outs = {plan.dtype[o] for o in n.output if o in plan.dtype}
        if outs and n.op_type != "Constant" and r.kind != ANY:
            bf16_ops += BF16 in outs
            fp32_ops += BF16 not in outs
    kept = [("loss", sum(o == "loss" for o in rw.out_dtype)),
            ("grad.*", sum(o.startswith("grad.") for o in rw.out_dtype)),
            ("logits", sum(o == "logits" for o in rw.out_dtype)),
            ("master params", len(plan.params) if master_params else 0)]
    return {
        "casts": rw.n_casts,
        "bf16_initializers": sum(t.data_type == BF16 for t in rw.new_inits),
        "bf16_ops": bf16_ops,
        "fp32_ops": fp32_ops,
        "fp32_kept": ", ".join(f"{k} x{c}" if c > 1 else k for k, c in kept if c),
        "fp32_inside": ", ".join(f"{k} x{c}" for k, c in inside.items() if k),
    }


class PrecisionBF16:
    """The BF16 rewrite as a pass (``precision_bf16``); see :func:`to_bf16`."""

    name = "precision_bf16"

    def __init__(self, params: set[str] | None = None, master_params: bool = True):
        self.params, self.master_params = params, master_params
        self.stats: dict = {}

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        model = infer_shapes(model)
        types = elem_types(model)
        params = set(self.params) if self.params is not None else {
            v.name for v in model.graph.input if types.get(v.name) == FP32 and not is_kv_input(v.name)}
        plan = plan_bf16(model, params, self.master_params)
        rewrite = _Rewrite(model, plan)
        out = rewrite.run()
        self.stats = _summary(model, plan, rewrite, self.master_params)
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
            if types.get(v.name) == BF16 and not is_kv_input(v.name):
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
    onnxruntime's CPU, and the numeric reference for bf16 kernels.

    bf16 graph inputs are rounded on entry (float32 parameters fed to an inference graph),
    except the KV caches ``past.*``: they hold what the previous step's ``present.*``
    outputs wrote, already bf16-exact, and feeding them straight to ``TensorScatter``
    keeps its in-place cache update (a rounded copy would copy the whole cache per step).
    """
    return EmulateBF16()(model)[0]
