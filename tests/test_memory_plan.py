"""Memory planning on hand-made graphs with known answers, and on GPT-2."""

import pytest
from onnx import TensorProto, helper

from graphc.models.config import GPT2Config, named_config
from graphc.models.gpt2 import build_forward
from graphc.passes.memory_plan import plan, plan_model, value_sizes

F = TensorProto.FLOAT
MB = 1 << 20


def graph(nodes, inputs=("x",), outputs=("out",)):
    return helper.make_graph(
        [helper.make_node(op, ins, outs) for op, ins, outs in nodes], "g",
        [helper.make_tensor_value_info(i, F, [4]) for i in inputs],
        [helper.make_tensor_value_info(o, F, [4]) for o in outputs])


def sizes_for(g, size=MB):
    names = {v for n in g.node for v in [*n.input, *n.output]} | {v.name for v in g.input}
    return {v: size for v in names}


def no_overlap(p):
    """Buffers live at the same time never share arena bytes."""
    bufs = list(p.offsets)
    for i, a in enumerate(bufs):
        for b in bufs[i + 1:]:
            (a0, a1), (b0, b1) = p.buffer_intervals[a], p.buffer_intervals[b]
            if a0 <= b1 and b0 <= a1:
                oa, ob = p.offsets[a], p.offsets[b]
                assert oa + p.buffer_sizes[a] <= ob or ob + p.buffer_sizes[b] <= oa, (a, b)


CHAIN = [("MatMul", ["x", "x"], ["a"]), ("MatMul", ["a", "a"], ["b"]),
         ("MatMul", ["b", "b"], ["c"]), ("MatMul", ["c", "c"], ["out"])]


def test_chain_needs_two_buffers():
    g = graph(CHAIN)
    p = plan(g, None, sizes_for(g))
    assert p.intervals == {"a": (0, 1), "b": (1, 2), "c": (2, 3)}
    assert p.peak_bytes == 2 * MB and p.naive_bytes == 3 * MB
    assert len(set(p.offset(v) for v in "abc")) == 2
    assert p.offset("a") == p.offset("c")          # a is dead when c is written
    assert p.output_bytes == MB and p.input_bytes == MB   # outside the arena
    no_overlap(p)


def test_elementwise_chain_runs_in_place():
    g = graph([("Relu", ["x"], ["a"]), ("Tanh", ["a"], ["b"]), ("Exp", ["b"], ["c"]), ("MatMul", ["c", "c"], ["out"])])
    p = plan(g, None, sizes_for(g))
    assert p.peak_bytes == MB and p.num_buffers == 1
    assert [(op, o, i) for _, op, o, i in p.inplace] == [("Tanh", "b", "a"), ("Exp", "c", "b")]
    assert plan(g, None, sizes_for(g), inplace=False).peak_bytes == 2 * MB


def test_values_feeding_an_output_in_place_live_in_the_output_buffer():
    # ... -> c -> Neg -> out: c (and, through the chain, a and b) are computed in out's buffer
    g = graph([("Relu", ["x"], ["a"]), ("Tanh", ["a"], ["b"]), ("Exp", ["b"], ["c"]), ("Neg", ["c"], ["out"])])
    p = plan(g, None, sizes_for(g))
    assert p.peak_bytes == 0 and p.naive_bytes == 3 * MB
    assert {(o, i) for _, _, o, i in p.views} == {("out", "c"), ("c", "b"), ("b", "a")}


DIAMOND = [("MatMul", ["x", "x"], ["a"]), ("MatMul", ["a", "a"], ["b"]), ("Relu", ["a"], ["c"]),
           ("Add", ["b", "c"], ["d"]), ("MatMul", ["d", "d"], ["out"])]


def test_diamond():
    g = graph(DIAMOND)
    p = plan(g, None, sizes_for(g), inplace=False)
    # step 2 writes c while a and b are live; step 3 writes d while b and c are live
    assert p.peak_bytes == 3 * MB and p.naive_bytes == 4 * MB
    no_overlap(p)
    q = plan(g, None, sizes_for(g))
    # c = Relu(a) overwrites a (a's last reader); d = Add(b, c) overwrites b
    assert {(o, i) for _, _, o, i in q.inplace} == {("c", "a"), ("d", "b")}
    assert q.peak_bytes == 2 * MB
    no_overlap(q)


def test_residual_add_in_place_only_when_input_dies():
    # x1 = x0 + f(x0); x0 is needed later in the second graph (kept for a backward)
    nodes = [("Relu", ["x"], ["x0"]), ("MatMul", ["x0", "x0"], ["f"]), ("Add", ["x0", "f"], ["x1"]),
             ("MatMul", ["x1", "x1"], ["out"])]
    p = plan(graph(nodes), None, sizes_for(graph(nodes)))
    assert ("x1", "x0") in {(o, i) for _, op, o, i in p.inplace if op == "Add"}
    kept = nodes[:3] + [("MatMul", ["x1", "x0"], ["out"])]
    q = plan(graph(kept), None, sizes_for(graph(kept)))
    assert ("x1", "x0") not in {(o, i) for _, _, o, i in q.inplace}
    assert ("x1", "f") in {(o, i) for _, _, o, i in q.inplace}     # f dies at the Add instead


def test_parameter_update_in_place_is_external():
    g = helper.make_graph(
        [helper.make_node("Mul", ["m", "lr"], ["step"]), helper.make_node("Sub", ["p", "step"], ["p_new"])], "g",
        [helper.make_tensor_value_info(n, F, [4]) for n in ("p", "m", "lr")],
        [helper.make_tensor_value_info("p_new", F, [4])])
    p = plan(g, None, sizes_for(g))
    assert [(o, i) for _, _, o, i in p.external_inplace] == [("p_new", "p")]
    assert p.peak_bytes == MB                      # only `step` is in the arena (p_new is p's buffer)


def test_views_share_the_buffer_and_keep_it_alive():
    g = graph([("MatMul", ["x", "x"], ["a"]), ("Reshape", ["a", "s"], ["r"]), ("MatMul", ["r", "r"], ["b"]),
               ("Add", ["a", "b"], ["c"]), ("MatMul", ["c", "a"], ["out"])], inputs=("x", "s"))
    sz = sizes_for(g)
    sz["s"] = 8
    p = plan(g, None, sz)
    assert p.buffer_of["r"] == p.buffer_of["a"]
    assert p.buffer_intervals[p.buffer_of["a"]] == (0, 4)
    assert ("c", "b") in {(o, i) for _, _, o, i in p.inplace}
    assert p.peak_bytes == 2 * MB
    no_overlap(p)


def test_best_fit_reuses_the_smallest_gap():
    # a (4 MB) and b (1 MB) die early; c (1 MB) should go into b's hole, not a's
    nodes = [("MatMul", ["x", "x"], ["a"]), ("MatMul", ["x", "x"], ["b"]), ("MatMul", ["x", "x"], ["keep"]),
             ("Add", ["a", "b"], ["s"]), ("MatMul", ["keep", "s"], ["c"]), ("Add", ["c", "keep"], ["out"])]
    g = graph(nodes)
    sz = {v: MB for v in ["x", "b", "keep", "s", "c", "out"]}
    sz["a"] = 4 * MB
    p = plan(g, None, sz, inplace=False)
    no_overlap(p)
    assert p.peak_bytes <= 7 * MB


def test_tail_pad_and_scatter_write_into_the_output():
    # the tied-embedding gradient: dW_real = Gemm -> Pad rows to Vp -> ScatterND -> grad
    b_nodes = [helper.make_node("MatMul", ["x", "x"], ["dw"]),
               helper.make_node("Pad", ["dw", "pads"], ["padded"]),
               helper.make_node("ScatterND", ["padded", "idx", "upd"], ["grad"])]
    g = helper.make_graph(b_nodes, "g", [helper.make_tensor_value_info(n, F, [4]) for n in ("x", "idx", "upd")],
                          [helper.make_tensor_value_info("grad", F, [4])],
                          [helper.make_tensor("pads", TensorProto.INT64, [4], [0, 0, 2, 0])])
    sz = {"x": MB, "idx": 8, "upd": MB, "dw": 3 * MB, "padded": 4 * MB, "grad": 4 * MB, "pads": 32}
    p = plan(g, None, sz)
    assert p.peak_bytes == 0 and p.naive_bytes == 7 * MB
    assert {(o, i) for _, _, o, i in p.views} == {("grad", "padded"), ("padded", "dw")}


def test_order_must_be_topological():
    g = graph(CHAIN)
    with pytest.raises(ValueError, match="topological"):
        plan(g, [1, 0, 2, 3], sizes_for(g))


def test_alignment():
    g = graph(CHAIN)
    sz = sizes_for(g, 1000)
    p = plan(g, None, sz, alignment=256)
    assert all(o % 256 == 0 for o in p.offsets.values())
    assert p.peak_bytes == 2 * 1024


def test_value_sizes_resolve_symbolic_dims():
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, max_seq_len=64)
    m = build_forward(cfg, loss=True, logits=True)
    sizes = value_sizes(m, {"B": 3, "T": 10})
    assert sizes["logits"] == 3 * 10 * cfg.vocab_size * 4
    assert sizes["tokens"] == 3 * 10 * 8
    p = plan_model(m, {"B": 3, "T": 10})
    assert 0 < p.peak_bytes < p.naive_bytes
    no_overlap(p)


def test_forward_d12_peak_far_below_naive():
    m = build_forward(named_config("d12"), loss=True, logits=False)
    p = plan_model(m, {"B": 4, "T": 64})
    # a forward pass needs only a couple of layers' activations at a time; the peak is the
    # LM head: padded logits [B*T, Vp] and their column slice [B*T, V] (2 x 51 MB)
    assert p.peak_bytes < p.naive_bytes / 5
    assert p.peak_bytes <= 2 * 4 * 64 * 50304 * 4 + (1 << 20)
