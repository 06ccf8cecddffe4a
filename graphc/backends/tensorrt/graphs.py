"""The graphs ``graphc engine`` builds, per mode, at a precision.

Parameters stay graph inputs (engine I/O): an engine serves every checkpoint of its
config, the runtime owns the weights (and, in training, updates them in place with its own
AdamW kernel), and the engine cache needs no weight hash.

====== ============================================ ============ ===========================
mode   graph (models/)                              pipeline     engine I/O
====== ============================================ ============ ===========================
infer  ``build_forward(logits=True)``               infer        tokens -> logits
prefill ``build_prefill``                            infer        tokens, lengths, past.* ->
                                                                 logits (last), present.*
decode ``build_decode``                             infer        tokens, past_len, past.* ->
                                                                 logits, present.*
train  ``build_forward(loss=True)`` + autodiff      train        tokens, targets -> loss,
                                                                 grad.<param>
====== ============================================ ============ ===========================

The KV caches are engine inputs ``past.*`` and outputs ``present.*`` written with
TensorScatter; the runtime binds each ``present`` to the very buffer of its ``past``, so
the cache is updated in place.
"""

from __future__ import annotations

import onnx

from graphc.models.config import GPT2Config

MODES = ("infer", "prefill", "decode", "train")


def _forward(cfg: GPT2Config) -> onnx.ModelProto:
    from graphc.models.gpt2 import build_forward

    return build_forward(cfg, loss=False, logits=True)


def _prefill(cfg: GPT2Config) -> onnx.ModelProto:
    from graphc.models.kv_cache import build_prefill

    return build_prefill(cfg)


def _decode(cfg: GPT2Config) -> onnx.ModelProto:
    from graphc.models.kv_cache import build_decode

    return build_decode(cfg)


def _train(cfg: GPT2Config) -> onnx.ModelProto:
    from graphc.models.gpt2 import build_forward

    return build_forward(cfg, loss=True, logits=False)


# mode -> (graph builder, optimisation pipeline)
GRAPHS = {
    "infer": (_forward, "infer"),
    "prefill": (_prefill, "infer"),
    "decode": (_decode, "infer"),
    "train": (_train, "train"),
}


def engine_graph(cfg: GPT2Config, mode: str, precision: str) -> onnx.ModelProto:
    """The graph of ``mode``, optimised for TensorRT at ``precision`` (the BF16 pass runs
    inside the pipeline, after the fusions; FP32 master weights in training)."""
    from graphc.passes.pipelines import optimize

    build, pipeline = GRAPHS[mode]
    model, _ = optimize(build(cfg), pipeline, backend="tensorrt", precision=precision)
    return model
