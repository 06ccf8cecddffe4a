"""graphc's KV-cache export in the clients users already run: optimum and onnxruntime-genai.

Both must generate the same greedy tokens as Hugging Face transformers on the same weights
(left-padded batch included). Their pins conflict with graphc's test environment
(optimum-onnx 0.1 wants ``transformers<4.58``; onnxruntime-genai 0.18 wants
``onnxruntime>=1.31``), so each runs in its own virtual environment, created on first use
under ``$GRAPHC_TEST_ENVS`` (default ``~/.cache/graphc/test-envs``) and reused after.

Marked ``thirdparty`` (not in the default run: creating the environments downloads ~1 GB
from the package registry). CI runs them with ``bash scripts/test.sh -m thirdparty``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.thirdparty

ENVS = Path(os.environ.get("GRAPHC_TEST_ENVS", Path.home() / ".cache" / "graphc" / "test-envs"))
CLIENTS = {
    "optimum": ["optimum-onnx==0.1.0", "transformers<4.58", "torch==2.13.0", "onnxruntime"],
    "genai": ["onnxruntime-genai==0.18.0", "numpy"],
}
PROMPTS = [[464, 3290, 318], [50256, 50256, 40]]     # the second one left-padded
MASK = [[1, 1, 1], [0, 0, 1]]
NEW_TOKENS = 12


def client_python(name: str) -> str:
    """The interpreter of the client's own environment, created (once) with its pins."""
    requirements = CLIENTS[name]
    key = hashlib.sha256(json.dumps(requirements).encode()).hexdigest()[:8]
    folder = ENVS / name
    python = folder / "bin" / "python"
    stamp = folder / f".installed-{key}"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
        result = subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.fail(f"could not create the {name} environment:\n{result.stderr[-3000:]}")
        stamp.touch()
    return str(python)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small GPT-2 whose greedy continuations vary (weights scaled so the logits are peaked):
    HF weights + config, graphc's KV-cache export and its genai_config.json, in one folder."""
    from graphc.cli.main import main
    from graphc.models.config import named_config
    from graphc.models.hf import save_hf
    from graphc.models.init import random_init

    folder = tmp_path_factory.mktemp("client_model")
    params = random_init(named_config("L2H4C64"), 1)
    for tensor in ("qkvw", "attprojw", "fcw", "fcprojw"):
        params.tensor(tensor)[...] *= 5
    save_hf(params, folder / "hf")
    assert main(["export", "--model", str(folder / "hf"), "--out", str(folder / "model.onnx"), "--kv-cache",
                 "--genai-config"]) == 0
    (folder / "config.json").write_text((folder / "hf" / "config.json").read_text())
    return folder


@pytest.fixture(scope="module")
def transformers_tokens(model_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir / "hf")
    out = model.generate(torch.tensor(PROMPTS), attention_mask=torch.tensor(MASK), max_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=50256)
    tokens = [row[len(PROMPTS[0]):] for row in out.tolist()]
    assert len({t for row in tokens for t in row}) > 6, "the reference should not be degenerate"
    return tokens


def run_client(name: str, script: str, model_dir: Path):
    result = subprocess.run([client_python(name), "-c", textwrap.dedent(script), str(model_dir)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_optimum_ort_model_for_causal_lm(model_dir, transformers_tokens):
    tokens = run_client("optimum", f"""
        import json, sys, torch
        from optimum.onnxruntime import ORTModelForCausalLM
        model = ORTModelForCausalLM.from_pretrained(sys.argv[1], use_cache=True)
        out = model.generate(torch.tensor({PROMPTS}), attention_mask=torch.tensor({MASK}),
                             max_new_tokens={NEW_TOKENS}, do_sample=False, pad_token_id=50256)
        print(json.dumps([row[{len(PROMPTS[0])}:] for row in out.tolist()]))
        """, model_dir)
    assert tokens == transformers_tokens


def test_onnxruntime_genai_decoder(model_dir, transformers_tokens):
    """genai runs each prompt on its own (no padding), as transformers' unpadded rows."""
    config = json.loads((model_dir / "genai_config.json").read_text())
    assert config["model"]["type"] == "decoder" and config["model"]["decoder"]["filename"] == "model.onnx"
    unpadded = [[t for t, m in zip(p, mask) if m] for p, mask in zip(PROMPTS, MASK)]
    tokens = run_client("genai", f"""
        import json, sys
        import numpy as np
        import onnxruntime_genai as og
        model = og.Model(sys.argv[1])
        rows = []
        for prompt in {unpadded}:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + {NEW_TOKENS}, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(np.array([prompt], dtype=np.int32))
            row = []
            while not generator.is_done():
                generator.generate_next_token()
                row.append(int(generator.get_next_tokens()[0]))
            rows.append(row)
        print(json.dumps(rows))
        """, model_dir)
    assert tokens == transformers_tokens
