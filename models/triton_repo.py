"""An NVIDIA Triton model repository for a GPT-2: ``graphc export --triton-repo DIR``.

Triton serves the folder unchanged (``tritonserver --model-repository DIR``)::

    DIR/
      NAME/                    Python backend, decoupled: graphc's batched Decoder, streaming
        config.pbtxt
        1/model.py             graphc/runtime/triton_model.py
        1/model.safetensors    the weights (+ config.json), Hugging Face layout
        1/tokenizer/           vocab.bpe + encoder.json (when --tokenizer-dir is given)
        ENV.tar.gz             a packed Python environment with graphc (when --triton-env is given)
      NAME_onnx/               onnxruntime backend: the KV-cache decoder-with-past
        config.pbtxt
        1/model.onnx
      NAME_trt/                TensorRT backend, only where datacenter TensorRT built the engine
        config.pbtxt
        1/model.plan

The onnx and plan models are stateless steps (the client carries the cache: feed
``present.*`` back as ``past_key_values.*``; ``docs/export.md``), so their configs take
``max_batch_size: 0`` and the tensors' own shapes, read from the exported graph (a dynamic
dim is ``-1``). TensorRT-RTX engines are not written: Triton's TensorRT backend links
datacenter TensorRT and cannot load them.

The repository is built in a temporary folder beside ``DIR`` and renamed into place, so a
failure leaves nothing half-written and never touches an existing repository.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from graphc.errors import GraphcError
from graphc.fileio import staging_dir
from graphc.models.params import Params

TEMPLATE_MODULE = "graphc.runtime.triton_model"
"""The Python-backend model (``runtime/triton_model.py``), copied into the repository as ``model.py``."""

TOKENIZER_FILES = ("vocab.bpe", "encoder.json")

TRITON_DTYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.BOOL: "TYPE_BOOL",
}
"""ONNX element type -> Triton's ``data_type`` (model_config.proto)."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a Triton model config: name, Triton data type, dims (-1 = any)."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False

    def pbtxt(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        extra = " optional: true" if self.optional else ""
        return f'  {{ name: "{self.name}" data_type: {self.data_type} dims: [ {dims} ]{extra} }}'


# The Python model's tensors, named as Triton's LLM examples name them (vLLM backend,
# TensorRT-LLM's ensemble); runtime/triton_model.py reads and writes exactly these.
PYTHON_INPUTS = (
    TensorSpec("text_input", "TYPE_STRING", (1,), optional=True),
    TensorSpec("input_ids", "TYPE_INT32", (-1,), optional=True),
    TensorSpec("max_tokens", "TYPE_INT32", (1,), optional=True),
    TensorSpec("temperature", "TYPE_FP32", (1,), optional=True),
    TensorSpec("top_k", "TYPE_INT32", (1,), optional=True),
    TensorSpec("top_p", "TYPE_FP32", (1,), optional=True),
    TensorSpec("seed", "TYPE_UINT64", (1,), optional=True),
)
PYTHON_OUTPUTS = (
    TensorSpec("text_output", "TYPE_STRING", (-1,)),
    TensorSpec("output_ids", "TYPE_INT32", (-1,)),
)


def graph_tensors(values) -> list[TensorSpec]:
    """TensorSpecs of ONNX graph inputs or outputs: their element types and shapes."""
    specs = []
    for v in values:
        elem = v.type.tensor_type.elem_type
        if elem not in TRITON_DTYPES:
            raise ValueError(f"{v.name}: ONNX element type {onnx.TensorProto.DataType.Name(elem)} has no Triton type here")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
        specs.append(TensorSpec(v.name, TRITON_DTYPES[elem], dims))
    return specs


def render_config(name: str, head: list[str], inputs, outputs, tail: list[str] = ()) -> str:
    """A ``config.pbtxt``: name, the ``head`` lines (backend, batching...), inputs, outputs, ``tail``."""
    lines = [f'name: "{name}"', *head,
             "input [", ",\n".join(t.pbtxt() for t in inputs), "]",
             "output [", ",\n".join(t.pbtxt() for t in outputs), "]", *tail]
    return "\n".join(lines) + "\n"


def _parameter(key: str, value) -> str:
    return f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'


def python_config(name: str, *, max_batch: int, context: int, precision: str, env_archive: str | None = None) -> str:
    """The decoupled Python-backend model; ``parameters`` configure the Decoder it runs, and
    ``EXECUTION_ENV_PATH`` names the packed Python environment kept in the model's folder."""
    env = [_parameter("EXECUTION_ENV_PATH", f"$$TRITON_MODEL_DIRECTORY/{env_archive}")] if env_archive else []
    return render_config(
        name,
        ['backend: "python"', "max_batch_size: 0",
         "model_transaction_policy { decoupled: true }"],
        PYTHON_INPUTS, PYTHON_OUTPUTS,
        ["instance_group [ { count: 1 kind: KIND_CPU } ]",
         _parameter("backend", "onnxruntime"), _parameter("precision", precision),
         _parameter("max_batch", max_batch), _parameter("context", context), *env])


def step_config(name: str, model: onnx.ModelProto, platform: str) -> str:
    """A stateless onnxruntime (``onnxruntime_onnx``) or TensorRT (``tensorrt_plan``) model
    with the exported graph's own inputs and outputs."""
    return render_config(name, [f'platform: "{platform}"', "max_batch_size: 0"],
                         graph_tensors(model.graph.input), graph_tensors(model.graph.output))


# ----------------------------------------------------------------------------- TensorRT
def build_plan(onnx_path: Path, *, max_batch: int, context: int) -> tuple[bytes | None, str]:
    """A serialized engine of the exported decoder-with-past, built by datacenter TensorRT, and
    a note; ``(None, why)`` where that TensorRT (and a GPU) is not here.

    One optimisation profile: batch 1..max_batch, new tokens 1..context, past 0..context-1."""
    try:
        import tensorrt as trt
    except ImportError:
        return None, "no model.plan: datacenter TensorRT (the tensorrt package) is not installed"
    logger = trt.Logger(trt.Logger.ERROR)
    try:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            return None, f"no model.plan: TensorRT's ONNX parser failed: {errors[:1]}"
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            lo, opt, hi = _profile(tensor.name, tuple(tensor.shape), max_batch, context)
            profile.set_shape(tensor.name, lo, opt, hi)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
    except Exception as e:  # noqa: BLE001 - no GPU, driver or builder problems: the repository goes on without it
        return None, f"no model.plan: TensorRT could not build the engine ({type(e).__name__}: {e})"
    if plan is None:
        return None, "no model.plan: TensorRT's builder returned no engine"
    return bytes(plan), f"model.plan built by TensorRT {trt.__version__}"


def _profile(name: str, shape: tuple[int, ...], max_batch: int, context: int):
    """(min, opt, max) shapes of one decoder-with-past input."""
    if name.startswith("past_key_values."):
        _, heads, _, head_dim = shape
        return ((1, heads, 0, head_dim), (1, heads, context // 2, head_dim), (max_batch, heads, context - 1, head_dim))
    return (1, 1), (1, 1), (max_batch, context)   # input_ids, position_ids, attention_mask


# ----------------------------------------------------------------------------- writing
ENV_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def check_env_archive(archive: str | os.PathLike | None) -> Path | None:
    """A packed Python environment (conda-pack / venv-pack archive) for ``EXECUTION_ENV_PATH``."""
    if archive is None:
        return None
    archive = Path(archive)
    if not archive.is_file():
        raise GraphcError(archive, "not found (expected a conda-pack or venv-pack archive)", "--triton-env")
    if not archive.name.endswith(ENV_ARCHIVE_SUFFIXES):
        raise GraphcError(archive, f"expected a {', '.join(ENV_ARCHIVE_SUFFIXES)} archive", "--triton-env")
    return archive


def check_repo_path(out: str | os.PathLike) -> Path:
    """``out`` must not exist yet (or be an empty folder): a repository is never overwritten."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise GraphcError(out, "already exists; pass a new folder (an existing model repository is never "
                               "overwritten)", "--triton-repo")
    return out


def write_triton_repo(params: Params, out: str | os.PathLike, *, name: str = "gpt2", precision: str = "fp32",
                      max_batch: int = 8, context: int | None = None,
                      tokenizer_dir: str | os.PathLike | None = None, env_archive: str | os.PathLike | None = None,
                      plan: bool = True) -> list[str]:
    """Write the repository (layout in the module docstring); returns what was written, one
    line each (the notes say why an optional part is absent)."""
    from graphc.models.export import export_onnx
    from graphc.models.hf import save_hf

    out = check_repo_path(out)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise GraphcError(None, f"{name!r} is not a model name (letters, digits, '_', '-', '.')", "--served-model-name")
    context = context or params.cfg.max_seq_len
    if not 1 < context <= params.cfg.max_seq_len:
        raise GraphcError(None, f"must be 2..{params.cfg.max_seq_len} (the model's maximum), got {context}",
                          "--context")
    tokenizer_files = _tokenizer_files(tokenizer_dir)
    env_archive = check_env_archive(env_archive)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out.parent, out.name)
    try:
        notes = []
        python = tmp / name / "1"
        python.mkdir(parents=True)
        shutil.copyfile(importlib.util.find_spec(TEMPLATE_MODULE).origin, python / "model.py")
        save_hf(params, python)
        for f in tokenizer_files:
            (python / "tokenizer").mkdir(exist_ok=True)
            shutil.copyfile(f, python / "tokenizer" / f.name)
        if env_archive is not None:
            shutil.copyfile(env_archive, tmp / name / env_archive.name)
        (tmp / name / "config.pbtxt").write_text(python_config(
            name, max_batch=max_batch, context=context, precision=precision,
            env_archive=env_archive.name if env_archive is not None else None))
        notes.append(f"{name}: Python backend (graphc Decoder, decoupled), max batch {max_batch}, context {context}"
                     + (f", Python environment {env_archive.name}" if env_archive is not None else ""))

        onnx_dir = tmp / f"{name}_onnx" / "1"
        export_onnx(params, onnx_dir / "model.onnx", kv_cache=True, precision=precision)
        exported = onnx.load(onnx_dir / "model.onnx", load_external_data=False)
        (onnx_dir.parent / "config.pbtxt").write_text(step_config(f"{name}_onnx", exported, "onnxruntime_onnx"))
        notes.append(f"{name}_onnx: onnxruntime backend (KV-cache decoder-with-past)"
                     + ("; BF16: onnxruntime's CPU execution provider has no BF16 kernels for it, so give it a "
                        "GPU instance (KIND_GPU, CUDA execution provider)" if precision == "bf16" else ""))

        if plan:
            engine, why = build_plan(onnx_dir / "model.onnx", max_batch=max_batch, context=context)
            if engine is not None:
                trt_dir = tmp / f"{name}_trt" / "1"
                trt_dir.mkdir(parents=True)
                (trt_dir / "model.plan").write_bytes(engine)
                (trt_dir.parent / "config.pbtxt").write_text(step_config(f"{name}_trt", exported, "tensorrt_plan"))
            notes.append(f"{name}_trt: {why}" if engine is not None else why)
        if out.exists():
            out.rmdir()   # empty (checked above); rename() cannot replace it on every filesystem
        os.replace(tmp, out)
        return notes
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)


def _tokenizer_files(tokenizer_dir) -> list[Path]:
    """OpenAI's two GPT-2 BPE files from ``tokenizer_dir`` (or ``$GRAPHC_TOKENIZER_DIR``), checked
    by loading them; none when neither is set (the model then uses the server's tiktoken cache)."""
    from graphc.data.tokenizer import encoding_from_dir

    tokenizer_dir = tokenizer_dir or os.environ.get("GRAPHC_TOKENIZER_DIR")
    if not tokenizer_dir:
        return []
    encoding_from_dir(tokenizer_dir)
    return [Path(tokenizer_dir) / f for f in TOKENIZER_FILES]
