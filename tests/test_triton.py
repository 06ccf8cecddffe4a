"""``graphc export --triton-repo``: the repository, and the real Triton server serving it.

The Python-backend model is loaded by the ``tritonserver`` that ``nvidia-pytriton`` bundles
(``tests/triton_server.py``), on loopback, and ``tritonclient`` streams from it: greedy tokens
must equal Hugging Face transformers' greedy generation on the same weights, and seeded
sampling, with several requests in flight at once, must equal graphc's Decoder running each
request alone. That Triton has only the Python backend, so the onnx (and plan) models are
not served here: their ``config.pbtxt`` are parsed with Triton's own ``model_config.proto``
(tritonclient's copy) and checked against the exported model's real inputs and outputs.

The server tests are ``slow`` (the first run builds the Triton environment, ~3 minutes;
later ones take ~1 minute on 2 cores); ``.ci/run`` runs them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from graphc.cli.main import main
from shared_paths import GPT2_DIR, requires_shared

PROMPT = "Hello, my name is"
PROMPT_IDS = [464, 3290, 318]
CONTEXT = 64


def small_model(folder):
    """A small GPT-2 whose greedy continuations vary (weights scaled so the logits are peaked), saved
    in Hugging Face layout."""
    from graphc.models.config import named_config
    from graphc.models.hf import save_hf
    from graphc.models.init import random_init

    params = random_init(named_config("L2H4C64"), 1)
    for tensor in ("qkvw", "attprojw", "fcw", "fcprojw"):
        params.tensor(tensor)[...] *= 5
    save_hf(params, folder)
    return params


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(params, HF folder, repository) for the small model."""
    if not GPT2_DIR.is_dir():
        pytest.skip(f"shared data not available: {GPT2_DIR}")
    root = tmp_path_factory.mktemp("triton")
    params = small_model(root / "hf")
    repo = root / "repo"
    assert main(["export", "--model", str(root / "hf"), "--triton-repo", str(repo), "--context", str(CONTEXT),
                 "--max-batch", "4", "--tokenizer-dir", str(GPT2_DIR)]) == 0
    return params, root / "hf", repo


# ----------------------------------------------------------------------------- the repository
PBTXT_TENSOR = re.compile(r'\{ name: "([^"]+)" data_type: (TYPE_\w+) dims: \[ ([-\d, ]+) \]')
ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(bfloat16)": "TYPE_BF16"}


def pbtxt_tensors(text: str, section: str) -> list[tuple[str, str, list[int]]]:
    block = re.search(rf"^{section} \[\n(.*?)\n\]", text, re.S | re.M).group(1)
    return [(n, t, [int(d) for d in dims.split(",")]) for n, t, dims in PBTXT_TENSOR.findall(block)]


def ort_tensors(values) -> list[tuple[str, str, list[int]]]:
    return [(v.name, ORT_TYPES[v.type], [d if isinstance(d, int) else -1 for d in v.shape]) for v in values]


@requires_shared
def test_repository_layout(exported):
    from graphc.runtime import triton_model

    _, _, repo = exported
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert files == ["gpt2/1/config.json", "gpt2/1/model.py", "gpt2/1/model.safetensors",
                     "gpt2/1/tokenizer/encoder.json", "gpt2/1/tokenizer/vocab.bpe", "gpt2/config.pbtxt",
                     "gpt2_onnx/1/model.onnx", "gpt2_onnx/config.pbtxt"]   # no TensorRT here: no gpt2_trt
    assert (repo / "gpt2/1/model.py").read_text() == open(triton_model.__file__).read()
    config = (repo / "gpt2/config.pbtxt").read_text()
    assert 'backend: "python"' in config and "decoupled: true" in config
    assert 'key: "context" value: { string_value: "64" }' in config
    assert 'key: "max_batch" value: { string_value: "4" }' in config
    umask = os.umask(0)
    os.umask(umask)
    modes = {oct(p.stat().st_mode & 0o777) for p in [repo, *repo.rglob("*")] if p.is_dir()}
    assert modes == {oct(0o777 & ~umask)}     # as mkdir makes them: a Triton server of another user reads them


@requires_shared
def test_onnx_config_matches_the_model(exported):
    """Every input and output of model.onnx as onnxruntime sees it, in order, with its type and
    shape (dynamic dims -1), and nothing else."""
    import onnxruntime as ort

    _, _, repo = exported
    text = (repo / "gpt2_onnx/config.pbtxt").read_text()
    assert 'name: "gpt2_onnx"' in text and 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 0" in text
    session = ort.InferenceSession(str(repo / "gpt2_onnx/1/model.onnx"), providers=["CPUExecutionProvider"])
    assert pbtxt_tensors(text, "input") == ort_tensors(session.get_inputs())
    assert pbtxt_tensors(text, "output") == ort_tensors(session.get_outputs())
    assert len(session.get_inputs()) == 3 + 2 * 2 and len(session.get_outputs()) == 1 + 2 * 2


def test_refuses_an_existing_repository(tmp_path, capsys):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--model", "L1H2C32", "--triton-repo", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out}: --triton-repo: already exists; pass a new folder (an existing model repository " \
                  "is never overwritten)"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("args, field", [
    (["--out", "m.onnx", "--max-batch", "4"], "--max-batch"),
    (["--triton-repo", "r", "--kv-cache"], "--triton-repo"),
    (["--triton-repo", "r", "--served-model-name", "a/b"], "--served-model-name"),
    (["--triton-repo", "r", "--context", "2000"], "--context"),
    (["--triton-repo", "r", "--tokenizer-dir", "missing"], None),
    (["--triton-repo", "r", "--triton-env", "missing.tar.gz"], "--triton-env"),
    (["--out", "m.onnx", "--triton-env", "missing.tar.gz"], "--triton-env"),
])
def test_bad_flags_write_nothing(tmp_path, monkeypatch, capsys, args, field):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--model", "L1H2C32", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and (field is None or f"{field}: " in err[0])
    assert list(tmp_path.iterdir()) == []


def test_an_empty_folder_becomes_the_repository(tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    assert main(["export", "--model", "L1H2C32", "--triton-repo", str(out), "--served-model-name", "tiny",
                 "--context", "16"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["tiny", "tiny_onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]    # the temporary folder is gone


# ----------------------------------------------------------------------------- served by Triton
@pytest.fixture(scope="module")
def triton(exported, tmp_path_factory):
    from triton_server import TritonServer, install_graphc, triton_python

    python = triton_python()
    work = tmp_path_factory.mktemp("tritonserver")
    install_graphc(python, work)
    server = TritonServer(python, exported[2], ["gpt2"], work)
    try:
        server.wait_ready()
        yield python, server
    finally:
        server.stop()


def reference_decode(params, prompt: list[int], *, max_tokens: int, temperature=0.0, top_k=0, top_p=1.0, seed=0):
    """graphc's Decoder, this request alone: tokens until end of text (not included) or max_tokens."""
    from graphc.backends import get_backend
    from graphc.runtime.decode import DecodeSpec
    from graphc.runtime.sampling import Sampler

    backend = get_backend("onnxruntime")()
    decoder = backend.decoder(backend.upload_params(params), DecodeSpec(1, CONTEXT))
    slot, sampled = decoder.add(prompt, Sampler(temperature, top_k or None, top_p, seed))
    tokens = []
    while sampled.token != 50256:
        tokens.append(sampled.token)
        if len(tokens) == max_tokens:
            break
        sampled = decoder.step()[slot]
    return tokens


def transformers_greedy(hf_dir, prompt: list[int], max_tokens: int) -> list[int]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=False, pad_token_id=50256)[0, len(prompt):].tolist()
    return out[:out.index(50256)] if 50256 in out else out


@pytest.mark.slow
@requires_shared
def test_greedy_tokens_equal_transformers(exported, triton):
    from graphc.data.tokenizer import Tokenizer
    from triton_server import stream_requests

    _, hf_dir, _ = exported
    python, server = triton
    tokenizer = Tokenizer(tokenizer_dir=GPT2_DIR)
    got = stream_requests(python, server, "gpt2", [
        {"text_input": PROMPT, "max_tokens": 12, "temperature": 0.0},
        {"input_ids": PROMPT_IDS, "max_tokens": 12, "temperature": 0.0},
    ])
    for result, prompt in zip(got, [tokenizer.encode(PROMPT), PROMPT_IDS]):
        expected = transformers_greedy(hf_dir, prompt, 12)
        assert len(set(expected)) > 4, "the reference should not be degenerate"
        assert result["errors"] == [] and result["final"]
        assert result["ids"] == expected
        assert result["responses"] == len(expected)              # one response per token, then the final flag
        assert "".join(result["texts"]) == tokenizer.decode(expected)


@pytest.mark.slow
@requires_shared
def test_seeded_sampling_in_flight_together_equals_each_alone(exported, triton):
    from triton_server import stream_requests

    params, _, _ = exported
    python, server = triton
    requests = [{"input_ids": PROMPT_IDS, "max_tokens": 10, "temperature": 0.9, "top_k": 40, "seed": seed}
                for seed in (1, 2, 3)]
    requests.append({"input_ids": [50256], "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7})
    got = stream_requests(python, server, "gpt2", requests)
    for request, result in zip(requests, got):
        prompt = request.pop("input_ids")
        assert result["errors"] == [] and result["final"]
        assert result["ids"] == reference_decode(params, prompt, **request)
    assert got[0]["ids"] != got[1]["ids"]          # the seeds matter


@pytest.mark.slow
@requires_shared
def test_packed_environment_via_execution_env_path(exported, triton, tmp_path):
    """The repository carries graphc in a venv-pack archive (``--triton-env``); the server runs with
    nothing of graphc's on PATH, so the model can only import graphc from the unpacked archive."""
    from graphc.data.tokenizer import Tokenizer
    from triton_server import TritonServer, pack_environment, stream_requests

    _, hf_dir, _ = exported
    python, _ = triton
    archive = pack_environment(python, tmp_path / "graphc_env.tar")
    repo = tmp_path / "repo"
    assert main(["export", "--model", str(hf_dir), "--triton-repo", str(repo), "--context", str(CONTEXT),
                 "--tokenizer-dir", str(GPT2_DIR), "--triton-env", str(archive)]) == 0
    assert (repo / "gpt2/graphc_env.tar").stat().st_size == archive.stat().st_size
    assert ('parameters { key: "EXECUTION_ENV_PATH" value: { string_value: '
            '"$$TRITON_MODEL_DIRECTORY/graphc_env.tar" } }') in (repo / "gpt2/config.pbtxt").read_text()
    (tmp_path / "server").mkdir()
    server = TritonServer(python, repo, ["gpt2"], tmp_path / "server", path="/usr/local/bin:/usr/bin:/bin")
    try:
        server.wait_ready()
        (result,) = stream_requests(python, server, "gpt2", [{"text_input": PROMPT, "max_tokens": 8,
                                                              "temperature": 0.0}])
    finally:
        server.stop()
        for big in (archive, repo / "gpt2/graphc_env.tar"):    # ~0.5 GB each: not kept in pytest's tmp dirs
            big.unlink(missing_ok=True)
    expected = transformers_greedy(hf_dir, Tokenizer(tokenizer_dir=GPT2_DIR).encode(PROMPT), 8)
    assert result["errors"] == [] and result["final"] and result["ids"] == expected


@pytest.mark.slow
@requires_shared
@pytest.mark.parametrize("request_fields, message", [
    ({"max_tokens": 4}, "text_input: give exactly one of text_input and input_ids"),
    ({"input_ids": [1, 50257], "max_tokens": 4}, "input_ids: token id 50257 is outside the vocabulary (0..50256)"),
    ({"input_ids": PROMPT_IDS, "max_tokens": 62}, "max_tokens: the prompt's 3 tokens + max_tokens 62 exceed the "
                                                  "context of 64 positions"),
    ({"input_ids": PROMPT_IDS, "temperature": -1.0}, "temperature: temperature must be >= 0 (0 = greedy), got -1.0"),
])
def test_bad_requests_get_one_error_and_the_final_flag(triton, request_fields, message):
    from triton_server import stream_requests

    python, server = triton
    (result,) = stream_requests(python, server, "gpt2", [request_fields])
    assert result["ids"] == [] and result["final"]
    assert len(result["errors"]) == 1 and result["errors"][0].endswith(message)


@pytest.mark.slow
@requires_shared
def test_configs_parse_as_triton_model_configs(exported, triton):
    """Triton's own protobuf schema (tritonclient's model_config_pb2) reads every config.pbtxt,
    and the onnx model's tensors are exactly those of model.onnx."""
    import onnxruntime as ort

    _, _, repo = exported
    python, _ = triton
    code = ("import json, sys; from google.protobuf import text_format, json_format; "
            "from tritonclient.grpc import model_config_pb2 as mc; "
            "print(json.dumps({p: json_format.MessageToDict(text_format.Parse(open(p).read(), mc.ModelConfig())) "
            "for p in sys.argv[1:]}))")
    paths = [str(repo / m / "config.pbtxt") for m in ("gpt2", "gpt2_onnx")]
    done = subprocess.run([str(python), "-c", code, *paths], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    configs = json.loads(done.stdout)
    python_cfg, onnx_cfg = configs[paths[0]], configs[paths[1]]
    assert python_cfg["backend"] == "python" and python_cfg["modelTransactionPolicy"] == {"decoupled": True}
    assert [t["name"] for t in python_cfg["input"]] == ["text_input", "input_ids", "max_tokens", "temperature",
                                                         "top_k", "top_p", "seed"]
    assert [t["name"] for t in python_cfg["output"]] == ["text_output", "output_ids"]
    session = ort.InferenceSession(str(repo / "gpt2_onnx/1/model.onnx"), providers=["CPUExecutionProvider"])
    assert onnx_cfg["platform"] == "onnxruntime_onnx"
    for key, values in (("input", session.get_inputs()), ("output", session.get_outputs())):
        assert [(t["name"], t["dataType"], [int(d) for d in t["dims"]]) for t in onnx_cfg[key]] == ort_tensors(values)


@pytest.mark.tensorrt
@requires_shared
def test_plan_config_matches_the_engine(tmp_path):
    """Where datacenter TensorRT and a GPU are present: the engine is written, and its tensors are
    the ones its config.pbtxt names (same names, order-free, types and dims)."""
    trt = pytest.importorskip("tensorrt")
    small_model(tmp_path / "hf")
    repo = tmp_path / "repo"
    assert main(["export", "--model", str(tmp_path / "hf"), "--triton-repo", str(repo), "--context", "32"]) == 0
    plan = repo / "gpt2_trt/1/model.plan"
    assert plan.exists(), "TensorRT is installed, so the engine should have been built"
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(plan.read_bytes())
    text = (repo / "gpt2_trt/config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in text
    trt_types = {trt.float32: "TYPE_FP32", trt.int64: "TYPE_INT64", trt.bfloat16: "TYPE_BF16"}
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    for section, mode in (("input", trt.TensorIOMode.INPUT), ("output", trt.TensorIOMode.OUTPUT)):
        expected = sorted((n, trt_types[engine.get_tensor_dtype(n)], list(engine.get_tensor_shape(n)))
                          for n in names if engine.get_tensor_mode(n) == mode)
        assert sorted(pbtxt_tensors(text, section)) == expected


def test_model_parameters_reads_triton_json():
    from graphc.runtime.triton_model import model_parameters

    config = {"parameters": {"context": {"string_value": "64"}, "precision": {"string_value": "fp32"}}}
    assert model_parameters(config) == {"context": "64", "precision": "fp32"}
    assert model_parameters({}) == {}
