"""The backend seam: buffers, programs that own their state, slots, shards, legalisation."""

from __future__ import annotations

import numpy as np
import pytest

from graphc.backends import get_backend
from graphc.backends.buffer import HostBuffer
from graphc.errors import GraphcError
from graphc.models.config import named_config
from graphc.models.init import random_init
from graphc.models.params import num_parameters
from graphc.runtime.decode import DecodeSpec
from graphc.runtime.optimizer import AdamW, AdamWConfig
from graphc.runtime.programs import TrainSpec, grad_buckets
from graphc.runtime.sampling import Sampler
from helpers import decode_alone, decode_submitted_while_running

CFG = named_config("L2H2C64")


def test_host_buffer_views_share_memory():
    buf = HostBuffer.empty((4, 6), np.float32)
    v = buf.view(6, (2, 3))
    v.copy_from_numpy(np.arange(6, dtype=np.float64))
    assert buf.to_numpy()[1].tolist() == [0, 1, 2, 3, 4, 5]
    assert v.ptr == buf.ptr + 6 * 4 and v.nbytes == 24 and v.device == "cpu"
    assert np.from_dlpack(buf).shape == (4, 6)
    with pytest.raises(ValueError):
        v.copy_from_numpy(np.zeros(5))


def test_grad_buckets_cover_every_parameter_once_in_backward_order():
    buckets = grad_buckets(CFG)
    seen = np.zeros(num_parameters(CFG), dtype=np.int64)
    for b in buckets:
        for off, size in b.ranges:
            seen[off:off + size] += 1
    assert (seen == 1).all()
    assert [b.names[0] for b in buckets] == ["lnf.w", "h1.ln1.w", "h0.ln1.w", "wte"]


def test_train_step_calls_grad_hooks_with_final_gradients():
    backend = get_backend("onnxruntime")()
    params = backend.upload_params(random_init(CFG, 0))
    step = backend.train_step(params, TrainSpec(B=2, T=8, adamw=AdamWConfig(lr=0.0)))
    got = []

    def hook(bucket):
        got.append((bucket.index, sum(float(np.abs(step.grads.to_numpy()[o:o + n]).sum()) for o, n in bucket.ranges)))

    step.grad_hooks.append(hook)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (2, 8))
    before = step.read_params()
    result = step.run(tokens, np.roll(tokens, -1, 1), t=1, lr=0.0)
    assert [i for i, _ in got] == list(range(len(grad_buckets(CFG))))
    assert all(total > 0 for _, total in got)          # every bucket saw its (non-zero) gradients
    assert np.isfinite(result.loss) and result.grad_norm is None
    assert np.array_equal(before, step.read_params())  # lr 0: nothing moved


def test_sharded_adamw_equals_the_whole_update():
    rng = np.random.default_rng(1)
    n = 1000
    p0, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    cfg = AdamWConfig(lr=1e-2, weight_decay=0.1)
    whole = p0.copy()
    AdamW(n, cfg).step(whole, g.copy(), 1, 1e-2)
    halves = p0.copy()
    for shard in ((0, 437), (437, n)):
        AdamW(n, cfg, shard=shard).step(halves, g.copy(), 1, 1e-2)
    assert np.array_equal(whole, halves)


def _decoder(slots=4, capacity=24):
    backend = get_backend("onnxruntime")()
    return backend.decoder(backend.upload_params(random_init(CFG, 3)), DecodeSpec(slots, capacity))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decoder_slots_are_batch_invariant_and_reusable(temperature):
    prompts = [[5, 6, 7], [100, 200], [9] * 7, [42]]
    alone = [decode_alone(_decoder, p, 6, Sampler(temperature=temperature, seed=i)) for i, p in enumerate(prompts)]
    dec = _decoder()
    outs = {}
    slot0, t = dec.add(prompts[0], Sampler(temperature=temperature, seed=0))
    outs[slot0] = [t.token]
    slot1, t = dec.add(prompts[1], Sampler(temperature=temperature, seed=1))
    outs[slot1] = [t.token]
    for _ in range(2):                                   # two steps with two live sequences
        for s, tok in dec.step().items():
            outs[s].append(tok.token)
    dec.remove(slot0)                                    # slot 0 is freed and reused
    slot2, t = dec.add(prompts[2], Sampler(temperature=temperature, seed=2))
    assert slot2 == slot0 and dec.live == [slot0, slot1]
    done = {0: outs.pop(slot0)}
    outs[slot2] = [t.token]
    while any(len(v) < 6 for v in outs.values()):
        for s, tok in dec.step().items():
            outs[s].append(tok.token)
    assert done[0] == alone[0][:3]
    assert outs[slot1][:6] == alone[1]
    assert outs[slot2][:6] == alone[2]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_submitted_prompts_join_a_running_batch(temperature):
    """``submit`` (what the server uses): the first token comes out of a later step; every
    sequence gets exactly its tokens alone, and the running one is not disturbed."""
    prompts = [[5, 6, 7], [9] * 7, [42], [100, 200]]
    sampler = lambda i: Sampler(temperature=temperature, seed=i)  # noqa: E731
    alone = [decode_alone(_decoder, p, 6, sampler(i)) for i, p in enumerate(prompts)]
    assert decode_submitted_while_running(_decoder(), prompts, 6, sampler) == alone


def test_decoder_refuses_what_does_not_fit():
    dec = _decoder(slots=1, capacity=8)
    with pytest.raises(GraphcError, match="does not fit"):
        dec.add(list(range(8)), Sampler(temperature=0))
    dec.add([1, 2], Sampler(temperature=0))
    with pytest.raises(GraphcError, match="slots are busy"):
        dec.add([3], Sampler(temperature=0))


def test_legalize_names_the_node_a_backend_cannot_run():
    import onnx

    from graphc.backends.onnxruntime import OnnxRuntimeBackend
    from graphc.passes.pipelines import legalize

    node = onnx.helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery", domain="example")
    graph = onnx.helper.make_graph([node], "g", [], [])
    assert not OnnxRuntimeBackend.supports("NoSuchOp", "example")
    with pytest.raises(GraphcError, match=r"onnxruntime: --backend: cannot run op example.NoSuchOp \(node 'mystery'\)"):
        legalize(onnx.helper.make_model(graph), "onnxruntime")


def test_decoder_logprobs_match_prompt_scoring():
    """The logprob reported with a generated token equals scoring prompt + that token."""
    dec = _decoder()
    prompt = [3, 14, 15, 92]
    slot, first = dec.add(prompt, Sampler(temperature=0), logprobs=3)
    second = dec.step()[slot]
    scored = dec.score(prompt + [first.token, second.token], logprobs=3)
    assert scored[0] is None and [s.token for s in scored[1:]] == prompt[1:] + [first.token, second.token]
    for got, ref in ((first, scored[4]), (second, scored[5])):
        assert abs(got.logprob - ref.logprob) < 1e-4
        assert got.top[0][0] == got.token                 # greedy picked the most likely
        assert [t for t, _ in got.top] == [t for t, _ in ref.top]
    assert all(a[1] >= b[1] for a, b in zip(first.top, first.top[1:]))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_sequence_gets_the_same_logprobs_bit_for_bit_alone_and_in_a_batch(precision):
    """Not only the tokens: the log-probabilities too, to the last bit (onnxruntime's CPU GEMM
    takes another path for a single row; with bf16 rounding between layers a last-bit
    difference grows until seeded sampling picks another token)."""
    params = random_init(named_config("L2H4C64"), seed=3)
    backend = get_backend("onnxruntime")()
    device = backend.upload_params(params)

    def decode(others: int) -> list[tuple[int, float]]:
        dec = backend.decoder(device, DecodeSpec(8, 32, precision, True))
        for i in range(others):
            dec.add([11 + i, 12 + i], Sampler(temperature=1.0, seed=100 + i), logprobs=0)
        slot, first = dec.add([464, 3290, 318], Sampler(temperature=1.0, seed=7), logprobs=0)
        out = [(first.token, first.logprob)]
        while len(out) < 6:
            s = dec.step()[slot]
            out.append((s.token, s.logprob))
        return out

    alone = decode(0)
    assert decode(1) == alone and decode(4) == alone
