#!/usr/bin/env bash
# DPO on top of the study's tuned model, one arm (default mixed): the arm's pretrain, sft and eval steps
# (skipped where their final checkpoint / report already exists), then DPO (step 6) and the same
# evaluation of the DPO model (step 7). Wall times appended to outputs/zh_sentiment/timings.txt.
# From the repository root: bash experiments/zh_sentiment/run_dpo.sh [arm]
set -euo pipefail
export WANDB_MODE=${WANDB_MODE:-offline}
arm=${1:-mixed}
study=outputs/zh_sentiment
mkdir -p "$study"
step() {
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  "$@"
  echo "$name ($arm): $((SECONDS - start)) s" | tee -a "$study/timings.txt"
}
[ -d "$study/pretrain/$arm/checkpoints/final" ] || step "2 pretrain" python -m llama_zh experiment=zh_sentiment/pretrain arm="$arm"
[ -d "$study/sft/$arm/checkpoints/final" ] || step "3 sft" python -m llama_zh experiment=zh_sentiment/sft arm="$arm"
[ -f "$study/eval/$arm-none/eval_results.json" ] || step "4 eval" python -m llama_zh experiment=zh_sentiment/eval arm="$arm"
[ -d "$study/dpo/$arm/checkpoints/final" ] || step "6 dpo" python -m llama_zh experiment=zh_sentiment/dpo arm="$arm"
[ -f "$study/dpo_eval/$arm-none/eval_results.json" ] || step "7 dpo eval" python -m llama_zh experiment=zh_sentiment/dpo_eval arm="$arm"
