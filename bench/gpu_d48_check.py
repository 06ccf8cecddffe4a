"""d48 early-step dynamics on the H200: loss over a few steps at two learning rates, with and
without recompute (is a rising loss the optimizer's first Adam steps or a lowering bug?)."""
import gc
import sys
import time

import numpy as np

sys.path.insert(0, "tests")
from test_cuda_gpu import batches  # noqa: E402

from graphc.backends import get_backend  # noqa: E402
from graphc.models.config import named_config  # noqa: E402
from graphc.models.init import random_init  # noqa: E402
from graphc.runtime.optimizer import AdamWConfig  # noqa: E402
from graphc.runtime.programs import TrainSpec  # noqa: E402

cuda = get_backend("cuda")()
cfg = named_config(sys.argv[1] if len(sys.argv) > 1 else "d48")
params = random_init(cfg, seed=0)
B, T = 4, 1024
data = batches(B, T, 4)
for lr, recompute in ((1e-5, True), (1e-5, False), (3e-5, True)):
    step = cuda.train_step(cuda.upload_params(params), TrainSpec(B, T, precision="bf16", recompute=recompute,
                                                                 adamw=AdamWConfig(lr=lr, grad_clip=1.0)))
    losses = []
    for s, (x, y) in enumerate(data):
        r = step.run(x, y, t=s + 1, lr=lr)
        losses.append(round(r.loss, 5))
    print(f"{cfg.describe()} B{B} T{T} bf16 lr {lr} recompute {recompute}: losses {losses}, norm {r.grad_norm:.3f}",
          flush=True)
    del step
    gc.collect()
