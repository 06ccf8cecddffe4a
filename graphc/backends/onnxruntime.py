"""onnxruntime on the CPU: graphc's reference executor.

Every graph any pass emits must run here; tests compare every other backend with it.
Parameters are bound once as OrtValues that *share memory* with graphc's flat parameter
buffer (``OrtValue.ortvalue_from_numpy`` on the CPU does not copy), and outputs can be
bound to preallocated numpy arrays (the training runner binds gradients straight into its
flat gradient buffer), so no weight or gradient is copied per call.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from graphc.backends.base import Backend, Executable, Feed
from graphc.backends.buffer import host_array


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    n = threads or int(os.environ.get("GRAPHC_THREADS", "0")) or None
    if n:
        so.intra_op_num_threads = n
    return so


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    @classmethod
    def supports(cls, op_type: str, domain: str = "") -> bool:
        try:
            onnx.defs.get_schema(op_type, max_inclusive_version=24, domain=domain)
            return True
        except onnx.defs.SchemaError:
            return domain == "graphc"  # local functions: onnxruntime inlines their bodies

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def prepare(self, model: onnx.ModelProto | str) -> "OrtExecutable":
        data = model if isinstance(model, str) else model.SerializeToString()
        sess = ort.InferenceSession(data, session_options(self.threads), providers=["CPUExecutionProvider"])
        return OrtExecutable(sess)


class OrtExecutable(Executable):
    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._bound: dict[str, ort.OrtValue] = {}
        self._keepalive: dict[str, np.ndarray] = {}

    def bind(self, feeds: Mapping[str, Feed]) -> None:
        for name, value in feeds.items():
            if name not in self.input_names:
                continue
            arr = host_array(value)
            if not (arr.flags.c_contiguous and arr.flags.writeable):
                arr = np.ascontiguousarray(arr)
            self._keepalive[name] = arr  # the OrtValue borrows this memory
            self._bound[name] = ort.OrtValue.ortvalue_from_numpy(arr)

    def run(self, feeds: Mapping[str, Feed], outputs: Mapping[str, Feed] | None = None,
            ) -> dict[str, np.ndarray]:
        io = self.session.io_binding()
        for name, value in self._bound.items():
            if name not in feeds:
                io.bind_ortvalue_input(name, value)
        for name, value in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(host_array(value)))
        outputs = {name: host_array(value) for name, value in (outputs or {}).items()}
        for name in self.output_names:
            if name in outputs:
                arr = outputs[name]
                assert arr.flags.c_contiguous, f"output buffer {name} must be contiguous"
                io.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            else:
                io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        results = {}
        for name, value in zip(self.output_names, io.get_outputs()):
            results[name] = outputs[name] if name in outputs else value.numpy()
        return results
