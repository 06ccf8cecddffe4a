"""``graphc engine``: build a TensorRT engine for GPT-2 and write it atomically.

    graphc engine --model PATH|NAME --out FILE.plan [--precision bf16|fp32] \\
      [--mode infer|prefill|decode|train] [--max-batch 16 --max-seq 1024] [--trt-flavor auto|tensorrt|rtx]

Builds the graph of the mode (parameters are engine inputs, so only the model's config
matters), optimises it for TensorRT, applies the precision (``bf16``: graphc's BF16 pass;
``fp32``: as is, attention allowed to decompose), builds a strongly typed engine with one
optimisation profile (batch 1..max-batch, sequence 1..max-seq; KV-cache capacity max-seq)
and prints one line::

    engine FILE.plan: <flavor> <version>, <precision>, <N> layers, attention fused <k>/<L>, built in <s> s

N: layers of the parsed network; L: attention ops in the graph; k: those TensorRT built as
a fused attention kernel, read from the builder's layer report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graphc.cli.common import int_at_least, positive
from graphc.errors import GraphcError

HELP = "build a TensorRT engine (BF16 or FP32, fused attention) for inference, KV-cache prefill/decode or training"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from graphc.backends.tensorrt.flavor import CHOICES
    from graphc.backends.tensorrt.graphs import MODES
    from graphc.precision import PRECISIONS

    p.add_argument("--model", required=True,
                   help="llm.c .bin, HF model.safetensors (file or folder), or a size name (d12, L4H4C128)")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.plan", help="where to write the engine")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16",
                   help="bf16: graphc's BF16 mixed-precision pass (FP32 master weights in training); fp32 (default bf16)")
    p.add_argument("--mode", choices=MODES, default="infer",
                   help="infer: tokens -> logits; prefill / decode: the KV-cache graphs (cache as engine I/O); "
                        "train: loss and every parameter gradient (default infer)")
    p.add_argument("--max-batch", type=positive("--max-batch"), default=16, help="largest batch (default 16)")
    p.add_argument("--max-seq", type=int_at_least("--max-seq", 2), default=1024,
                   help="longest sequence, and the KV-cache capacity (at least 2; default 1024)")
    p.add_argument("--trt-flavor", choices=CHOICES, default="auto",
                   help="datacenter TensorRT (tensorrt), TensorRT for RTX (rtx), or auto: tensorrt if installed")


def check_out_path(path: Path) -> None:
    """Refuse an output we could not write, or one named like an ONNX model, before any work."""
    from graphc.outputs import check_output_file

    if path.suffix.lower() == ".onnx":
        raise GraphcError(path, "names an ONNX model; an engine is a serialized plan (e.g. model.plan)", "--out")
    check_output_file(path, "--out")


def run(args: argparse.Namespace) -> int:
    from graphc.backends.tensorrt.builder import build_engine
    from graphc.backends.tensorrt.flavor import load_flavor
    from graphc.backends.tensorrt.graphs import engine_graph
    from graphc.cli.compile import model_config
    from graphc.fileio import atomic_write

    check_out_path(args.out)
    flavor = load_flavor(args.trt_flavor)
    cfg = model_config(args.model)
    if args.max_seq > cfg.max_seq_len:
        raise GraphcError(args.model, f"--max-seq {args.max_seq} exceeds the model's maximum {cfg.max_seq_len}",
                          "--max-seq")
    model = engine_graph(cfg, args.mode, args.precision)
    built = build_engine(model, flavor=flavor, precision=args.precision, max_batch=args.max_batch,
                         max_seq=args.max_seq, where=str(args.model))
    with atomic_write(args.out) as f:
        f.write(built.plan)
    print(built.line(args.out))
    return 0
