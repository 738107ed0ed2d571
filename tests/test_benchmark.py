"""bench/benchmark.py --quick runs end to end on CPU and reports both tables (no timing checks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

TRAIN_HEADER = ("## Training throughput", "model", "params (non-embedding, M)", "batch x length",
                "tokens/s", "ms/step", "peak RSS")
SAMPLE_HEADER = ("## Sampling", "predictor", "steps", "NFE", "s/sample", "speed-up vs ddpm")


def test_quick_benchmark_writes_both_tables(tmp_path: Path) -> None:
    out = tmp_path / "b.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "bench/benchmark.py", "--quick", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    for text in (proc.stdout, out.read_text()):
        for column in (*TRAIN_HEADER, *SAMPLE_HEADER, "flash-attn", "torch"):
            assert column in text
        assert "| micro |" in text  # the one training row
        rows = [line for line in text.splitlines() if line.startswith("| ddpm")]
        assert len(rows) == 4  # (ddpm, ddpm_cache) x steps (4, 8)


def test_quick_benchmark_has_a_dimamba_row(tmp_path: Path) -> None:
    out = tmp_path / "b.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "bench/benchmark.py", "--quick", "--device", "cpu", "--train-sizes", "tiny-dimamba",
           "--vocab", "512", "--steps", "4", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "| tiny-dimamba | 28.4 |" in text  # non-embedding parameters, as DiT tiny's 28.5M
    assert "mamba-ssm" in text


def test_block_diffusion_benchmark_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "bd3lm.md"
    cmd = [sys.executable, "bench/block_diffusion_benchmark.py", "--length", "32", "--vocab", "64", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith(("| BD3-LM", "| MDLM"))]
    assert [(r[0], r[1]) for r in rows] == [("| BD3-LM L'=4", "yes"), ("| BD3-LM L'=4", "no"),
                                            ("| BD3-LM L'=16", "yes"), ("| BD3-LM L'=16", "no"), ("| MDLM", "-")]
    nfe = [int(r[2].replace(",", "")) for r in rows]
    assert nfe == [32 + 7, 32, 32 + 1, 32, 32]  # first-hitting: one call per token, plus the cache fills
