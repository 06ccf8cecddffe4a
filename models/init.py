"""Random initialisation with GPT-2's scheme, seeded, for any config.

Weights ~ N(0, 0.02); the two residual projections (attention and MLP output) use
0.02 / sqrt(2 L) as in GPT-2 and llm.c's ``train_gpt2.cu``; biases are zero; layer-norm
gains are one. The padded rows of ``wte`` (past the real vocabulary) are zero, as llm.c
leaves them. numpy's PCG64 with the given seed makes it reproducible across machines.
"""

from __future__ import annotations

import numpy as np

from graphc.models.config import GPT2Config
from graphc.models.params import Params

RESIDUAL_PROJECTIONS = {"attprojw", "fcprojw"}
ONES = {"ln1w", "ln2w", "lnfw"}
ZEROS = {"ln1b", "ln2b", "lnfb", "qkvb", "attprojb", "fcb", "fcprojb"}


def random_init(cfg: GPT2Config, seed: int = 0) -> Params:
    rng = np.random.default_rng(seed)
    params = Params(cfg)
    for tensor in ["wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"]:
        std = 0.02 / np.sqrt(2 * cfg.n_layer) if tensor in RESIDUAL_PROJECTIONS else 0.02
        view = params.tensor(tensor)
        view[...] = rng.standard_normal(view.shape, dtype=np.float32) * np.float32(std)
    for tensor in ONES:
        params.tensor(tensor)[...] = 1.0
    params.tensor("wte")[cfg.vocab_size:] = 0.0
    return params
