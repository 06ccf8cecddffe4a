"""The graphs graphc builds are identical, node for node, to those of a recorded commit.

Refactors of the shape engine, the VJP registry and the fused-op definitions must not
change a single node. ``tests/data/graph_fingerprints.json`` holds, for each graph below,
the SHA-256 of a canonical listing of the model (every node's name, domain, op type,
inputs, outputs and attributes, the graph's inputs / outputs / value_info, and every local
function) and its node count, written at the base commit of the refactor (9712937) by

    python tests/test_graph_unchanged.py --write

and the peak / naive bytes of the d12 training memory plan (B=4, T=64). A difference is a behaviour
change: either a bug, or a deliberate change that re-records the fixture in its own commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import onnx
import pytest

FIXTURE = Path(__file__).parent / "data" / "graph_fingerprints.json"


def _small():
    from graphc.models.config import GPT2Config

    return GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def _d12():
    from graphc.models.config import named_config

    return named_config("d12")


def _train(cfg_fn, opt):
    def build():
        from graphc.runtime.programs import training_graph

        return training_graph(cfg_fn(), opt=opt)

    return build


def _infer(cfg_fn):
    def build():
        from graphc.models.gpt2 import build_forward
        from graphc.passes.pipelines import optimize

        return optimize(build_forward(cfg_fn(), loss=True, logits=True), "infer")[0]

    return build


def _decode(cfg_fn):
    def build():
        from graphc.models.kv_cache import build_decode
        from graphc.passes.pipelines import optimize

        return optimize(build_decode(cfg_fn()), "infer")[0]

    return build


def _retrain(cfg_fn):
    """An already differentiated graph through the train_graph pipeline (fuse_backward)."""
    def build():
        from graphc.models.gpt2 import build_forward
        from graphc.passes.autodiff import differentiate
        from graphc.passes.pipelines import float_inputs, optimize

        fwd = build_forward(cfg_fn(), loss=True, logits=False)
        return optimize(differentiate(fwd, "loss", float_inputs(fwd)), "train")[0]

    return build


GRAPHS = {
    "small_train_opt": _train(_small, True),
    "small_train_noopt": _train(_small, False),
    "small_infer_opt": _infer(_small),
    "small_decode_opt": _decode(_small),
    "small_train_graph_opt": _retrain(_small),
    "d12_train_opt": _train(_d12, True),       # building and optimising d12 takes < 1 s
    "d12_train_noopt": _train(_d12, False),
}


def listing(model: onnx.ModelProto) -> str:
    """A canonical text of everything that defines the computation (names included)."""

    def attrs(n) -> str:
        return ",".join(hashlib.sha1(a.SerializeToString(deterministic=True)).hexdigest()[:12]
                        for a in sorted(n.attribute, key=lambda a: a.name))

    def vi(v) -> str:
        return hashlib.sha1(v.SerializeToString(deterministic=True)).hexdigest()[:12]

    g = model.graph
    lines = [f"opset {sorted((o.domain, o.version) for o in model.opset_import)}"]
    lines += [f"input {v.name} {vi(v)}" for v in g.input]
    lines += [f"init {t.name} {hashlib.sha1(t.SerializeToString(deterministic=True)).hexdigest()[:12]}"
              for t in g.initializer]
    lines += [f"node {n.name} {n.domain}.{n.op_type} {list(n.input)} -> {list(n.output)} [{attrs(n)}]"
              for n in g.node]
    lines += [f"output {v.name} {vi(v)}" for v in g.output]
    lines += [f"value_info {v.name} {vi(v)}" for v in g.value_info]
    lines += [f"function {f.domain}.{f.name} "
              f"{hashlib.sha1(f.SerializeToString(deterministic=True)).hexdigest()[:12]}" for f in model.functions]
    return "\n".join(lines)


def fingerprint(model: onnx.ModelProto) -> dict:
    return {"nodes": len(model.graph.node), "sha256": hashlib.sha256(listing(model).encode()).hexdigest()}


def d12_memory() -> dict:
    from graphc.passes.memory_plan import plan_model

    plan = plan_model(_train(_d12, True)(), {"B": 4, "T": 64})
    return {"peak_bytes": plan.peak_bytes, "naive_bytes": plan.naive_bytes}


def _recorded() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_identical_to_recorded(name):
    assert fingerprint(GRAPHS[name]()) == _recorded()[name]


def test_d12_memory_plan_identical_to_recorded():
    assert d12_memory() == _recorded()["d12_memory"]


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    out = {name: fingerprint(build()) for name, build in GRAPHS.items()}
    out["d12_memory"] = d12_memory()
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
