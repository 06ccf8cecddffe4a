#!/usr/bin/env bash
# The main job: train a small GPT-2 on Tiny Shakespeare on the CPU, then sample from it.
# Everything it needs is set up on first use (a .venv, the data, the tokenizer).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh" "plot"
cd "$ROOT"
DATA="${DATA:-data/tinyshakespeare}"
RUN="${RUN:-runs/shakespeare}"
STEPS="${STEPS:-300}"
# Each run of the demo trains afresh: --overwrite replaces an earlier demo run in $RUN
# (without it graphc refuses to replace a run; --resume would continue one).

if [ ! -f "$DATA/tiny_shakespeare_train.bin" ]; then
    graphc prepare --out "$DATA"
fi
graphc train --model L4H4C256 --seed 0 \
    --train-data "$DATA/tiny_shakespeare_train.bin" --val-data "$DATA/tiny_shakespeare_val.bin" \
    -b 8 -t 64 --steps "$STEPS" --lr 1e-3 --warmup 30 --lr-final-frac 0.1 --grad-clip 1.0 \
    --val-every 50 --val-batches 8 --sample-every 100 --out "$RUN" --overwrite
echo "loss curve: $RUN/loss.png    log: $RUN/losses.tsv    model: $RUN/model.bin (llm.c format)"
PROMPT="ROMEO:"
echo "=== sample from $RUN/model.bin, prompt: $PROMPT"
printf '%s' "$PROMPT"
graphc generate --model "$RUN/model.bin" --prompt "$PROMPT" --max-new-tokens 80 --temperature 0.8 --top-k 40 --seed 1
