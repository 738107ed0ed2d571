"""A tiny quickstart checkpoint, trained once per test session with the CLI (about 10 s on 2 cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_main_e2e import TINY

# test_main_e2e.py's TINY (experiment=quickstart at a tiny size), 8 steps, no sanity check or logged samples:
# a real training run, in seconds.
_SET_HERE = ("trainer.num_sanity_val_steps=", "trainer.log_every_n_steps=", "sampling.num_sample_log=")
TINY_QUICKSTART = [
    *(o for o in TINY if not o.startswith(_SET_HERE)),
    "trainer.num_sanity_val_steps=0",
    "trainer.max_steps=8",
    "sampling.num_sample_log=0",
    "wandb.mode=disabled",
]


def run_main(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python main.py TINY_QUICKSTART overrides`` in ``run_dir``; an AssertionError with its output if it fails."""
    cmd = [sys.executable, "main.py", *TINY_QUICKSTART, f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def tiny_checkpoint(factory: pytest.TempPathFactory) -> Path:
    """``checkpoints/last.ckpt`` of the session's tiny quickstart run (trained on first use)."""
    run_dir = factory.getbasetemp() / "tiny_quickstart"
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        run_main(run_dir)
    return path
