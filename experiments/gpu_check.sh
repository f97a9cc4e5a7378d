#!/usr/bin/env bash
# The GPU checks, run on a machine with one CUDA GPU from the repository root:
#   bash experiments/gpu_check.sh [out_dir]
# bf16-mixed training throughput and MFU (llama_zh's Lightning step vs transformers, 134M and 1B shapes),
# then decoding throughput in bf16 (tiny and 130M, batch 1 and 8, vs transformers' generate).
set -uo pipefail
out=${1:-.}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, pytorch_lightning, transformers; print('torch', torch.__version__, 'lightning', pytorch_lightning.__version__, 'transformers', transformers.__version__)"
python3 -m experiments.train_throughput --device cuda --shapes 134m,1b --precisions bf16-mixed --rounds 2 --steps 8 2>&1 | tee "$out/train_throughput.txt"
python3 experiments/decode_throughput.py --device cuda --dtype bfloat16 --no-quant --repeats 2 2>&1 | tee "$out/decode_throughput.txt"
