"""scripts/compare_samplers.py end to end on a tiny trained model: rows, report, plot, and its checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from test_main_e2e import trained  # noqa: F401 - the shared trained-model fixture
from test_sample_eval import eval_lm  # noqa: F401 - a tiny random GPT-2 over the corpus's words (fast)

SCRIPT = ROOT / "scripts" / "compare_samplers.py"


def test_compare_samplers_writes_the_report(trained, tmp_path: Path, eval_lm: Path) -> None:  # noqa: F811
    checkpoint = trained[0] / "checkpoints" / "last.ckpt"
    out = tmp_path / "samplers"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "builtin", "--checkpoint", f"builtin={checkpoint}",
         "--num-samples", "4", "--batch-size", "4", "--factors", "0.5", "1", "--samplers", "ddpm", "first_hitting",
         "confidence", "--eval-model", str(eval_lm), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())["builtin"]
    rows = {(r["sampler"], r["steps"]): r for r in result["rows"]}
    assert set(rows) == {("held-out data", None), ("ddpm", 8), ("ddpm", 16), ("first_hitting", None),
                         ("confidence", 8), ("confidence", 16)}
    data = rows[("held-out data", None)]
    assert data["possible"] == 1.0 and data["true_nll"] > 0  # held-out source text is always possible
    assert rows[("first_hitting", None)]["nfe"] == 16  # one call per masked position: all 16 at the start
    assert rows[("ddpm", 8)]["nfe"] == 8 and rows[("ddpm", 8)]["command"].endswith("sampler=ddpm sampling.steps=8")
    assert data["gen_ppl"] > 1
    for r in result["rows"]:  # an 8-step model's samples may all end at once: nothing to score, gen PPL nan
        assert 0 <= r["mauve"] <= 1 and not r["gen_ppl"] <= 1 and 0 <= r["possible"] <= 1
    report = out.with_suffix(".md").read_text()
    assert "| confidence | 16 | no |" in report and "samplers.png" in report
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_missing_checkpoint_says_how_to_train_it(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "ptb", "--checkpoint", f"ptb={tmp_path / 'none.ckpt'}",
         "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "not found: train it with" in proc.stderr and "model=micro" in proc.stderr
