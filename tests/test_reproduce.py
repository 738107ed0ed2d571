"""The reproduction script runs end to end (smoke budget, built-in data; ~1.5 min: slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_reproduce_tables_smoke(tmp_path: Path) -> None:
    out = tmp_path / "tables.md"
    cmd = [sys.executable, "scripts/reproduce_tables.py", "--budget", "smoke", "--data", "synthetic",
           "--out", str(out), "--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for row in ("| AR |", "| MDLM |", "| SEDD |", "| D3PM absorb (T=1000) |", "w/o carry-over", "| T = 10 |"):
        assert row in text
    assert "Measured order" in text


@pytest.mark.slow
def test_reproduce_block_diffusion_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bd3lm.md"
    cmd = [sys.executable, "scripts/reproduce_tables.py", "--table", "bd3lm", "--budget", "smoke", "--data",
           "synthetic", "--out", str(out), "--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for row in ("| AR |", "| BD3-LM L'=4 |", "| BD3-LM L'=16 |", "| MDLM |", "Measured order"):
        assert row in text
