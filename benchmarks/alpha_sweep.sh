#!/usr/bin/env bash
# Sweep the steering strength of the shipped SmolLM2-135M checkpoint on a seeded sample of toxic
# RealToxicityPrompts prompts (paper protocol: 25 continuations, nucleus p=0.9, 20 new tokens) and plot
# toxicity against perplexity.
#   bash benchmarks/alpha_sweep.sh [PROMPTS_FILE] [N] [OUTPUT_DIR] [ALPHAS]
set -euo pipefail
prompts=${1:-../shared/data/rtp/rtp_toxic_1k.jsonl}
n=${2:-50}
out=${3:-runs/sweep/smollm2-135m}
alphas=${4:-[0, 0.3, 0.5, 0.7, 1.0, 1.5]}
destein test --config configs/smollm2-135m.yaml --ckpt_path checkpoints/smollm2-135m-paradetox.ckpt \
  --data.prompts.source "$prompts" --data.prompts.n "$n" --data.prompts.seed 0 \
  --model.evaluation.alphas "$alphas" --model.evaluation.output_dir "$out" --trainer.logger false
destein compare "$out" --plot "$out/toxicity-perplexity.png"
