"""``graphc grad``: differentiate any ONNX model with respect to chosen inputs/initializers."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from graphc.errors import GraphcError
from graphc.fileio import atomic_write, remove_leftovers_of
from graphc.outputs import check_output_file

HELP = "append the backward pass to an ONNX model: outputs the loss and grad.<name> for each --wrt"

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_MIN_BYTES = 1024   # smaller tensors stay inside the model file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="forward model with a scalar float loss")
    parser.add_argument("--loss", required=True, metavar="NAME", help="the scalar value to differentiate")
    parser.add_argument("--wrt", required=True, metavar="NAME,...",
                        help="comma-separated graph inputs or initializers to differentiate with respect to")
    parser.add_argument("--out", required=True, metavar="TRAIN.onnx", help="where to write the training model")
    parser.add_argument("--no-keep-outputs", dest="keep_outputs", action="store_false",
                        help="drop the model's other outputs (keep only the loss and the gradients)")


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model (with its external data), or raise a one-line GraphcError."""
    path = Path(path)
    if not path.exists():
        raise GraphcError(path, "not found", "model")
    if path.is_dir():
        raise GraphcError(path, "is a directory, expected an ONNX model file", "model")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise GraphcError(path, f"not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                          "model")
    if not model.HasField("graph") or not model.graph.node and not model.graph.output:
        raise GraphcError(path, "not an ONNX model (no graph)", "model")
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise GraphcError(path, f"invalid ONNX model: {str(e).strip().splitlines()[0]}", "model") from None
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` atomically. Past protobuf's 2 GB limit its tensors go to one
    external-data file ``<name>.data`` beside it (written atomically too, first)."""
    path = Path(path)
    if model.ByteSize() >= PROTOBUF_LIMIT:
        data_name = path.name + ".data"
        with atomic_write(path.parent / data_name) as f:
            for t in _tensors(model.graph):
                _externalize(t, f, data_name)
    with atomic_write(path) as f:
        f.write(model.SerializeToString())


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def _externalize(t: onnx.TensorProto, f, location: str) -> None:
    threshold = EXTERNAL_MIN_BYTES
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return
    if not t.HasField("raw_data"):
        if t.ByteSize() < threshold:
            return
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    if len(t.raw_data) < threshold:
        return
    offset = f.tell()
    f.write(t.raw_data)
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(t.raw_data)))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL
    t.ClearField("raw_data")


def run(args: argparse.Namespace) -> int:
    from graphc.passes.autodiff import differentiate

    check_output_file(args.out, "--out")
    remove_leftovers_of(args.out, args.out + ".data")
    model = load_model(args.model)
    wrt = [w.strip() for w in args.wrt.split(",") if w.strip()]
    if not wrt:
        raise GraphcError(args.model, "no names given", "--wrt")
    try:
        train = differentiate(model, args.loss, wrt, keep_outputs=args.keep_outputs)
    except GraphcError as e:
        field = {"loss": "--loss", "wrt": "--wrt"}.get(e.field or "", e.field)
        raise GraphcError(args.model, e.message, field) from None
    except NotImplementedError as e:
        raise GraphcError(args.model, str(e), "model") from None
    save_model(train, args.out)
    forward_values = {o for n in model.graph.node for o in n.output if o}
    n_forward = sum(1 for n in train.graph.node if any(o in forward_values for o in n.output))
    n_backward = len(train.graph.node) - n_forward
    print(f"wrote {args.out}: {n_forward} forward nodes, {n_backward} backward nodes, {len(wrt)} gradients")
    return 0
