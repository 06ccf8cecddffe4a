"""The TensorRT backend: graphc graphs -> TensorRT engines (cached) -> runs on a GPU.

``available()`` is precise about why engines cannot run here: TensorRT missing, no GPU or
driver, or a GPU its flavour's engines refuse (TensorRT-RTX engines run on compute
capability 8.0, 8.6, 8.9 and 12.x only; the H200 is 9.0). Building needs no GPU at all
(``graphc engine``); running goes through :mod:`.runtime` (not run on this project's
machines: see its docstring).
"""

from __future__ import annotations

import functools
from typing import Mapping

import numpy as np
import onnx

from graphc.backends.base import Backend, Executable, Feed
from graphc.backends.tensorrt.flavor import Flavor, load_flavor
from graphc.ops.registry import lowering_table, register_lowering

# What TensorRT's parser does not take itself, and how legalize.py makes it parseable; the
# rest of the standard ops are the parser's own (_parser_supports).
LOWERINGS = lowering_table("tensorrt")   # graphc.ops' registry of lowerings
for _op in ("AttentionGrad", "LayerNormGrad", "GeluGrad", "CrossEntropy", "CrossEntropyGrad"):
    register_lowering("tensorrt", "graphc", _op)("inlined: TensorRT gets the function's reference body")
register_lowering("tensorrt", "", "ScatterND")("reduction=add as a one-hot GEMM (legalize.py)")


def why_cannot_run(flavor: Flavor) -> str | None:
    """None when this machine's GPU runs ``flavor``'s engines, else the reason in one line."""
    from graphc.backends.tensorrt.device import NoGpu, gpu_capability

    other = ("datacenter TensorRT (pip install tensorrt from NVIDIA's index) on a GPU of compute capability >= 7.5"
             if flavor.name == "rtx" else "a GPU of compute capability 7.5 or newer")
    try:
        cc, name = gpu_capability()
    except NoGpu as e:
        return (f"{e}; TensorRT {flavor.name} {flavor.version} builds engines here (graphc engine), "
                f"running them needs a GPU of {flavor.gpus}" + (f", or {other}" if flavor.name == "rtx" else ""))
    if not flavor.runs_on(cc):
        return (f"the GPU here ({name}) has compute capability {cc[0]}.{cc[1]}, which TensorRT {flavor.name} "
                f"{flavor.version} engines refuse (they run on {flavor.gpus}); use {other}")
    try:
        from graphc.backends.tensorrt.runtime import _cudart

        _cudart()
    except ImportError:
        return "cuda-python is not installed (pip install graphc[gpu])"
    return None


class TensorRTBackend(Backend):
    name = "tensorrt"
    device = "cuda:0"
    flavor_choice = "auto"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        from graphc.errors import GraphcError

        try:
            flavor = load_flavor(cls.flavor_choice)
        except GraphcError as e:
            return False, e.message
        why = why_cannot_run(flavor)
        return (why is None), (why or "")

    @classmethod
    def supports(cls, op_type: str, domain: str = "") -> bool:
        if (domain, op_type) in LOWERINGS:
            return True
        return domain in ("", "ai.onnx") and _parser_supports(cls.flavor_choice, op_type)

    def __init__(self, max_batch: int = 16, max_seq: int = 1024, flavor: str = "auto", cache=None):
        from graphc.backends.tensorrt.cache import EngineCache

        self.flavor = load_flavor(flavor)
        self.max_batch, self.max_seq = max_batch, max_seq
        self.cache = cache or EngineCache()

    def alloc(self, shape, dtype):
        from graphc.backends.tensorrt.runtime import CudaBuffer

        return CudaBuffer.alloc(shape, dtype)

    def upload(self, array: np.ndarray):
        from graphc.backends.tensorrt.runtime import CudaBuffer

        buf = CudaBuffer.alloc(array.shape, array.dtype)
        buf.copy_from_numpy(array)
        return buf

    def target(self) -> str:
        if self.flavor.name == "rtx":
            return "rtx-portable"
        from graphc.backends.tensorrt.device import gpu_capability

        (major, minor), _ = gpu_capability()
        return f"sm_{major}{minor}"

    def prepare(self, model: onnx.ModelProto) -> "TensorRTExecutable":
        """Build (or load from the engine cache) the engine of ``model`` and load it on the GPU."""
        from graphc.backends.tensorrt.builder import build_engine
        from graphc.backends.tensorrt.cache import EngineKey, graph_hash
        from graphc.backends.tensorrt.network import profile_shapes
        from graphc.backends.tensorrt.runtime import EngineRunner

        shapes = profile_shapes(model, self.max_batch, self.max_seq)
        precision = graph_precision(model)
        key = EngineKey(graph_hash(model), self.flavor.name, self.flavor.version, self.target(), precision,
                        shapes.key())
        plan = self.cache.load(key)
        if plan is None:
            built = build_engine(model, flavor=self.flavor, precision=precision, max_batch=self.max_batch,
                                 max_seq=self.max_seq)
            plan = built.plan
            self.cache.store(key, plan, {"layers": built.num_layers, "attention": len(built.attention_nodes),
                                         "attention_fused": len(built.fused_attention), "seconds": built.seconds})
        return TensorRTExecutable(EngineRunner(self.flavor, plan))


def graph_precision(model: onnx.ModelProto) -> str:
    """``bf16`` when the graph computes anything in bfloat16 (the BF16 pass ran), else ``fp32``."""
    bf16 = onnx.TensorProto.BFLOAT16
    g = model.graph
    values = (*g.input, *g.value_info, *g.output)
    if any(v.type.tensor_type.elem_type == bf16 for v in values):
        return "bf16"
    return "bf16" if any(n.op_type == "Cast" and any(a.name == "to" and a.i == bf16 for a in n.attribute)
                         for n in g.node) else "fp32"


class TensorRTExecutable(Executable):
    """An engine loaded on the GPU; inputs and outputs may be host arrays or device buffers."""

    def __init__(self, runner):
        self.runner = runner
        self.input_names = list(runner.input_names)
        self.output_names = list(runner.output_names)

    def bind(self, feeds: Mapping[str, Feed]) -> None:
        """Device buffers are bound as they are (borrowed); host arrays are uploaded once."""
        self.runner.upload({k: v for k, v in feeds.items() if k in self.input_names})

    def run(self, feeds: Mapping[str, Feed], outputs: Mapping[str, Feed] | None = None) -> dict[str, np.ndarray]:
        from graphc.backends.tensorrt.runtime import CudaBuffer

        outputs = dict(outputs or {})
        self.runner.bind_outputs({k: v for k, v in outputs.items() if isinstance(v, CudaBuffer)})
        self.runner.upload(feeds)
        self.runner.execute()
        results = {}
        for name in self.output_names:
            if isinstance(outputs.get(name), CudaBuffer):
                results[name] = outputs[name]
            elif name in outputs:                      # a host buffer: copy the result into it
                host = outputs[name]
                target = host.to_numpy() if hasattr(host, "to_numpy") else host
                target[...] = self.runner.buffers[name].to_numpy().reshape(target.shape)
                results[name] = host
            else:
                results[name] = self.runner.buffers[name].to_numpy()
        return results


@functools.lru_cache(maxsize=None)
def _parser_supports(flavor_choice: str, op_type: str) -> bool:
    """Whether the flavour's ONNX parser has an importer for ``op_type`` (asked once per op)."""
    trt = load_flavor(flavor_choice).trt
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    return bool(trt.OnnxParser(network, logger).supports_operator(op_type))
