#!/usr/bin/env bash
# Everything that needs CUDA, in one run: the `-m gpu` tests (bf16 vs fp32, flash-attn vs SDPA,
# mamba-ssm vs the PyTorch scan, FSDP with a sharded EMA: train, resume, evaluate).
# Run it on a GPU node with the environment set up (requirements.yaml):
#   bash scripts/gpu_check.sh            # prints the GPU, versions, then the test results
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
python -m pytest -m gpu -q -rs -p no:cacheprovider tests/ "$@"
