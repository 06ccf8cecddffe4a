"""``graphc compile``: run the optimisation pipeline on GPT-2 and report every pass.

    graphc compile --model PATH|NAME --mode train|infer|decode [-b B -t T] [--precision fp32|bf16]
                   [--backend NAME] [--recompute] [--dump DIR] [--json]

Builds the graph of one step for the model's config (``infer``: forward logits only;
``train``: forward with the loss, differentiated w.r.t. every parameter inside the
pipeline; ``decode``: one KV-cache decode step, one new token per sequence over a cache of
capacity T), runs
the pipeline (:func:`graphc.passes.pipelines.optimize`) and plans memory for batch B and
sequence length T. Only the config matters: a named size (``d12``) needs no weights, a
checkpoint is read for its header/config. Prints one line per pass (nodes before/after,
what it fused and how many times, time) and the memory plan (peak vs naive bytes); with
``--json`` one JSON object instead. ``--precision bf16`` appends the BF16 pass (its line
says how many casts it inserted and what stayed float32) and plans the bf16 graph itself,
not onnxruntime's float32 emulation of it. ``--backend`` legalises the graph for a backend
(a one-line error naming the first node it cannot run); ``--backend cuda --mode train``
also prints the CUDA train step's GPU-memory estimate (the arena as the backend lays it
out, activations shared by liveness, plus parameters), computed without a GPU.
``--recompute`` appends the recomputation pass (``passes/recompute.py``) in train mode.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from graphc.backends import REGISTRY
from graphc.cli.common import add_precision_arg, check_seq_len, positive
from graphc.outputs import check_output_dir

HELP = "optimise the GPT-2 training or inference graph and report every pass and the memory plan"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="llm.c .bin, HF model.safetensors (file or folder), or a size name (d12, L4H4C128)")
    p.add_argument("--mode", required=True, choices=sorted(MODES),
                   help="train: forward + loss + backward for every parameter; infer: forward logits only; "
                        "decode: one KV-cache decode step (T = cache capacity)")
    p.add_argument("-b", dest="B", type=positive("-b"), default=4, help="batch size for the memory plan (default 4)")
    p.add_argument("-t", dest="T", type=positive("-t"), default=64,
                   help="sequence length for the memory plan (default 64)")
    add_precision_arg(p, "bf16 appends the BF16 mixed-precision pass (float32 master weights when training)")
    p.add_argument("--backend", choices=sorted(REGISTRY), default=None,
                   help="legalise for this backend; cuda (train) also prints its GPU-memory estimate")
    p.add_argument("--recompute", action="store_true",
                   help="train: recompute GELU / layer-norm outputs in backward (passes/recompute.py)")
    p.add_argument("--dump", metavar="DIR", type=Path,
                   help="write the graph after every pass as DIR/NN_pass.onnx + .txt (also $GRAPHC_DUMP_DIR)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")


def model_config(spec: str):
    """The GPT-2 config of ``--model``: a named size needs no weights at all."""
    from graphc.models.config import is_named_config, named_config

    if not Path(spec).exists() and is_named_config(spec):
        return named_config(spec)
    from graphc.models.load import load_model

    return load_model(spec).cfg


def _train(cfg):
    from graphc.models.gpt2 import build_forward

    return build_forward(cfg, loss=True, logits=False)


def _infer(cfg):
    from graphc.models.gpt2 import build_forward

    return build_forward(cfg, loss=False, logits=True)


def _decode(cfg):
    from graphc.models.kv_cache import build_decode

    return build_decode(cfg)


# mode -> (graph builder, pipeline, symbolic dims of the memory plan from B and T)
MODES = {
    "train": (_train, "train", lambda B, T: {"B": B, "T": T}),
    "infer": (_infer, "infer", lambda B, T: {"B": B, "T": T}),
    "decode": (_decode, "infer", lambda B, T: {"B": B, "S": 1, "capacity": T}),
}


def compile_model(cfg, mode: str, B: int, T: int, dump_dir=None, precision: str = "fp32",
                  backend: str | None = None, recompute: bool = False) -> dict:
    """Build, optimise and plan; return the report as a dict (the ``--json`` object)."""
    from graphc.passes.memory_plan import plan_model
    from graphc.passes.pipelines import optimize

    build, pipeline, dims = MODES[mode]
    model, report = optimize(build(cfg), pipeline, dump_dir=dump_dir, precision=precision, emulate=False,
                             backend=backend, recompute=recompute)
    mem = plan_model(model, dims(B, T))
    extra = {}
    if backend == "cuda" and mode == "train":
        from graphc.backends.cuda.train import memory_estimate
        from graphc.runtime.programs import TrainSpec

        extra["cuda_memory"] = memory_estimate(cfg, TrainSpec(B=B, T=T, precision=precision, recompute=recompute))
    return extra | {
        "mode": mode, "config": cfg.describe(), "B": B, "T": T, "precision": precision,
        "pipeline": report.pipeline,
        "nodes_before": report.nodes_before, "nodes_after": report.nodes_after,
        "fused": report.fused,
        "peak_bytes": mem.peak_bytes, "naive_bytes": mem.naive_bytes,
        "memory": mem.summary(),
        "seconds": round(report.seconds, 4),
        "passes": [{"index": p.index, "name": p.name, "nodes_before": p.nodes_before, "nodes_after": p.nodes_after,
                    "changed": p.changed, "fused": p.fused, "stats": p.stats, "seconds": round(p.seconds, 6)}
                   for p in report.passes],
        "op_counts": report.op_counts,
        "_report": report, "_plan": mem,
    }


def run(args: argparse.Namespace) -> int:
    if args.dump is not None:
        check_output_dir(args.dump, "--dump")
    cfg = model_config(args.model)
    check_seq_len(cfg, args.T)
    try:
        result = compile_model(cfg, args.mode, args.B, args.T, dump_dir=args.dump, precision=args.precision,
                               backend=args.backend, recompute=args.recompute)
    except OSError as e:  # the dumps are the only files compile writes: name their folder
        dump = args.dump or os.environ.get("GRAPHC_DUMP_DIR")
        if e.filename is None and dump:
            e.filename = os.fspath(dump)
        raise
    report, mem = result.pop("_report"), result.pop("_plan")
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"graphc compile: {args.model} ({cfg.describe()}), mode {args.mode}, B={args.B} T={args.T}"
          + (f", precision {args.precision}" if args.precision != "fp32" else ""))
    print(report.format())
    print(mem.format())
    print(f"peak_bytes {mem.peak_bytes}  naive_bytes {mem.naive_bytes}")
    if "cuda_memory" in result:
        est = dict(result["cuda_memory"])
        total = est.pop("total")
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in est.items() if v)
        print(f"cuda memory estimate: {total / 2**30:.2f} GiB ({parts} GiB; + ~1 GiB context and libraries)")
    if args.dump:
        print(f"dumped every stage to {args.dump}")
    return 0
