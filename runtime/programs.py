"""Compiled programs for a GPT-2 config: the graphs the runtime executes.

A program is a graph built by :mod:`graphc.models.gpt2`, optionally optimised by the
pass pipelines (``opt=True``, the default everywhere; ``--no-opt`` turns it off), then
prepared on a backend with the parameters bound once. Building the graph is cheap (the
weights are graph inputs, not embedded), so programs are built on demand.
"""

from __future__ import annotations

import onnx

from graphc.backends import get_backend
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.models.params import Params


def optimize(model: onnx.ModelProto, mode: str) -> onnx.ModelProto:
    from graphc.passes.pipelines import optimize as run_pipeline

    optimized, _report = run_pipeline(model, mode)
    return optimized


def forward_graph(cfg: GPT2Config, *, loss: bool, logits: bool, opt: bool = True) -> onnx.ModelProto:
    model = build_forward(cfg, loss=loss, logits=logits)
    return optimize(model, "infer") if opt else model


def training_graph(cfg: GPT2Config, *, opt: bool = True) -> onnx.ModelProto:
    """Forward with loss + backward: outputs ``loss`` and ``grad.<param>`` for every param."""
    forward = build_forward(cfg, loss=True, logits=False)
    if opt:
        return optimize(forward, "train")  # the pipeline differentiates after fusing
    from graphc.models.params import param_specs
    from graphc.passes.autodiff import differentiate

    return differentiate(forward, "loss", [s.name for s in param_specs(cfg)], keep_outputs=False)


def prepare(model: onnx.ModelProto, params: Params, backend: str = "onnxruntime"):
    prepared = get_backend(backend)().prepare(model)
    prepared.bind(params.feeds())
    return prepared
