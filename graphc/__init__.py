"""graphc: a dataflow graph compiler for transformer training and inference.

GPT-2 is built as an ONNX graph (``graphc.models``), differentiated and optimised by
graph-to-graph passes (``graphc.passes``), and executed by backends (``graphc.backends``)
under a small runtime (``graphc.runtime``).
"""

__version__ = "0.1.0"

OPSET = 24
"""The ONNX opset of every graph graphc builds.

24 is the newest opset TensorRT 10.15's parser accepts (9 to 24) and it has everything a
transformer wants as standard ops: LayerNormalization (17), Gelu with tanh (20),
Attention (23) and TensorScatter (24) for an in-place KV cache. onnxruntime loads it from
1.24 and runs TensorScatter from 1.25 (``graphc/versions.py`` checks this at start).
"""
