"""KV-cache graphs and generation: prefill/decode agree with the full forward graph, greedy
generation with the cache equals recomputation and Hugging Face transformers' GPT-2."""

import numpy as np
import onnx
import pytest
import torch

from graphc.backends.onnxruntime import OnnxRuntimeBackend
from graphc.errors import GraphcError
from graphc.models.config import GPT2Config, named_config
from graphc.models.gpt2 import build_forward
from graphc.models.hf import hf_tensors
from graphc.models.init import random_init
from graphc.models.kv_cache import build_decode, build_prefill, cache_shape, past_name, present_name
from graphc.runtime.generate import Generator, generate
from graphc.runtime.sampling import Sampler
from helpers import rel_err

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=64)
PROMPTS = [[464, 3290, 318], [40, 1101, 257, 1310, 286, 3290, 11, 290, 314], [50256]]


def varied_params(cfg, seed=0):
    """Random init scaled up so that greedy decoding depends on the context (GPT-2's tiny
    init makes an untrained model repeat one token), with non-trivial biases and LN params."""
    params = random_init(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    for t in ["wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"]:
        params.tensor(t)[...] *= 10
    for t in ["ln1w", "ln1b", "qkvb", "attprojb", "ln2w", "ln2b", "fcb", "fcprojb"]:
        params.tensor(t)[...] += rng.standard_normal(params.tensor(t).shape).astype(np.float32) * 0.1
    return params


@pytest.fixture(scope="module")
def params():
    return varied_params(SMALL)


def prepared(model, params):
    p = OnnxRuntimeBackend().prepare(model)
    p.bind(params.feeds())
    return p


def fresh_caches(cfg, B, capacity, garbage=False):
    """Caches for the in-place graphs; ``garbage`` fills them with finite junk that the
    position mask must hide (the runtime starts from zeros)."""
    rng = np.random.default_rng(9)
    caches = {past_name(l, k): (rng.standard_normal(cache_shape(cfg, B, capacity)).astype(np.float32) * 100
                                if garbage else np.zeros(cache_shape(cfg, B, capacity), np.float32))
              for l in range(cfg.n_layer) for k in ("key", "value")}
    in_place = {present_name(l, k): caches[past_name(l, k)] for l in range(cfg.n_layer) for k in ("key", "value")}
    return caches, in_place


@pytest.fixture(scope="module")
def reference(params):
    """Full-forward logits [B, 24, V] of random token rows."""
    tokens = np.random.default_rng(5).integers(0, SMALL.vocab_size, (3, 24))
    return tokens, prepared(build_forward(SMALL, loss=False), params).run({"tokens": tokens})["logits"]


def test_graphs_are_valid_onnx():
    for model in (build_prefill(SMALL), build_prefill(SMALL, all_logits=True), build_decode(SMALL)):
        onnx.checker.check_model(model, full_check=True)
        names = [i.name for i in model.graph.input]
        assert past_name(0, "key") in names and "present.1.value" in [o.name for o in model.graph.output]


def test_prefill_matches_forward_with_ragged_prompts(params, reference):
    tokens, full = reference
    lengths = np.array([10, 4, 7])
    padded = tokens[:, :10].copy()
    for b, n in enumerate(lengths):
        padded[b, n:] = 0                                         # right padding is ignored
    caches, in_place = fresh_caches(SMALL, 3, 16, garbage=True)   # stale contents never matter
    out = prepared(build_prefill(SMALL), params).run({"tokens": padded, "lengths": lengths, **caches},
                                                      outputs=in_place)
    assert out["logits"].shape == (3, SMALL.vocab_size)
    for b, n in enumerate(lengths):
        assert rel_err(out["logits"][b], full[b, n - 1]) <= 1e-5
    out_all = prepared(build_prefill(SMALL, all_logits=True), params).run({"tokens": tokens[:, :10], **caches},
                                                                          outputs=in_place)
    assert rel_err(out_all["logits"], full[:, :10]) <= 1e-5


def test_decode_continues_positions_and_masks_by_position(params, reference):
    tokens, full = reference
    lengths = np.array([5, 9, 1])
    caches, in_place = fresh_caches(SMALL, 3, 24, garbage=True)
    padded = tokens[:, :9].copy()
    prefill = prepared(build_prefill(SMALL), params)
    prefill.run({"tokens": padded, "lengths": lengths, **caches}, outputs=in_place)
    decode = prepared(build_decode(SMALL), params)
    past = lengths.copy()
    for _ in range(12):
        new = tokens[np.arange(3), past][:, None]
        logits = decode.run({"tokens": new, "past_len": past, **caches}, outputs=in_place)["logits"]
        assert logits.shape == (3, 1, SMALL.vocab_size)
        for b in range(3):
            assert rel_err(logits[b, 0], full[b, past[b]]) <= 1e-5
        past += 1
    # several new tokens at once (chunked prefill / speculative style) from a shared past
    logits = decode.run({"tokens": tokens[:, 13:17], "past_len": np.array([13, 13, 13]), **caches},
                        outputs=in_place)["logits"]
    assert rel_err(logits[0], full[0, 13:17]) <= 1e-5             # row 0 has exactly 13 tokens cached


def test_cache_is_updated_in_place(params):
    B, cap = 2, 8
    caches, in_place = fresh_caches(SMALL, B, cap)
    decode = prepared(build_decode(SMALL), params)
    before = {k: v.copy() for k, v in caches.items()}
    past = np.array([3, 5])
    decode.run({"tokens": np.array([[7], [9]]), "past_len": past, **caches}, outputs=in_place)
    for name, arr in caches.items():
        changed = np.any(arr != before[name], axis=(1, 3))       # [B, cap]
        assert changed[0].nonzero()[0].tolist() == [3] and changed[1].nonzero()[0].tolist() == [5], name


def test_greedy_with_cache_equals_recomputation(params):
    with_cache = generate(params, PROMPTS, 24)
    assert with_cache == generate(params, PROMPTS, 24, kv_cache=False)
    assert all(len(out) == 24 for out in with_cache)
    assert len(set(with_cache[1])) > 5                            # the test model really depends on context
    # batching does not change a sequence's continuation
    assert generate(params, [PROMPTS[1]], 24) == [with_cache[1]]


def test_sampling_with_cache_equals_recomputation(params):
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, seed=11)
    a = generate(params, PROMPTS, 16, **kw)
    assert a == generate(params, PROMPTS, 16, kv_cache=False, **kw)
    assert a == generate(params, PROMPTS, 16, **kw)               # reproducible
    assert a != generate(params, PROMPTS, 16, **{**kw, "seed": 12})


def test_stops_at_eot_per_sequence(params):
    free = Generator(params, eot=None).generate(PROMPTS, 20)
    stop = free[0][4]                                             # pretend this token is <|endoftext|>
    out = Generator(params, eot=stop).generate(PROMPTS, 20)
    for b in range(len(PROMPTS)):
        expected = free[b][:free[b].index(stop) + 1] if stop in free[b] else free[b]
        assert out[b] == expected
    assert out[0][-1] == stop and len(out[0]) <= 5
    assert Generator(params, eot=stop, kv_cache=False).generate(PROMPTS, 20) == out


def hf_model(params):
    transformers = pytest.importorskip("transformers")
    cfg = params.cfg
    hc = transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                 n_positions=cfg.max_seq_len, vocab_size=cfg.vocab_size,
                                 activation_function="gelu_new", layer_norm_epsilon=cfg.ln_eps,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(hc).eval()
    state = {"transformer." + k: torch.from_numpy(v.copy()) for k, v in hf_tensors(params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    return model


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=50256, pad_token_id=50256)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_huggingface_transformers(params):
    model = hf_model(params)
    ours = generate(params, PROMPTS, 24)
    for prompt, mine in zip(PROMPTS, ours):
        assert hf_greedy(model, prompt, 24) == mine


def test_bad_prompts_are_one_line_errors(params):
    gen = Generator(params)
    with pytest.raises(GraphcError, match="maximum sequence length"):
        gen.generate([list(range(65))], 1)                         # longer than maxT
    with pytest.raises(GraphcError, match="exceeds the model's maximum sequence length"):
        gen.generate([list(range(60))], 5)                         # prompt + new > maxT
    with pytest.raises(GraphcError, match="outside the vocabulary"):
        gen.generate([[1, 2, SMALL.vocab_size]], 4)
    with pytest.raises(GraphcError, match="outside the vocabulary"):
        gen.generate([[-1]], 4)
    with pytest.raises(GraphcError, match="empty"):
        gen.generate([[1], []], 4)
    with pytest.raises(GraphcError):
        gen.generate([], 4)
    assert gen.generate([list(range(60))], 4, Sampler(temperature=0))[0].__len__() == 4   # exactly maxT is fine
    assert gen.generate([[1]], 0) == [[]]


def test_d12_greedy_cache_recompute_and_huggingface_agree():
    params = random_init(named_config("d12"), 0)
    prompt = [464, 3290, 318, 257, 1310, 286]
    ours = generate(params, [prompt], 20)
    assert ours == generate(params, [prompt], 20, kv_cache=False)
    assert hf_greedy(hf_model(params), prompt, 20) == ours[0]
