#!/usr/bin/env bash
# Kept for the commands that name it: runs bench/gpu_check.sh (the `-m gpu` tests, then training MFU and
# sampling speed on the GPU, all written to bench_results/gpu_check.json), with the same arguments:
#   bash scripts/gpu_check.sh            # = bash bench/gpu_check.sh
#   bash scripts/gpu_check.sh --dry-run --out /tmp/gpu_check.json   # CPU, toy sizes, seconds
set -euo pipefail
exec bash "$(dirname "$0")/../bench/gpu_check.sh" "$@"
