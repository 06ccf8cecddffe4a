"""``graphc generate``: output contract, cache vs --no-kv-cache, seeds, several prompts, errors."""


import pytest

from graphc.cli.main import main
from graphc.models.config import GPT2Config
from graphc.models.init import random_init
from graphc.models.llmc import save_llmc
from graphc.runtime.generate import generate
from shared_paths import TIKTOKEN_CACHE

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=64)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    params = random_init(SMALL, 0)
    for t in ["wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"]:
        params.tensor(t)[...] *= 10      # so that greedy output depends on the context
    path = tmp_path_factory.mktemp("gen") / "model.bin"
    save_llmc(params, path)
    return path, params


def cli(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def ids_lines(out):
    return [[int(t) for t in line.split()] for line in out.splitlines()]


def test_print_ids_greedy_matches_library_and_no_kv_cache(capsys, model):
    path, params = model
    args = ["--model", path, "--prompt-ids", "464 3290 318", "--max-new-tokens", 20, "--temperature", 0, "--print-ids"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert len(out.splitlines()) == 1
    (ids,) = ids_lines(out)
    assert ids == generate(params, [[464, 3290, 318]], 20)[0]
    code, out2, _ = cli(capsys, *args, "--no-kv-cache")
    assert code == 0 and out2 == out


def test_several_prompts_one_line_each(capsys, model):
    path, params = model
    code, out, err = cli(capsys, "--model", path, "--prompt-ids", "464 3290", "--prompt-ids", "40,1101,257",
                         "--prompt-ids", "50256", "--max-new-tokens", 12, "--temperature", 0, "--print-ids")
    assert code == 0, err
    assert ids_lines(out) == generate(params, [[464, 3290], [40, 1101, 257], [50256]], 12)


def test_sampling_is_seeded(capsys, model):
    path, _ = model
    base = ["--model", path, "--prompt-ids", "464 3290", "--max-new-tokens", 16, "--print-ids"]
    runs = [cli(capsys, *base, "--seed", seed)[1] for seed in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    code, no_cache, _ = cli(capsys, *base, "--seed", 1, "--no-kv-cache")
    assert no_cache == runs[0]


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", " ".join(["1"] * 65)], "maximum sequence length"),
    (["--prompt-ids", " ".join(["1"] * 60), "--max-new-tokens", "10"], "maximum sequence length"),
    (["--prompt-ids", "464 50257"], "outside the vocabulary"),
    (["--prompt-ids", "464 -3"], "outside the vocabulary"),
    (["--prompt-ids", ""], "empty"),
    (["--prompt-ids", "464 abc"], "not a token id"),
    (["--prompt", ""], "empty"),
    (["--prompt-ids", "1", "--temperature", "-1"], "temperature"),
    (["--prompt-ids", "1", "--top-p", "0"], "top-p"),
])
def test_bad_input_is_a_one_line_error(capsys, model, argv, message):
    path, _ = model
    code, out, err = cli(capsys, "--model", path, *argv)
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert out == ""


def test_missing_model_is_a_one_line_error(capsys, tmp_path):
    code, _, err = cli(capsys, "--model", tmp_path / "nope.bin", "--prompt-ids", "1")
    assert code == 2 and err.startswith("error: ")


@pytest.fixture
def tiktoken_env(monkeypatch):
    if not TIKTOKEN_CACHE.is_dir():
        pytest.skip("shared tiktoken cache not available")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    monkeypatch.delenv("GRAPHC_TOKENIZER_DIR", raising=False)
    from graphc.data.tokenizer import Tokenizer

    return Tokenizer()


def test_text_prompts_print_decoded_blocks(capsys, model, tiktoken_env):
    path, params = model
    tok = tiktoken_env
    prompts = ["Hello, my name is", "The quick brown fox"]
    base = ["--model", path, "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", 10,
            "--temperature", 0]
    code, text, err = cli(capsys, *base)
    assert code == 0, err
    code, ids_out, _ = cli(capsys, *base, "--print-ids")
    ids = ids_lines(ids_out)
    assert ids == generate(params, [tok.encode(p) for p in prompts], 10)
    expected = "\n---\n".join(tok.decode([t for t in seq if t != tok.eot]) for seq in ids) + "\n"
    assert text == expected


def test_named_size_model(capsys):
    code, out, err = cli(capsys, "--model", "L1H2C32", "--seed", 3, "--prompt-ids", "1 2 3", "--max-new-tokens", 3,
                         "--print-ids", "--temperature", 0)
    assert code == 0, err
    assert len(ids_lines(out)[0]) == 3
