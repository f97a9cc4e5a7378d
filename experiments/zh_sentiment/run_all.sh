#!/usr/bin/env bash
# Every step of the zh_sentiment study in order (README.md), each step's wall time appended to
# outputs/zh_sentiment/timings.txt. From the repository root: bash experiments/zh_sentiment/run_all.sh
set -euo pipefail
export WANDB_MODE=${WANDB_MODE:-offline}
study=outputs/zh_sentiment
mkdir -p "$study/tokenizer"
step() {
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  "$@"
  echo "$name: $((SECONDS - start)) s" | tee -a "$study/timings.txt"
}
[ -f "$study/tokenizer/tokens.json" ] || step "1 tokenizer" python experiments/vocab_extension.py --tokens-only --workdir "$study/tokenizer" --json "$study/tokenizer/tokens.json"
step "2 pretrain" python -m llama_zh --multirun experiment=zh_sentiment/pretrain arm=news,reviews,mixed
step "2b pretrain eval" python -m llama_zh --multirun experiment=zh_sentiment/pretrain_eval arm=news,reviews,mixed
step "3 sft" python -m llama_zh --multirun experiment=zh_sentiment/sft arm=news,reviews,mixed
step "4 eval" python -m llama_zh --multirun experiment=zh_sentiment/eval arm=news,reviews,mixed quant=none,int8,nf4
step "5 report" python experiments/zh_sentiment/report.py
