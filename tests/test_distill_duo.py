"""scripts/distill_duo.py: its source-based score, and (slow) the whole pipeline at the smoke budget."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from dataloader import BOS_ID, EOS_ID, WORD_OFFSET
from synthetic import MarkovSource

# loaded from its file: scripts/ on sys.path would shadow the lm-eval package with scripts/lm_eval.py
_spec = importlib.util.spec_from_file_location("distill_duo", ROOT / "scripts" / "distill_duo.py")
distill_duo = sys.modules["distill_duo"] = importlib.util.module_from_spec(_spec)  # (its dataclasses look it up)
_spec.loader.exec_module(distill_duo)
valid_pair_fraction = distill_duo.valid_pair_fraction


def slow_valid_pairs(tokens: list[list[int]], transition: torch.Tensor) -> float:
    """The definition pair by pair: both tokens words and the chain's transition between them positive."""
    good = total = 0
    for row in tokens:
        words = row[1:-1]
        for a, b in zip(words[:-1], words[1:], strict=True):
            total += 1
            u, v = a - WORD_OFFSET, b - WORD_OFFSET
            num_words = transition.shape[0]
            good += 0 <= u < num_words and 0 <= v < num_words and bool(transition[u, v] > 0)
    return good / total


def test_valid_pair_fraction_against_the_definition() -> None:
    source = MarkovSource.from_seed(0)
    chain = torch.from_numpy(source.sample(6, 30, np.random.default_rng(0))) + WORD_OFFSET  # (6, 30) from the chain
    ends = torch.tensor([[BOS_ID]] * 6), torch.tensor([[EOS_ID]] * 6)
    made = torch.cat([ends[0], chain, ends[1]], dim=1)
    assert valid_pair_fraction(made, source.transition) == 1.0  # everything the source makes is valid
    noisy = made.clone()
    generator = torch.Generator().manual_seed(1)
    noisy[:, 1:-1] = torch.randint(0, source.num_words + WORD_OFFSET, (6, 30), generator=generator)
    noisy[0, 5] = EOS_ID  # a special token inside the block: both its pairs are impossible
    value = valid_pair_fraction(noisy, source.transition)
    assert 0 < value < 1
    assert value == pytest.approx(slow_valid_pairs(noisy.tolist(), source.transition), abs=1e-12)


@pytest.mark.slow
def test_distill_duo_smoke(tmp_path: Path) -> None:
    out = tmp_path / "duo_distill.md"
    cmd = [sys.executable, "scripts/distill_duo.py", "--budget", "smoke", "--work-dir", str(tmp_path / "work"),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for row in ("| held-out source text | - | 0 |", "| teacher (DUO) | 32 | 33 |", "| teacher (DUO) | 8 | 9 |",
                "| student, 4 rounds (to 16 steps) | 16 | 17 |", "| student, 5 rounds (to 8 steps) | 8 | 9 |",
                "--budget smoke", "algorithm=duo_distill", "sampling.noise_removal=sample"):
        assert row in text, row
    held_out = next(line for line in text.splitlines() if line.startswith("| held-out"))
    assert "| 100% |" in held_out and "| 100.0% |" in held_out  # source text: every sample and pair possible
    for name in ("student16.ckpt", "student8.ckpt", "teacher/checkpoints/last.ckpt"):
        assert (tmp_path / "work" / name).is_file()
    student8 = torch.load(tmp_path / "work" / "student8.ckpt", map_location="cpu", weights_only=False)
    assert student8["global_step"] == 10  # resumed from the 4-round run (8 steps) for a 5th round of 2
