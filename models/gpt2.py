"""GPT-2 as an ONNX graph.

One readable model file, in the spirit of llm.c's ``train_gpt2.c``: every op is written
out with a shape comment. The graph is *unfused*: layer norm, GELU, attention and the
loss are spelled in primitive ONNX ops, exactly the math llm.c computes. The fusion
passes (``graphc.passes.fusions``) find these patterns by structure and replace them with
fused ops; the autodiff pass differentiates either form.

Conventions
-----------
* ``tokens`` / ``targets``: int64 [B, T], B and T dynamic (``dim_param`` "B", "T").
* Parameters are graph *inputs* (names from :mod:`graphc.models.params`), so the runtime
  owns their buffers and updates them in place; :func:`graphc.models.export.bind` turns
  them into initializers for deployment.
* The residual stream is kept 2-D, [B*T, C], so every linear layer is one
  ``Gemm(x, W, b, transB=1)`` over llm.c's (out, in) weights.
* The LM head is tied to ``wte`` and uses only the real vocabulary rows (``wte[:V]``);
  the padded rows llm.c keeps for alignment never reach the logits.

Only operators TensorRT's ONNX parser supports are used (``tests/test_trt_ops.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from graphc.ir.builder import GraphBuilder
from graphc.models.config import GPT2Config
from graphc.models.params import param_specs

GELU_SCALE = math.sqrt(2.0 / math.pi)


@dataclass
class Dims:
    """Shape values computed once per graph: [B, T] and friends as int64 tensors."""

    bt: str          # int64[2]  = [B, T]
    bthd: str        # int64[4]  = [B, T, H, D]
    btc: str         # int64[3]  = [B, T, C]
    btv: str         # int64[3]  = [B, T, V]
    t: str           # int64[1]  = [T]


def make_dims(b: GraphBuilder, cfg: GPT2Config, tokens: str) -> Dims:
    bt = b.Shape(tokens, name="bt")                                            # [2]
    return Dims(
        bt=bt,
        bthd=b.Concat(bt, b.i64(cfg.n_head, cfg.head_dim), axis=0, name="shape_bthd"),
        btc=b.Concat(bt, b.i64(cfg.n_embd), axis=0, name="shape_btc"),
        btv=b.Concat(bt, b.i64(cfg.vocab_size), axis=0, name="shape_btv"),
        t=b.Slice(bt, b.i64(1), b.i64(2), name="seq_len"),
    )


# ----------------------------------------------------------------------------- layers
def layernorm(b: GraphBuilder, x: str, w: str, bias: str, eps: float) -> str:
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis (llm.c's order)."""
    mean = b.ReduceMean(x, b.i64(-1), keepdims=1, name="ln_mean")             # [N, 1]
    xc = b.Sub(x, mean, name="ln_center")                                      # [N, C]
    var = b.ReduceMean(b.Mul(xc, xc, name="ln_sq"), b.i64(-1), keepdims=1, name="ln_var")  # [N, 1]
    rstd = b.Reciprocal(b.Sqrt(b.Add(var, b.scalar(eps), name="ln_var_eps"), name="ln_std"), name="ln_rstd")
    norm = b.Mul(xc, rstd, name="ln_norm")                                     # [N, C]
    return b.Add(b.Mul(norm, w, name="ln_scale"), bias, name="ln_shift")        # [N, C]


def gelu_tanh(b: GraphBuilder, x: str) -> str:
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), as llm.c's gelu_forward."""
    cube = b.Mul(b.Mul(b.Mul(x, x, name="gelu_x2"), x, name="gelu_x3"), b.scalar(0.044715), name="gelu_cube")
    inner = b.Mul(b.Add(x, cube, name="gelu_inner"), b.scalar(GELU_SCALE), name="gelu_arg")
    t = b.Tanh(inner, name="gelu_tanh")
    half_x = b.Mul(x, b.scalar(0.5), name="gelu_halfx")
    return b.Mul(half_x, b.Add(t, b.scalar(1.0), name="gelu_1p"), name="gelu")


def linear(b: GraphBuilder, x: str, w: str, bias: str | None, name: str) -> str:
    """x @ w.T + bias with x [N, in], w [out, in] (llm.c's matmul_forward)."""
    return b.Gemm(x, w, bias, transB=1, name=name)


def causal_mask(b: GraphBuilder, q_len: str, kv_len: str, past: str | None = None) -> str:
    """bool [Tq, Tk]: query i (at position past + i) may see key j iff j <= past + i."""
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    start = past if past is not None else zero
    q_pos = b.Range(start, b.Add(start, q_len, name="q_end"), one, name="q_pos")   # [Tq]
    k_pos = b.Range(zero, kv_len, one, name="k_pos")                                 # [Tk]
    return b.LessOrEqual(b.Unsqueeze(k_pos, b.i64(0), name="k_row"),                # [1, Tk]
                         b.Unsqueeze(q_pos, b.i64(1), name="q_col"), name="causal")  # [Tq, 1] -> [Tq, Tk]


def split_heads(b: GraphBuilder, x: str, dims: Dims, name: str) -> str:
    """[B*T, C] -> [B, H, T, D]."""
    return b.Transpose(b.Reshape(x, dims.bthd, name=f"{name}_bthd"), perm=[0, 2, 1, 3], name=name)


def merge_heads(b: GraphBuilder, y: str, cfg: GPT2Config) -> str:
    """[B, H, T, D] -> [B*T, C]."""
    y = b.Transpose(y, perm=[0, 2, 1, 3], name="attn_bthd")                     # [B, T, H, D]
    return b.Reshape(y, b.i64(-1, cfg.n_embd), name="attn_y")                   # [B*T, C]


def attention_core(b: GraphBuilder, q: str, k: str, v: str, mask: str, cfg: GPT2Config) -> str:
    """softmax(q k^T / sqrt(D) masked causally) v, spelled out (the fusion pass's pattern).

    q [B, H, Tq, D], k and v [B, H, Tk, D], mask bool [Tq, Tk] -> [B, H, Tq, D].
    """
    kt = b.Transpose(k, perm=[0, 1, 3, 2], name="attn_kT")                      # [B, H, D, Tk]
    scores = b.MatMul(q, kt, name="attn_qk")                                     # [B, H, Tq, Tk]
    scores = b.Mul(scores, b.scalar(1.0 / math.sqrt(cfg.head_dim)), name="attn_scale")
    scores = b.Where(mask, scores, b.scalar(float("-inf")), name="attn_mask")
    att = b.Softmax(scores, axis=-1, name="attn_softmax")                        # [B, H, Tq, Tk]
    return b.MatMul(att, v, name="attn_av")                                      # [B, H, Tq, D]


def block(b: GraphBuilder, x: str, layer: int, cfg: GPT2Config, dims: Dims, mask: str, attend=None) -> str:
    """One pre-norm transformer block on the residual stream x [B*T, C].

    ``attend(q, k, v) -> y`` may replace the plain causal attention (the KV-cache graphs
    insert their cache reads and writes there).
    """
    p = f"h{layer}."
    C = cfg.n_embd
    with b.scope(f"h{layer}"):
        ln1 = layernorm(b, x, p + "ln1.w", p + "ln1.b", cfg.ln_eps)              # [BT, C]
        qkv = linear(b, ln1, p + "attn.qkv.w", p + "attn.qkv.b", "qkv")          # [BT, 3C]
        q, k, v = b.Split(qkv, b.i64(C, C, C), axis=1, outputs=3, name="qkv_split")  # 3 x [BT, C]
        q, k, v = (split_heads(b, t, dims, n) for t, n in ((q, "q"), (k, "k"), (v, "v")))  # [B, H, T, D]
        y = attend(q, k, v) if attend is not None else attention_core(b, q, k, v, mask, cfg)
        y = merge_heads(b, y, cfg)                                                # [BT, C]
        attproj = linear(b, y, p + "attn.proj.w", p + "attn.proj.b", "attn_proj")
        x = b.Add(x, attproj, name="residual2")                                   # [BT, C]
        ln2 = layernorm(b, x, p + "ln2.w", p + "ln2.b", cfg.ln_eps)
        fch = linear(b, ln2, p + "mlp.fc.w", p + "mlp.fc.b", "fc")                # [BT, 4C]
        fch_gelu = gelu_tanh(b, fch)
        fcproj = linear(b, fch_gelu, p + "mlp.proj.w", p + "mlp.proj.b", "fc_proj")  # [BT, C]
        return b.Add(x, fcproj, name="residual3")


def embed(b: GraphBuilder, tokens: str, positions_from: str | None, cfg: GPT2Config, dims: Dims) -> str:
    """wte[tokens] + wpe[positions] -> [B*T, C]; positions start at ``positions_from``."""
    tok = b.Gather("wte", tokens, axis=0, name="tok_emb")                        # [B, T, C]
    if positions_from is None:
        pos = b.Slice("wpe", b.i64(0), dims.t, b.i64(0), name="pos_emb")        # [T, C]
    else:
        end = b.Add(positions_from, dims.t, name="pos_end")
        pos = b.Slice("wpe", positions_from, end, b.i64(0), name="pos_emb")
    x = b.Add(tok, pos, name="encoded")                                          # [B, T, C]
    return b.Reshape(x, b.i64(-1, cfg.n_embd), name="encoded_2d")                # [B*T, C]


def lm_head(b: GraphBuilder, x: str, cfg: GPT2Config) -> str:
    """Tied LM head over the real vocabulary: [N, C] -> logits [N, V].

    Like llm.c, multiply by the whole padded ``wte`` and keep the first V logits. Slicing
    ``wte[:V]`` instead would copy the whole table (154 MB at d12) on every call, and its
    gradient would be padded back to [Vp, C]; the padded logits are a 0.1% extra GEMM.
    """
    if cfg.padded_vocab_size == cfg.vocab_size:
        return b.Gemm(x, "wte", transB=1, name="lm_head")                        # [N, V]
    padded = b.Gemm(x, "wte", transB=1, name="lm_head_padded")                   # [N, Vp]
    return b.Slice(padded, b.i64(0), b.i64(cfg.vocab_size), b.i64(1), name="lm_head")  # [N, V]


def cross_entropy(b: GraphBuilder, logits2d: str, targets: str) -> str:
    """mean over positions of -log softmax(logits)[target] (llm.c's mean_loss)."""
    logp = b.LogSoftmax(logits2d, axis=-1, name="logprobs")                      # [BT, V]
    tgt = b.Reshape(targets, b.i64(-1, 1), name="targets_col")                   # [BT, 1]
    picked = b.GatherElements(logp, tgt, axis=1, name="target_logprob")          # [BT, 1]
    return b.Neg(b.ReduceMean(picked, keepdims=0, name="mean_logprob"), name="loss")  # []


def add_param_inputs(b: GraphBuilder, cfg: GPT2Config) -> list[str]:
    names = []
    for spec in param_specs(cfg):
        names.append(b.input(spec.name, np.float32, list(spec.shape)))
    return names


def build_forward(cfg: GPT2Config, *, loss: bool = True, logits: bool = True, name: str = "gpt2") -> onnx.ModelProto:
    """The GPT-2 forward graph: tokens [B, T] (+ targets) -> logits [B, T, V] and/or loss."""
    if not (loss or logits):
        raise ValueError("the graph must output logits, loss, or both")
    b = GraphBuilder(name)
    tokens = b.input("tokens", np.int64, ["B", "T"])
    targets = b.input("targets", np.int64, ["B", "T"]) if loss else None
    add_param_inputs(b, cfg)

    dims = make_dims(b, cfg, tokens)
    x = embed(b, tokens, None, cfg, dims)                                        # [BT, C]
    mask = causal_mask(b, dims.t, dims.t)                                        # [T, T]
    for layer in range(cfg.n_layer):
        x = block(b, x, layer, cfg, dims, mask)
    xf = layernorm(b, x, "lnf.w", "lnf.b", cfg.ln_eps)                           # [BT, C]
    logits2d = lm_head(b, xf, cfg)                                               # [BT, V]
    if logits:
        b.output(b.Reshape(logits2d, dims.btv, name="logits_btv"), "logits", np.float32, ["B", "T", cfg.vocab_size])
    if loss:
        b.output(cross_entropy(b, logits2d, targets), "loss", np.float32, [])
    return b.model()
