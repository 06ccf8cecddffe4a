"""graphc's fused operators: which standard ONNX ops the fusions emit, and the ONNX local
functions (domain ``graphc``) for the fused ops ONNX does not have.

Forward fusions emit *standard* ops wherever ONNX has one, so that every backend
(onnxruntime today; TensorRT's parser and graphc's planned CUDA lowering) recognises them by name:

=================  =============================================  =====================
pattern            fused op                                       backward (local fn)
=================  =============================================  =====================
attention          ``Attention`` (opset 23+, is_causal, scale)    ``graphc.AttentionGrad``
layer norm         ``LayerNormalization`` (axis -1, epsilon)      ``graphc.LayerNormGrad``
tanh GELU          ``Gelu`` (approximate="tanh", opset 20+)       ``graphc.GeluGrad``
loss               ``graphc.CrossEntropy`` (mean NLL of logits)   ``graphc.CrossEntropyGrad``
=================  =============================================  =====================

Each local function's body is the reference decomposition in primitive ops, so
onnxruntime runs a fused graph by inlining it, and a backend that has a kernel for the
op matches ``(domain, name)`` instead. Numeric attributes (scale, epsilon, is_causal)
are function attributes the body reads through ``ref_attr_name``; constants in bodies
are ``CastLike``'d to the input type so the same function serves fp32 and bf16.

Design choices (see also ``passes/autodiff/rules_fused.py``):

* **AttentionGrad recomputes the softmax** from Q and K instead of taking saved
  probabilities: ONNX ``Attention`` (and TensorRT) only expose Y, the probabilities
  are a [B, H, T, T] tensor (805 MB per layer for GPT-2 124M at B=16, T=1024, 9.7 GB for
  12 layers if kept for the backward), and recomputation is exactly what FlashAttention
  and cuDNN's fused SDPA backward do. It takes the forward output Y as well, for the
  FlashAttention identity rowsum(dP * P) = rowsum(dY * Y) (cuDNN's backward wants O too).
* **LayerNormGrad recomputes mean and 1/std** from X (one reduction over C) rather than
  taking LayerNormalization's optional Mean/InvStdDev outputs: TensorRT supports only the
  first output, so the forward op stays the same in inference and training graphs.
* **CrossEntropy** is a local function (TensorRT has no SoftmaxCrossEntropyLoss, and
  the ONNX op's ignore_index/weights are not needed); its gradient is
  (softmax(z) - onehot(t)) * dloss / N, recomputing softmax from the logits, which stay
  alive for the backward anyway.
* **Bias + GELU stays Gemm(bias) + Gelu**, no ``BiasGelu`` op: the bias already lives in
  Gemm's C input, cuBLASLt has a GELU(+bias) epilogue that a CUDA lowering can select
  by matching Gemm -> Gelu (graphc's is planned), and TensorRT fuses Gemm + pointwise Gelu itself; a custom
  function would hide the GEMM from TensorRT's parser.
"""

from __future__ import annotations

import math

import onnx
from onnx import TensorProto, helper

from graphc import OPSET
from graphc.ir.builder import GRAPHC_DOMAIN

GELU_A = 0.044715
GELU_S = math.sqrt(2.0 / math.pi)

# (domain, op_type) of every fused op -> the report's key.
FUSED_KINDS: dict[tuple[str, str], str] = {
    ("", "Attention"): "attention",
    (GRAPHC_DOMAIN, "AttentionGrad"): "attention_backward",
    ("", "LayerNormalization"): "layernorm",
    (GRAPHC_DOMAIN, "LayerNormGrad"): "layernorm_backward",
    ("", "Gelu"): "gelu",
    (GRAPHC_DOMAIN, "GeluGrad"): "gelu_backward",
    (GRAPHC_DOMAIN, "CrossEntropy"): "cross_entropy",
    (GRAPHC_DOMAIN, "CrossEntropyGrad"): "cross_entropy_backward",
}
FUSED_KEYS = list(FUSED_KINDS.values())


def count_fused(model_or_nodes) -> dict[str, int]:
    """How many fused ops of each kind a graph holds (every key present)."""
    nodes = model_or_nodes.graph.node if isinstance(model_or_nodes, onnx.ModelProto) else model_or_nodes
    counts = dict.fromkeys(FUSED_KEYS, 0)
    for n in nodes:
        kind = FUSED_KINDS.get((n.domain or "", n.op_type))
        if kind:
            counts[kind] += 1
    return counts


# ----------------------------------------------------------------------------- bodies
class _Body:
    """Emit the nodes of a function body with short unique value names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._k = 0

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, **attrs):
        if isinstance(outputs, int):
            names = [f"_t{self._k + i}" for i in range(outputs)]
            self._k += outputs
        else:
            names = list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if len(names) == 1 else names

    def ref(self, attr_type: int, value_attr: str, ref: str) -> str:
        """A Constant whose value is the calling node's attribute ``ref``."""
        out = f"_t{self._k}"
        self._k += 1
        n = helper.make_node("Constant", [], [out])
        n.attribute.append(onnx.AttributeProto(name=value_attr, ref_attr_name=ref, type=attr_type))
        self.nodes.append(n)
        return out

    def f(self, value: float, like: str) -> str:
        """A float scalar constant in the dtype of ``like``."""
        return self.op("CastLike", self.op("Constant", value_float=float(value)), like)

    def ints(self, *values: int) -> str:
        return self.op("Constant", value_ints=list(values))

    def int0(self, value: int) -> str:
        return self.op("Constant", value_int=int(value))


def _function(name: str, inputs: list[str], outputs: list[str], body: _Body,
              attributes: list[str] = (), doc: str = "") -> onnx.FunctionProto:
    fn = helper.make_function(GRAPHC_DOMAIN, name, inputs, outputs, body.nodes,
                              [helper.make_opsetid("", OPSET)], attributes=list(attributes))
    fn.doc_string = doc
    return fn


def _transpose_last2(b: _Body, x: str) -> str:
    return b.op("Transpose", x, perm=[0, 1, 3, 2])


def cross_entropy_fn() -> onnx.FunctionProto:
    """loss = -mean_i log_softmax(Z_i)[t_i]; Z [..., V], T int64 [..., 1] -> loss []."""
    b = _Body()
    logp = b.op("LogSoftmax", "Z", axis=-1)
    picked = b.op("GatherElements", logp, "T", axis=-1)
    b.op("Neg", b.op("ReduceMean", picked, keepdims=0), outputs=["loss"])
    return _function("CrossEntropy", ["Z", "T"], ["loss"], b, doc=cross_entropy_fn.__doc__)


def cross_entropy_grad_fn() -> onnx.FunctionProto:
    """dZ = (softmax(Z) - onehot(T)) * dloss / N, N = number of positions (elements of T)."""
    b = _Body()
    p = b.op("Softmax", "Z", axis=-1)
    vocab = b.op("Squeeze", b.op("Shape", "Z", start=-1), b.ints(0))            # scalar V
    classes = b.op("Range", b.int0(0), vocab, b.int0(1))                         # [V]
    onehot = b.op("CastLike", b.op("Equal", classes, "T"), "Z")                  # [..., V]
    count = b.op("CastLike", b.op("ReduceProd", b.op("Shape", "T"), keepdims=0), "Z")
    g = b.op("Div", "dloss", count)
    b.op("Mul", b.op("Sub", p, onehot), g, outputs=["dZ"])
    return _function("CrossEntropyGrad", ["dloss", "Z", "T"], ["dZ"], b, doc=cross_entropy_grad_fn.__doc__)


def attention_grad_fn() -> onnx.FunctionProto:
    """Backward of Y = softmax(mask(scale * Q K^T)) V with Q [B,H,Tq,D], K,V [B,H,Tk,D].

    P recomputed; dV = P^T dY; dP = dY V^T; dS = P * (dP - rowsum(dY * Y));
    dQ = scale * dS K; dK = scale * dS^T Q. The causal mask (attribute is_causal) is
    ONNX Attention's upper-left one: query i sees key j iff j <= i.
    """
    b = _Body()
    scale = b.op("CastLike", b.ref(onnx.AttributeProto.FLOAT, "value_float", "scale"), "Q")
    s = b.op("Mul", b.op("MatMul", "Q", _transpose_last2(b, "K")), scale)         # [B,H,Tq,Tk]
    tq = b.op("Squeeze", b.op("Shape", "Q", start=-2, end=-1), b.ints(0))
    tk = b.op("Squeeze", b.op("Shape", "K", start=-2, end=-1), b.ints(0))
    q_pos = b.op("Unsqueeze", b.op("Range", b.int0(0), tq, b.int0(1)), b.ints(1))  # [Tq, 1]
    k_pos = b.op("Unsqueeze", b.op("Range", b.int0(0), tk, b.int0(1)), b.ints(0))  # [1, Tk]
    causal = b.op("Cast", b.ref(onnx.AttributeProto.INT, "value_int", "is_causal"), to=TensorProto.BOOL)
    keep = b.op("Or", b.op("LessOrEqual", k_pos, q_pos), b.op("Not", causal))        # [Tq, Tk]
    s = b.op("Where", keep, s, b.f(float("-inf"), "Q"))
    p = b.op("Softmax", s, axis=-1)
    b.op("MatMul", _transpose_last2(b, p), "dY", outputs=["dV"])                      # [B,H,Tk,D]
    dp = b.op("MatMul", "dY", _transpose_last2(b, "V"))                               # [B,H,Tq,Tk]
    dsum = b.op("ReduceSum", b.op("Mul", "dY", "Y"), b.ints(-1), keepdims=1)         # [B,H,Tq,1]
    ds = b.op("Mul", p, b.op("Sub", dp, dsum))
    b.op("Mul", b.op("MatMul", ds, "K"), scale, outputs=["dQ"])
    b.op("Mul", b.op("MatMul", _transpose_last2(b, ds), "Q"), scale, outputs=["dK"])
    return _function("AttentionGrad", ["dY", "Q", "K", "V", "Y"], ["dQ", "dK", "dV"], b,
                     attributes=["scale", "is_causal"], doc=attention_grad_fn.__doc__)


def layernorm_grad_fn() -> onnx.FunctionProto:
    """Backward of y = xhat * W + B over the last axis, xhat = (X - mean) * rstd.

    dX = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dY * W;
    dW = sum over rows of dY * xhat; dB = sum over rows of dY. mean/rstd are recomputed.
    """
    b = _Body()
    axes = b.ints(-1)
    mean = b.op("ReduceMean", "X", axes, keepdims=1)
    xc = b.op("Sub", "X", mean)
    var = b.op("ReduceMean", b.op("Mul", xc, xc), axes, keepdims=1)
    eps = b.op("CastLike", b.ref(onnx.AttributeProto.FLOAT, "value_float", "epsilon"), "X")
    rstd = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, eps)))
    xhat = b.op("Mul", xc, rstd)
    g = b.op("Mul", "dY", "W")
    m1 = b.op("ReduceMean", g, axes, keepdims=1)
    m2 = b.op("ReduceMean", b.op("Mul", g, xhat), axes, keepdims=1)
    b.op("Mul", b.op("Sub", b.op("Sub", g, m1), b.op("Mul", xhat, m2)), rstd, outputs=["dX"])
    rows = b.op("Concat", b.ints(-1), b.op("Shape", "W"), axis=0)                 # [-1, C]
    b.op("ReduceSum", b.op("Reshape", b.op("Mul", "dY", xhat), rows), b.ints(0), keepdims=0, outputs=["dW"])
    b.op("ReduceSum", b.op("Reshape", "dY", rows), b.ints(0), keepdims=0, outputs=["dB"])
    return _function("LayerNormGrad", ["dY", "X", "W"], ["dX", "dW", "dB"], b,
                     attributes=["epsilon"], doc=layernorm_grad_fn.__doc__)


def gelu_grad_fn() -> onnx.FunctionProto:
    """Backward of tanh-GELU y = 0.5 x (1 + tanh(u)), u = s (x + a x^3):
    dX = dY * (0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 a x^2)), t = tanh(u)."""
    b = _Body()
    x2 = b.op("Mul", "X", "X")
    u = b.op("Mul", b.op("Add", "X", b.op("Mul", b.op("Mul", x2, "X"), b.f(GELU_A, "X"))), b.f(GELU_S, "X"))
    t = b.op("Tanh", u)
    half = b.f(0.5, "X")
    one = b.f(1.0, "X")
    left = b.op("Mul", half, b.op("Add", one, t))
    du = b.op("Mul", b.f(GELU_S, "X"), b.op("Add", one, b.op("Mul", b.f(3 * GELU_A, "X"), x2)))
    right = b.op("Mul", b.op("Mul", b.op("Mul", half, "X"), b.op("Sub", one, b.op("Mul", t, t))), du)
    b.op("Mul", "dY", b.op("Add", left, right), outputs=["dX"])
    return _function("GeluGrad", ["dY", "X"], ["dX"], b, doc=gelu_grad_fn.__doc__)


FUNCTION_FACTORIES = {
    "CrossEntropy": cross_entropy_fn,
    "CrossEntropyGrad": cross_entropy_grad_fn,
    "AttentionGrad": attention_grad_fn,
    "LayerNormGrad": layernorm_grad_fn,
    "GeluGrad": gelu_grad_fn,
}
_CACHE: dict[str, onnx.FunctionProto] = {}


def function(name: str) -> onnx.FunctionProto:
    """The local function defining ``graphc.<name>`` (a fresh copy)."""
    if name not in _CACHE:
        _CACHE[name] = FUNCTION_FACTORIES[name]()
    fn = onnx.FunctionProto()
    fn.CopyFrom(_CACHE[name])
    return fn


def ensure_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the definitions of every ``graphc`` op the graph uses (in place; returned)."""
    have = {(f.domain, f.name) for f in model.functions}
    used = {n.op_type for n in model.graph.node if n.domain == GRAPHC_DOMAIN}
    for name in sorted(used):
        if (GRAPHC_DOMAIN, name) not in have and name in FUNCTION_FACTORIES:
            model.functions.append(function(name))
    if used and not any(o.domain == GRAPHC_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(GRAPHC_DOMAIN, 1))
    return model


def make_node(op_type: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
    """A node calling ``graphc.<op_type>``."""
    return helper.make_node(op_type, inputs, outputs, domain=GRAPHC_DOMAIN, **attrs)
