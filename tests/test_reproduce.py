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
@pytest.mark.parametrize("table,rows", [
    ("bd3lm", ("| AR |", "| BD3-LM L'=4 |", "| BD3-LM L'=16 |", "| MDLM |")),
    ("duo", ("| MDLM |", "| DUO |", "| DUO, config defaults |", "| UDLM |", "DUO's comparison")),
])
def test_reproduce_comparison_smoke(tmp_path: Path, table: str, rows: tuple[str, ...]) -> None:
    out = tmp_path / f"{table}.md"
    cmd = [sys.executable, "scripts/reproduce_tables.py", "--table", table, "--budget", "smoke", "--data",
           "synthetic", "--out", str(out), "--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for row in (*rows, "Measured order", f"--table {table} --budget smoke"):
        assert row in text
    if table == "duo":  # the scaled recipe: the curriculum for half of the smoke budget's 4 steps
        command = (tmp_path / "work" / "smoke" / "DUO" / "train.log").read_text().splitlines()[0]
        assert "algorithm.curriculum_end=2 " in command and "algorithm.gumbel_tau_log10_end=-3" in command
