#!/usr/bin/env bash
# Everything that needs CUDA, in one run of at most ~8 minutes on one H100/H200, written to ONE JSON file:
#   1. the `-m gpu` tests (bf16 vs fp32, flash-attn vs SDPA, mamba-ssm vs the PyTorch scan, FSDP with a
#      sharded EMA), counted from pytest's JUnit XML;
#   2. bench/benchmark.py: training throughput and MFU of tiny and small at 16 x 1,024 tokens in bf16,
#      sampling seconds at T = 1,000 steps, L = 1,024 (model tiny, batch 1, ddpm and ddpm_cache).
# Run it on a GPU node with the environment set up (requirements.yaml):
#   bash bench/gpu_check.sh                        # writes bench_results/gpu_check.json
#   bash bench/gpu_check.sh --out FILE.json -k flash   # other arguments go to pytest
#   bash bench/gpu_check.sh --dry-run --out /tmp/g.json  # the same sequence on CPU at toy sizes, seconds
# Each stage has a time limit (GPU_CHECK_TEST_TIMEOUT=300, GPU_CHECK_BENCH_TIMEOUT=150 seconds); the JSON
# is written whatever the stages return, and the script exits non-zero if a stage failed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

dry_run=0
out=$root/bench_results/gpu_check.json
pytest_args=()
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out="$2"; shift ;;
    --out=*) out="${1#--out=}" ;;
    --) shift; pytest_args+=("$@"); break ;;
    *) pytest_args+=("$1") ;;
  esac
  shift
done
[[ $out = /* ]] || out=$PWD/$out  # relative to where the script was called from
cd "$root"

if ((dry_run)); then
  # CPU, toy sizes: the gpu tests of one file (they skip without CUDA), micro at 2 x 16 tokens, T = 8.
  tests=(tests/test_dit.py)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # toy sizes: more threads only contend on a shared machine
  bench_args=(--device cpu --quick --vocab 512 --train-sizes micro --steps 8)
else
  tests=(tests/)
  bench_args=(--device cuda --train-sizes tiny,small --train-length 1024 --train-batch 16
              --sample-size tiny --sample-length 1024 --steps 1000)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

test_cmd=(python -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$work/tests.xml" "${tests[@]}"
          ${pytest_args[@]+"${pytest_args[@]}"})
test_start=$SECONDS
test_rc=0
timeout "${GPU_CHECK_TEST_TIMEOUT:-300}" "${test_cmd[@]}" || test_rc=$?
test_seconds=$((SECONDS - test_start))

bench_cmd=(python bench/benchmark.py "${bench_args[@]}" --out "$work/benchmark.md" --json "$work/benchmark.json")
bench_start=$SECONDS
bench_rc=0
timeout "${GPU_CHECK_BENCH_TIMEOUT:-150}" "${bench_cmd[@]}" || bench_rc=$?
bench_seconds=$((SECONDS - bench_start))

python - "$out" "$work" "$dry_run" "$((SECONDS - start))" "$test_rc" "$test_seconds" "$bench_rc" "$bench_seconds" \
  "${test_cmd[*]}" "${bench_cmd[*]}" <<'EOF'
"""Merge the stages into one JSON file: versions, test counts, benchmark rows (training, sampling)."""
import datetime
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, work, dry_run, seconds, test_rc, test_seconds, bench_rc, bench_seconds, test_cmd, bench_cmd = sys.argv[1:]
work = Path(work)


def test_counts(path: Path) -> dict:
    """total / passed / failed / errors / skipped from pytest's JUnit XML; None each if there is none."""
    keys = ("total", "passed", "failed", "errors", "skipped")
    if not path.is_file():
        return dict.fromkeys(keys)
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total, failed, errors, skipped = (sum(int(s.get(k, 0)) for s in suites)
                                      for k in ("tests", "failures", "errors", "skipped"))
    return dict(zip(keys, (total, total - failed - errors - skipped, failed, errors, skipped)))


bench_file = work / "benchmark.json"
bench = json.loads(bench_file.read_text()) if bench_file.is_file() else {}
report = {
    "dry_run": dry_run == "1",
    "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    "seconds": int(seconds),
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "gpu_count": torch.cuda.device_count(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "tests": {"command": test_cmd, "exit_code": int(test_rc), "timed_out": test_rc == "124",
              "seconds": int(test_seconds), **test_counts(work / "tests.xml")},
    "benchmark": {"command": bench_cmd, "exit_code": int(bench_rc), "timed_out": bench_rc == "124",
                  "seconds": int(bench_seconds), **{k: bench.get(k) for k in (
                      "device", "precision", "flash_attn", "mamba_ssm", "settings")}},
    "matmul_peak": bench.get("matmul_peak"),
    "data": bench.get("data"),
    "training": bench.get("training", []),
    "sampling": bench.get("sampling", []),
}
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(json.dumps(report, indent=2) + "\n")
t = report["tests"]
print(f"\ntests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped "
      f"(exit {t['exit_code']}); benchmark exit {bench_rc}; {seconds} s in all; wrote {out}")
EOF

((test_rc == 0 && bench_rc == 0))
