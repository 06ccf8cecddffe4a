"""GPT-2 XL size (d48, 1.56B parameters, 6.2 GB in fp32) must work: protobuf caps a serialised
ModelProto at 2 GB, so graphc keeps weights out of its graphs (they are graph inputs) and
exports them as external data."""

import numpy as np
import onnx
import pytest

from graphc.models.config import named_config
from graphc.models.gpt2 import build_forward
from graphc.models.params import num_parameters


def test_d48_graphs_are_small_and_valid():
    cfg = named_config("d48")
    assert num_parameters(cfg) * 4 > 6e9
    fwd = build_forward(cfg)
    assert fwd.ByteSize() < 2_000_000
    onnx.checker.check_model(fwd, full_check=True)
    from graphc.runtime.programs import training_graph

    train = training_graph(cfg, opt=True)
    assert train.ByteSize() < 5_000_000
    onnx.checker.check_model(train)
    assert sum(o.name.startswith("grad.") for o in train.graph.output) == len(
        [i for i in fwd.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT])


@pytest.mark.slow
def test_d48_export_uses_external_data(tmp_path):
    """A real 6.2 GB export (slow: writes the weights to disk)."""
    from graphc.models.export import export_onnx
    from graphc.models.params import Params

    cfg = named_config("d48")
    params = Params(cfg, np.full(num_parameters(cfg), 0.01, np.float32))
    out = tmp_path / "xl.onnx"
    export_onnx(params, out)
    assert out.stat().st_size < 50_000_000
    data = tmp_path / "xl.onnx.data"
    assert data.exists() and data.stat().st_size >= num_parameters(cfg) * 4 - cfg.n_embd * 100
    onnx.checker.check_model(str(out), full_check=True)
