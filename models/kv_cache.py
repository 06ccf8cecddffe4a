"""GPT-2 with a key/value cache: prefill and decode graphs for fast generation.

Cache design
------------
Each layer keeps K and V in a **preallocated, fixed-capacity** buffer, float32
``[B, H, capacity, D]``, that the graphs update **in place** with ONNX ``TensorScatter``
(opset 24, TensorRT-supported with ``axis=-2`` on 4-D tensors):

* ``past.{i}.key`` / ``past.{i}.value`` are graph inputs and ``present.{i}.key`` /
  ``present.{i}.value`` the ``TensorScatter`` outputs of the same shape. The runtime binds
  each ``present`` output to the very buffer it feeds as ``past``; onnxruntime's
  TensorScatter then skips its copy (it only copies when the two differ) and writes just
  the new rows. Nothing is concatenated or reallocated per token, and the graph's shapes
  stay the same for the whole generation (what CUDA graphs / TensorRT profiles want).
* ``capacity`` is a dynamic dim the runtime sizes as ``max(prompt_len) + max_new_tokens``
  (never more than maxT), so attention costs what the request needs, not always maxT.
* The write index of sequence ``b`` is its past length ``past_len[b]`` (TensorScatter's
  per-batch ``write_indices``): prompts of different lengths share a batch, each with its
  own position. Positions continue from ``past_len`` (``wpe[past_len[b] + i]``).
* Decode attends over the full capacity; a key at cache slot ``j`` is visible to the new
  token ``i`` of sequence ``b`` iff ``j <= past_len[b] + i``. Slots beyond (zeros, or stale
  rows from right-padded prompts) are masked, so they never matter as long as they are
  finite (a masked key's probability is exactly 0, but 0 * NaN is NaN): the runtime
  allocates the caches zeroed.

Prefill (``build_prefill``) runs the prompt [B, T] (right-padded, real lengths in
``lengths``) with ordinary causal attention over the prompt alone, writes K/V into slots
``0..T-1`` of the caches, and returns logits of each sequence's last real position
(``[B, V]``) or of every position (``[B, T, V]``). Decode (``build_decode``) takes ``S >= 1``
new tokens per sequence (1 when generating), ``past_len`` and the caches, and returns
logits ``[B, S, V]`` and the updated caches.

The concat-style decoder-with-past that tools such as Optimum / onnxruntime-genai expect
(``past_key_values.{i}.key`` in, ``present.{i}.key`` = past ++ new out, plus
``attention_mask`` and ``position_ids``) is :func:`build_decoder_with_past`, used by
``graphc export --kv-cache``.

All three reuse :mod:`graphc.models.gpt2`'s layers (``block(..., attend=...)``) and use only
operators TensorRT's ONNX parser supports (``tests/test_trt_ops.py``).
"""

from __future__ import annotations

import numpy as np
import onnx

from graphc.ir.builder import GraphBuilder
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import (
    add_param_inputs,
    attention_core,
    block,
    causal_mask,
    layernorm,
    lm_head,
    make_dims,
)

CAPACITY = "capacity"
"""The dynamic cache-capacity dim of the in-place cache graphs."""


def past_name(layer: int, kind: str) -> str:
    """Cache input of the in-place graphs: ``past.{layer}.key`` / ``past.{layer}.value``."""
    return f"past.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """Cache output (all three KV graphs): ``present.{layer}.key`` / ``present.{layer}.value``."""
    return f"present.{layer}.{kind}"


def hf_past_name(layer: int, kind: str) -> str:
    """Cache input of the exported decoder-with-past: ``past_key_values.{layer}.key``."""
    return f"past_key_values.{layer}.{kind}"


def cache_shape(cfg: GPT2Config, batch: int, capacity: int) -> tuple[int, int, int, int]:
    return (batch, cfg.n_head, capacity, cfg.head_dim)


# ----------------------------------------------------------------------------- helpers
def _scalar_dim(b: GraphBuilder, x: str, axis: int, name: str) -> str:
    """int64 scalar: x.shape[axis]."""
    return b.Gather(b.Shape(x, name=f"{name}_shape"), b.const(np.array(axis, np.int64), "axis"), axis=0, name=name)


def _embed_positions(b: GraphBuilder, tokens: str, positions: str, cfg: GPT2Config) -> str:
    """wte[tokens] + wpe[positions] for tokens and positions int64 [B, S] -> [B*S, C]."""
    tok = b.Gather("wte", tokens, axis=0, name="tok_emb")                       # [B, S, C]
    pos = b.Gather("wpe", positions, axis=0, name="pos_emb")                    # [B, S, C]
    x = b.Add(tok, pos, name="encoded")                                         # [B, S, C]
    return b.Reshape(x, b.i64(-1, cfg.n_embd), name="encoded_2d")               # [B*S, C]


def _final_logits(b: GraphBuilder, x: str, cfg: GPT2Config, shape: str) -> str:
    """Final layer norm and the tied LM head, [N, C] -> logits reshaped to ``shape``."""
    xf = layernorm(b, x, "lnf.w", "lnf.b", cfg.ln_eps)                          # [N, C]
    logits = lm_head(b, xf, cfg)                                                # [N, V]
    return b.Reshape(logits, shape, name="logits_shaped")


def _cache_inputs(b: GraphBuilder, cfg: GPT2Config, naming, batch: str, seq: str) -> None:
    for layer in range(cfg.n_layer):
        for kind in ("key", "value"):
            b.input(naming(layer, kind), np.float32, [batch, cfg.n_head, seq, cfg.head_dim])


def _cache_outputs(b: GraphBuilder, cfg: GPT2Config, batch: str, seq: str) -> None:
    for layer in range(cfg.n_layer):
        for kind in ("key", "value"):
            b.output(present_name(layer, kind), dtype=np.float32, shape=[batch, cfg.n_head, seq, cfg.head_dim])


# ----------------------------------------------------------------------------- prefill
def build_prefill(cfg: GPT2Config, *, all_logits: bool = False, name: str = "gpt2_prefill") -> onnx.ModelProto:
    """Prompt -> logits + caches written at slots 0..T-1 (in place, TensorScatter).

    Inputs: ``tokens`` int64 [B, T] (right-padded), ``lengths`` int64 [B] (real prompt
    lengths, 1..T; only when ``all_logits`` is False), ``past.{i}.key|value`` float32
    [B, H, capacity, D] (capacity >= T; contents ignored), and the parameters.
    Outputs: ``logits`` [B, V] at position ``lengths[b] - 1`` (or [B, T, V] with
    ``all_logits``), ``present.{i}.key|value`` [B, H, capacity, D].
    """
    b = GraphBuilder(name)
    tokens = b.input("tokens", np.int64, ["B", "T"])
    lengths = None if all_logits else b.input("lengths", np.int64, ["B"])
    _cache_inputs(b, cfg, past_name, "B", CAPACITY)
    add_param_inputs(b, cfg)

    dims = make_dims(b, cfg, tokens)
    t = _scalar_dim(b, tokens, 1, "seq_len_scalar")
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    positions = b.Unsqueeze(b.Range(zero, t, one, name="positions"), b.i64(0), name="positions_row")  # [1, T]
    positions = b.Expand(positions, dims.bt, name="positions_bt")                # [B, T]
    x = _embed_positions(b, tokens, positions, cfg)                             # [BT, C]
    mask = causal_mask(b, t, t)                                                 # [T, T]

    for layer in range(cfg.n_layer):
        def attend(q, k, v, layer=layer):
            # write this prompt's K/V into slots 0..T-1 (write_indices default to 0)
            for kind, new in (("key", k), ("value", v)):
                b.op("TensorScatter", past_name(layer, kind), new, axis=-2, outputs=[present_name(layer, kind)],
                     name=f"cache_write_{kind}")
            return attention_core(b, q, k, v, mask, cfg)                         # [B, H, T, D]
        x = block(b, x, layer, cfg, dims, mask, attend=attend)

    if all_logits:
        b.output(_final_logits(b, x, cfg, dims.btv), "logits", np.float32, ["B", "T", cfg.vocab_size])
    else:
        x3 = b.Reshape(x, dims.btc, name="x_btc")                                # [B, T, C]
        last = b.Unsqueeze(b.Sub(lengths, one, name="last_pos"), b.i64(1), name="last_idx")  # [B, 1]
        x_last = b.GatherND(x3, last, batch_dims=1, name="x_last")                # [B, C]
        b.output(_final_logits(b, x_last, cfg, b.i64(-1, cfg.vocab_size)), "logits", np.float32,
                 ["B", cfg.vocab_size])
    _cache_outputs(b, cfg, "B", CAPACITY)
    return b.model()


# ----------------------------------------------------------------------------- decode
def build_decode(cfg: GPT2Config, *, name: str = "gpt2_decode") -> onnx.ModelProto:
    """New tokens + caches + past lengths -> logits + caches updated in place.

    Inputs: ``tokens`` int64 [B, S], ``past_len`` int64 [B] (tokens already in each
    sequence's cache; the new ones go to slots past_len..past_len+S-1 at positions
    past_len + i), ``past.{i}.key|value`` float32 [B, H, capacity, D], the parameters.
    Outputs: ``logits`` [B, S, V], ``present.{i}.key|value`` [B, H, capacity, D].
    """
    b = GraphBuilder(name)
    tokens = b.input("tokens", np.int64, ["B", "S"])
    past_len = b.input("past_len", np.int64, ["B"])
    _cache_inputs(b, cfg, past_name, "B", CAPACITY)
    add_param_inputs(b, cfg)

    dims = make_dims(b, cfg, tokens)
    s = _scalar_dim(b, tokens, 1, "new_len")
    cap = _scalar_dim(b, past_name(0, "key"), 2, "capacity")
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    steps = b.Unsqueeze(b.Range(zero, s, one, name="steps"), b.i64(0), name="steps_row")         # [1, S]
    positions = b.Add(b.Unsqueeze(past_len, b.i64(1), name="past_col"), steps, name="positions")  # [B, S]
    x = _embed_positions(b, tokens, positions, cfg)                              # [BS, C]

    # key slot j is visible to new token i of sequence b iff j <= past_len[b] + i
    slots = b.Range(zero, cap, one, name="slots")                                # [cap]
    mask = b.LessOrEqual(b.Unsqueeze(slots, b.i64(0, 1), name="slots_11c"),      # [1, 1, cap]
                         b.Unsqueeze(positions, b.i64(2), name="positions_bs1"),  # [B, S, 1]
                         name="cache_visible")                                   # [B, S, cap]
    mask = b.Unsqueeze(mask, b.i64(1), name="cache_mask")                        # [B, 1, S, cap]

    for layer in range(cfg.n_layer):
        def attend(q, k, v, layer=layer):
            k_all, v_all = (
                b.op("TensorScatter", past_name(layer, kind), new, past_len, axis=-2,
                     outputs=[present_name(layer, kind)], name=f"cache_write_{kind}")[0]
                for kind, new in (("key", k), ("value", v)))                     # [B, H, cap, D]
            return attention_core(b, q, k_all, v_all, mask, cfg)                 # [B, H, S, D]
        x = block(b, x, layer, cfg, dims, mask, attend=attend)

    b.output(_final_logits(b, x, cfg, dims.btv), "logits", np.float32, ["B", "S", cfg.vocab_size])
    _cache_outputs(b, cfg, "B", CAPACITY)
    return b.model()


# ----------------------------------------------------------------------------- export
def build_decoder_with_past(cfg: GPT2Config, *, name: str = "gpt2_decoder_with_past") -> onnx.ModelProto:
    """The concat-style decoder-with-past of Hugging Face / Optimum exports.

    Inputs: ``input_ids`` int64 [batch, seq], ``attention_mask`` int64
    [batch, past_seq + seq] (0 = padding, masked out as a key), ``position_ids`` int64
    [batch, seq], ``past_key_values.{i}.key|value`` float32 [batch, H, past_seq, D]
    (past_seq may be 0), and the parameters (graph inputs; :func:`graphc.models.export.bind`
    makes them initializers).
    Outputs: ``logits`` [batch, seq, V], ``present.{i}.key|value`` = past ++ new along the
    sequence axis, [batch, H, past_seq + seq, D].

    Query ``i`` sits at cache index ``past_seq + i`` and sees key ``j`` iff ``j <= past_seq + i``
    and ``attention_mask[b, j] != 0``. A query always sees its own key too, so a padded
    query (whose outputs are garbage, as in every such export) never has an all-masked
    softmax row whose NaNs would leak into real positions through later layers.
    """
    b = GraphBuilder(name)
    input_ids = b.input("input_ids", np.int64, ["batch", "seq"])
    attention_mask = b.input("attention_mask", np.int64, ["batch", "past_seq + seq"])
    position_ids = b.input("position_ids", np.int64, ["batch", "seq"])
    _cache_inputs(b, cfg, hf_past_name, "batch", "past_seq")
    add_param_inputs(b, cfg)

    dims = make_dims(b, cfg, input_ids)
    seq = _scalar_dim(b, input_ids, 1, "seq_len_scalar")
    past = _scalar_dim(b, hf_past_name(0, "key"), 2, "past_len")
    total = b.Add(past, seq, name="total_len")
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    x = _embed_positions(b, input_ids, position_ids, cfg)                       # [B*seq, C]

    q_idx = b.Unsqueeze(b.Range(past, total, one, name="q_idx"), b.i64(1), name="q_col")   # [seq, 1]
    k_idx = b.Unsqueeze(b.Range(zero, total, one, name="k_idx"), b.i64(0), name="k_row")   # [1, kv]
    causal = b.LessOrEqual(k_idx, q_idx, name="causal")                          # [seq, kv]
    is_self = b.Equal(k_idx, q_idx, name="is_self")                              # [seq, kv]
    keep = b.Unsqueeze(b.Cast(attention_mask, to=onnx.TensorProto.BOOL, name="mask_bool"), b.i64(1, 2),
                       name="mask_b11k")                                         # [B, 1, 1, kv]
    mask = b.Or(b.And(causal, keep, name="causal_and_pad"), is_self, name="attn_visible")  # [B, 1, seq, kv]

    for layer in range(cfg.n_layer):
        def attend(q, k, v, layer=layer):
            k_all, v_all = (
                b.op("Concat", hf_past_name(layer, kind), new, axis=2, outputs=[present_name(layer, kind)],
                     name=f"cache_concat_{kind}")[0]
                for kind, new in (("key", k), ("value", v)))                     # [B, H, kv, D]
            return attention_core(b, q, k_all, v_all, mask, cfg)
        x = block(b, x, layer, cfg, dims, mask, attend=attend)

    b.output(_final_logits(b, x, cfg, dims.btv), "logits", np.float32, ["batch", "seq", cfg.vocab_size])
    _cache_outputs(b, cfg, "batch", "past_seq + seq")
    return b.model()
