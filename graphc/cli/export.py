"""``graphc export``: a self-contained ONNX model, or the weights in Hugging Face layout.

    graphc export --model PATH|NAME --out FILE.onnx [--kv-cache] [--opset N] [--precision fp32|bf16] [--primitive-ops] [--genai-config]
    graphc export --model PATH|NAME --weights-only DIR

See ``docs/export.md`` for the exported inputs and outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graphc import OPSET
from graphc.cli.common import add_model_args, add_precision_arg
from graphc.errors import GraphcError
from graphc.fileio import remove_leftovers_of
from graphc.outputs import check_output_dir, check_output_file

HELP = "export a GPT-2 as ONNX (plain or decoder-with-past KV cache), or its weights as HF safetensors"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", metavar="FILE.onnx", help="write an ONNX model with the weights as initializers "
                      "(beside it FILE.onnx.data when the weights pass 2 GB)")
    dest.add_argument("--weights-only", metavar="DIR",
                      help="write model.safetensors + config.json (Hugging Face GPT2LMHeadModel layout) into DIR")
    p.add_argument("--kv-cache", action="store_true",
                   help="export the decoder with past (input_ids, attention_mask, position_ids, "
                        "past_key_values.{i}.key/value -> logits, present.{i}.key/value)")
    p.add_argument("--opset", type=int, default=OPSET, metavar="N",
                   help=f"ONNX opset of the exported model, 18..{OPSET} (default %(default)s)")
    add_precision_arg(p, "bf16: weights as bf16 initializers, bf16 compute with float32 layer-norm statistics, "
                         "softmax and logits (the optimised inference graph after the BF16 pass)")
    p.add_argument("--genai-config", action="store_true",
                   help="with --kv-cache: also write genai_config.json beside the model for onnxruntime-genai "
                        "(\"type\": \"decoder\")")
    p.add_argument("--primitive-ops", action="store_true",
                   help="write layer norm, GELU and attention as primitive ops (default: the standard "
                        "LayerNormalization, Gelu(tanh) and Attention ops the opset has)")


def run(args: argparse.Namespace) -> int:
    from graphc.models.export import export_onnx, export_weights, write_genai_config
    from graphc.models.load import load_model

    if args.genai_config and not args.kv_cache:
        raise GraphcError(None, "onnxruntime-genai runs the decoder with past: add --kv-cache", "--genai-config")
    if args.primitive_ops and args.precision != "fp32":
        raise GraphcError(None, "the bf16 export is the optimised (fused) graph; drop --primitive-ops", "--precision")
    if args.weights_only is not None and (args.kv_cache or args.opset != OPSET or args.primitive_ops
                                          or args.precision != "fp32"):
        raise GraphcError(None, "--kv-cache, --opset, --precision and --primitive-ops apply to --out (an ONNX "
                          "model), not to --weights-only", "--weights-only")
    if args.weights_only is not None:
        check_output_dir(args.weights_only, "--weights-only")
    else:
        check_output_file(args.out, "--out")
    params = load_model(args.model, args.seed)
    needed = 4 * params.flat.size + (1 << 20)
    if args.weights_only is not None:
        check_output_dir(args.weights_only, "--weights-only", needed)
        remove_leftovers_of(*(Path(args.weights_only) / n for n in ("model.safetensors", "config.json")))
    else:
        check_output_file(args.out, "--out", needed)
        remove_leftovers_of(args.out, args.out + ".data", Path(args.out).parent / "genai_config.json")
    if args.weights_only is not None:
        written = export_weights(params, args.weights_only)
    else:
        written = export_onnx(params, args.out, kv_cache=args.kv_cache, opset=args.opset,
                              primitive_ops=args.primitive_ops, precision=args.precision)
        if args.genai_config:
            written.append(write_genai_config(params.cfg, args.out))
    for path in written:
        print(f"wrote {path}")
    return 0
