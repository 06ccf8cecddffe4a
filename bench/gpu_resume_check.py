"""On the GPU: a CUDA run interrupted after step 5 and resumed equals the uninterrupted run
bit for bit (losses and model.bin), with --total-batch-size accumulation, recompute, bf16
and the trainer's next-batch prefetch; the checkpoint loads on onnxruntime."""
import sys
from pathlib import Path

import numpy as np

from graphc.models.config import named_config
from graphc.models.init import random_init
from graphc.runtime.optimizer import AdamWConfig
from graphc.runtime.trainer import TrainConfig, Trainer

data = Path(sys.argv[1])
out = Path(sys.argv[2])
backend = sys.argv[3] if len(sys.argv) > 3 else "cuda"


def trainer(name):
    cfg = TrainConfig(B=4, T=64, steps=10, val_every=4, val_batches=2, backend=backend, precision="bf16",
                      grad_accum=2, recompute=True, adamw=AdamWConfig(lr=3e-4, grad_clip=1.0, weight_decay=0.1),
                      warmup=2, lr_final_frac=0.1)
    lines = []
    t = Trainer(random_init(named_config("L4H4C128"), 0), str(data / "tiny_shakespeare_train.bin"),
                str(data / "tiny_shakespeare_val.bin"), cfg, out=out / name, emit=lines.append)
    return t, lines


full, full_lines = trainer("full")
full.run()
first, first_lines = trainer("split")
first.run(stop_after=5)
second, second_lines = trainer("split")
second.resume()
second.run()
strip = lambda ls: [l.split(" (took")[0] for l in ls if l.startswith("step")]  # noqa: E731
same = strip(first_lines) + strip(second_lines) == strip(full_lines)
same_bin = (out / "full" / "model.bin").read_bytes() == (out / "split" / "model.bin").read_bytes()
print("\n".join(full_lines[-4:]))
print(f"resume bit for bit on {backend}: losses {same}, model.bin {same_bin}")
from graphc.backends import get_backend  # noqa: E402
from graphc.data.shards import TokenLoader  # noqa: E402
from graphc.models.llmc import load_llmc  # noqa: E402
from graphc.runtime.evaluate import mean_loss  # noqa: E402

b = get_backend("onnxruntime")()
ev = b.evaluator(b.upload_params(load_llmc(out / "full" / "model.bin")), 4, 64)
print(f"model.bin on onnxruntime: val loss {mean_loss(ev, TokenLoader(str(data / 'tiny_shakespeare_val.bin'), 4, 64, vocab_size=50257), 2):.6f}")
sys.exit(0 if same and same_bin else 1)
