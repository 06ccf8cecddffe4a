"""``graphc export``: a self-contained ONNX model, or the weights in Hugging Face layout.

    graphc export --model PATH|NAME --out FILE.onnx [--kv-cache] [--opset N] [--precision fp32|bf16] [--primitive-ops] [--genai-config]
    graphc export --model PATH|NAME --weights-only DIR
    graphc export --model PATH|NAME --triton-repo DIR [--served-model-name gpt2 --max-batch 8 --context N
                  --tokenizer-dir DIR --triton-env ARCHIVE] [--precision fp32|bf16]

See ``docs/export.md`` for the exported inputs and outputs, and ``graphc/models/triton_repo.py``
for the Triton model repository.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graphc import OPSET
from graphc.cli.common import add_model_args, add_precision_arg, positive
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
    dest.add_argument("--triton-repo", metavar="DIR",
                      help="write an NVIDIA Triton model repository into DIR (a new folder): a decoupled "
                           "Python-backend model running graphc's Decoder, the KV-cache model.onnx for the "
                           "onnxruntime backend, and a model.plan where datacenter TensorRT is installed")
    p.add_argument("--kv-cache", action="store_true",
                   help="export the decoder with past (input_ids, attention_mask, position_ids, "
                        "past_key_values.{i}.key/value -> logits, present.{i}.key/value)")
    p.add_argument("--opset", type=int, default=OPSET, metavar="N",
                   help=f"ONNX opset of the exported model, 18..{OPSET} (default %(default)s)")
    triton = p.add_argument_group("--triton-repo options")
    triton.add_argument("--served-model-name", default="gpt2", metavar="NAME",
                        help="the Python model's name in the repository (NAME_onnx, NAME_trt beside it; default gpt2)")
    triton.add_argument("--max-batch", type=positive("--max-batch"), default=8,
                        help="sequences the Python model decodes together, and the TensorRT profile's batch (default 8)")
    triton.add_argument("--context", type=positive("--context"), default=None,
                        help="cache positions per sequence: prompt + max_tokens (default: the model's maximum)")
    triton.add_argument("--tokenizer-dir", default=None, metavar="DIR",
                        help="copy OpenAI's vocab.bpe + encoder.json from DIR (or $GRAPHC_TOKENIZER_DIR) into the "
                             "repository; without them the model uses the server's tiktoken cache")
    triton.add_argument("--triton-env", default=None, metavar="ARCHIVE",
                        help="a packed Python environment with graphc (conda-pack or venv-pack .tar.gz/.tgz/.tar), "
                             "copied beside the Python model and named by its EXECUTION_ENV_PATH")
    add_precision_arg(p, "bf16: weights as bf16 initializers, bf16 compute with float32 layer-norm statistics, "
                         "softmax and logits (the optimised inference graph after the BF16 pass)")
    p.add_argument("--genai-config", action="store_true",
                   help="with --kv-cache: also write genai_config.json beside the model for onnxruntime-genai "
                        "(\"type\": \"decoder\")")
    p.add_argument("--primitive-ops", action="store_true",
                   help="write layer norm, GELU and attention as primitive ops (default: the standard "
                        "LayerNormalization, Gelu(tanh) and Attention ops the opset has)")


TRITON_ONLY = {"--served-model-name": "gpt2", "--max-batch": 8, "--context": None, "--tokenizer-dir": None,
               "--triton-env": None}


def run(args: argparse.Namespace) -> int:
    from graphc.models.export import export_onnx, export_weights, write_genai_config
    from graphc.models.load import load_model
    from graphc.models.triton_repo import check_env_archive, check_repo_path, write_triton_repo

    if args.triton_repo is None:
        for flag, default in TRITON_ONLY.items():
            if getattr(args, flag[2:].replace("-", "_")) != default:
                raise GraphcError(None, "applies to --triton-repo only", flag)
    else:
        if args.kv_cache or args.opset != OPSET or args.primitive_ops or args.genai_config:
            raise GraphcError(None, "--kv-cache, --opset, --primitive-ops and --genai-config apply to --out; "
                              "--triton-repo always writes the KV-cache model at the default opset", "--triton-repo")
        check_repo_path(args.triton_repo)        # before the model is loaded
        check_env_archive(args.triton_env)
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
    elif args.out is not None:
        check_output_file(args.out, "--out")
    params = load_model(args.model, args.seed)
    if args.triton_repo is not None:
        notes = write_triton_repo(params, args.triton_repo, name=args.served_model_name, precision=args.precision,
                                  max_batch=args.max_batch, context=args.context, tokenizer_dir=args.tokenizer_dir,
                                  env_archive=args.triton_env)
        print(f"wrote {args.triton_repo}")
        for note in notes:
            print(f"  {note}")
        return 0
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
