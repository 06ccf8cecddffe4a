"""Export GPT-2 for deployment: self-contained ONNX models and Hugging Face weights.

graphc's own graphs keep parameters as graph *inputs* (the runtime owns the buffers);
an exported model instead carries them as initializers (:func:`bind`), so it runs
anywhere with nothing but the ``.onnx`` file:

* :func:`plain_model`: ``input_ids`` int64 [batch, seq] -> ``logits`` float32 [batch, seq, V];
* :func:`kv_cache_model`: the concat-style decoder-with-past of Hugging Face / Optimum
  exports (:func:`graphc.models.kv_cache.build_decoder_with_past`), inputs ``input_ids``,
  ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value``; outputs ``logits``
  and ``present.{i}.key|value``.

:func:`save_onnx` writes atomically, moving the weights to ``FILE.onnx.data`` beside the
model when they would pass protobuf's 2 GB limit, and checks the written file with
``onnx.checker.check_model(full_check=True)`` before it replaces anything. ``docs/export.md``
documents the IO.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from graphc import OPSET
from graphc.errors import GraphcError
from graphc.fileio import staging_dir
from graphc.models.gpt2 import build_forward
from graphc.models.hf import save_hf
from graphc.models.kv_cache import build_decoder_with_past
from graphc.models.params import Params

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
"""Initializer bytes above which weights go to ``FILE.onnx.data`` (protobuf's 2 GB limit,
less room for the graph itself)."""

MIN_OPSET, MAX_OPSET = 17, OPSET


# ----------------------------------------------------------------------------- graph edits
def bind(model: onnx.ModelProto, params: Params) -> onnx.ModelProto:
    """Turn every parameter graph input into an initializer holding its value (in place),
    in the input's dtype (float32, or bfloat16 in a BF16 graph)."""
    feeds = params.feeds()
    g = model.graph
    keep = [i for i in g.input if i.name not in feeds]
    bound = [i for i in g.input if i.name in feeds]
    del g.input[:]
    g.input.extend(keep)
    for v in bound:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        value = np.ascontiguousarray(feeds[v.name], dtype=np.float32).astype(dtype, copy=False)
        g.initializer.append(numpy_helper.from_array(value, v.name))
    return model


def _rename_value(g: onnx.GraphProto, old: str, new: str) -> None:
    for n in g.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
        for i, name in enumerate(n.output):
            if name == old:
                n.output[i] = new
    for v in [*g.input, *g.output, *g.value_info]:
        if v.name == old:
            v.name = new


def _rename_dims(values, mapping: dict[str, str]) -> None:
    for v in values:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in mapping:
                d.dim_param = mapping[d.dim_param]


def plain_model(params: Params) -> onnx.ModelProto:
    """``input_ids`` int64 [batch, seq] -> ``logits`` float32 [batch, seq, V], weights unbound."""
    model = build_forward(params.cfg, loss=False, logits=True, name="gpt2")
    g = model.graph
    _rename_value(g, "tokens", "input_ids")
    _rename_dims([*g.input, *g.output], {"B": "batch", "T": "seq"})
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)


def kv_cache_model(params: Params) -> onnx.ModelProto:
    """The decoder-with-past (see :func:`graphc.models.kv_cache.build_decoder_with_past`), weights unbound."""
    return build_decoder_with_past(params.cfg, name="gpt2_with_past")


def to_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """``model`` (weights still inputs) in ``precision``: fp32 as built; bf16 optimised by the
    inference pipeline and rewritten by the BF16 pass, weights and KV cache in bf16, logits fp32."""
    from graphc.passes.pipelines import optimize
    from graphc.precision import get_precision

    if not get_precision(precision).mixed:
        return model
    optimized, _report = optimize(model, "infer", precision=precision, emulate=False)
    return optimized


FUSION_OPSET = {"fuse_layernorm": 17, "fuse_gelu": 20, "fuse_attention": 23, "fuse_masked_attention": 23}
"""Each export fusion and the opset that made its op standard: LayerNormalization (17),
Gelu with ``approximate="tanh"`` (20), Attention (23). Below that opset the pattern stays
in primitive ops."""


def fuse_for_export(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The inference pipeline (``passes/pipelines.py``), without fusions ``opset`` cannot express.

    Consumers find the standard ops: onnxruntime's graph optimizer and its transformer
    fusions run on LayerNormalization/Gelu/Attention nodes, and TensorRT maps them to its
    own fused layers, where the primitive form would leave them nothing to recognise.
    """
    from graphc.passes.manager import PassManager
    from graphc.passes.pipelines import PIPELINES, make_passes

    infer = PIPELINES["infer"]
    at = infer.index("fuse_attention") + 1       # the KV-cache export's padding/past mask: Attention(attn_mask)
    names = [n for n in infer[:at] + ["fuse_masked_attention"] + infer[at:] if FUSION_OPSET.get(n, 0) <= opset]
    fused, _ = PassManager(make_passes(names), name=f"export (opset {opset})").run(model)
    return fused


def ir_version_for(opset: int) -> int:
    """The IR version released with ``opset`` (onnx's table): 8 for 18, 10 for 21, 12 for 24.

    Runtimes refuse IR versions newer than they know, so an ``--opset 18`` export for an
    older onnxruntime must not carry the newest IR."""
    return onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)], ignore_unknown=True)


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` at ``opset`` (graphc builds at :data:`graphc.OPSET`), or a one-line error."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise GraphcError(None, f"opset {opset} is not supported; use {MIN_OPSET + 1}..{MAX_OPSET}", "--opset")
    if opset == OPSET:
        return model
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, opset)
        onnx.checker.check_model(converted, full_check=True)
    except Exception as e:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        reason = reason.split("Assertion `false` failed: ")[-1].replace("$", "")
        raise GraphcError(None, f"cannot express graphc's opset-{OPSET} graph at opset {opset} ({reason}); "
                          f"{_lowest_opset_hint(model, opset)}", "--opset") from None
    return converted


def _lowest_opset_hint(model: onnx.ModelProto, opset: int) -> str:
    """The ops that keep ``model`` above ``opset``, each with the opset it appeared in (a BF16
    export keeps ONNX ``Attention``, which exists from opset 23)."""
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    ops |= {n.op_type for f in model.functions for n in f.node if n.domain in ("", "ai.onnx")}

    def first_opset(op: str) -> int:
        for version in range(1, OPSET + 1):
            try:
                onnx.defs.get_schema(op, version, "")
                return version
            except onnx.defs.SchemaError:
                continue
        return OPSET

    since = {op: first_opset(op) for op in sorted(ops)}
    blocking = {op: v for op, v in since.items() if v > opset}
    if not blocking:
        return f"use --opset {OPSET}"
    lowest = max(blocking.values())
    return (", ".join(f"{op} exists from opset {v}" for op, v in blocking.items())
            + f": use --opset {lowest} or newer")


# ----------------------------------------------------------------------------- files
def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        total += len(t.raw_data) if t.raw_data else int(np.prod(t.dims)) * np.dtype(
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, *,
              external_threshold: int = EXTERNAL_DATA_THRESHOLD, check: bool = True) -> list[Path]:
    """Write ``model`` to ``path`` atomically; returns the files written.

    When its initializers exceed ``external_threshold`` bytes they go to ``<name>.data``
    beside the model (``onnx.save_model(save_as_external_data=True)``; this moves the
    tensors out of ``model``). With ``check`` the written file must pass
    ``onnx.checker.check_model(full_check=True)`` before it replaces an existing one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = initializer_bytes(model) > external_threshold
    data_name = path.name + ".data"
    tmpdir = staging_dir(path.parent, path.name)
    try:
        tmp_model = tmpdir / path.name
        if external:
            onnx.save_model(model, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024, convert_attribute=False)
        else:
            onnx.save_model(model, tmp_model)
        if check:
            try:
                onnx.checker.check_model(str(tmp_model), full_check=True)
            except Exception as e:  # noqa: BLE001 - surfaces as a bug report, not a user error
                raise RuntimeError(f"exported model fails onnx.checker: {e}") from e
        written = []
        if external:
            _fsync(tmpdir / data_name)
            os.replace(tmpdir / data_name, path.parent / data_name)
            written.append(path.parent / data_name)
        _fsync(tmp_model)
        os.replace(tmp_model, path)
        written.insert(0, path)
        return written
    except OSError as e:  # a full disk: name the output (the previous one is untouched)
        if e.filename is None or str(tmpdir) in str(e.filename):
            e.filename = os.fspath(path)
        raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmpdir)


def export_onnx(params: Params, out: str | os.PathLike, *, kv_cache: bool = False, opset: int = OPSET,
                primitive_ops: bool = False, external_threshold: int = EXTERNAL_DATA_THRESHOLD,
                precision: str = "fp32") -> list[Path]:
    """Build, fuse (unless ``primitive_ops``), set the precision, convert to ``opset``, bind
    the weights and save: the whole ``graphc export``."""
    from graphc import __version__

    out = Path(out)
    if out.is_dir():
        raise GraphcError(out, "is a directory; --out needs a file name such as model.onnx", "--out")
    if not MIN_OPSET < opset <= MAX_OPSET:
        raise GraphcError(None, f"opset {opset} is not supported; use {MIN_OPSET + 1}..{MAX_OPSET}", "--opset")
    model = kv_cache_model(params) if kv_cache else plain_model(params)
    if precision != "fp32":
        model = to_precision(model, precision)   # the inference pipeline (fused) + the BF16 pass
    elif not primitive_ops:
        model = fuse_for_export(model, opset)
    model = convert_opset(model, opset)  # before binding: the converter serialises the whole model
    model = bind(model, params)
    model.ir_version = ir_version_for(opset)
    model.producer_name = "graphc"
    model.producer_version = __version__
    model.doc_string = (f"GPT-2 ({params.cfg.describe()}) exported by graphc"
                        + (", decoder with past (KV cache)" if kv_cache else "")
                        + (f", {precision} mixed precision" if precision != "fp32" else ""))
    return save_onnx(model, out, external_threshold=external_threshold)


def genai_config(cfg, filename: str) -> dict:
    """onnxruntime-genai's ``genai_config.json`` for the KV-cache export in ``filename``.

    ``"type": "decoder"`` is genai's generic decoder-only model: it feeds ``input_ids``,
    ``attention_mask``, ``position_ids`` and the ``past_key_values.%d.key|value`` graphc's
    decoder-with-past takes, and reads back ``logits`` and ``present.%d.key|value``.
    """
    eot = cfg.vocab_size - 1 if cfg.vocab_size == 50257 else 0   # GPT-2's <|endoftext|>
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
            "context_length": cfg.max_seq_len,
            "vocab_size": cfg.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.n_embd,
                "num_attention_heads": cfg.n_head,
                "num_key_value_heads": cfg.n_head,
                "num_hidden_layers": cfg.n_layer,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits",
                            "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": cfg.max_seq_len, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0, "min_length": 0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def write_genai_config(cfg, model_path: str | os.PathLike) -> Path:
    """``genai_config.json`` beside ``model_path`` (written atomically)."""
    import json

    from graphc.fileio import atomic_write

    model_path = Path(model_path)
    path = model_path.parent / "genai_config.json"
    with atomic_write(path, "w") as f:
        json.dump(genai_config(cfg, model_path.name), f, indent=2)
    return path


def export_weights(params: Params, folder: str | os.PathLike) -> list[Path]:
    """Hugging Face layout: ``model.safetensors`` + ``config.json`` in ``folder``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GraphcError(folder, "exists and is not a directory", "--weights-only")
    save_hf(params, folder)
    return [folder / "model.safetensors", folder / "config.json"]
