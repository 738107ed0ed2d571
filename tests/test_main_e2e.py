"""train -> ppl_eval -> sample_eval -> resume, through main.py as a user runs it (CPU, tiny model)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

WANDB_MODE = "offline" if importlib.util.find_spec("wandb") else "disabled"
TINY = [
    "experiment=quickstart",
    "model.hidden_size=32",
    "model.cond_dim=16",
    "model.n_blocks=1",
    "model.n_heads=2",
    "model.length=16",
    "data.num_train_sequences=96",
    "data.num_valid_sequences=32",
    "loader.global_batch_size=8",
    "loader.eval_global_batch_size=16",
    "trainer.val_check_interval=4",
    "trainer.num_sanity_val_steps=1",
    "trainer.log_every_n_steps=2",
    "callbacks.checkpoint_every_n_steps.every_n_train_steps=4",
    "sampling.steps=8",
    "sampling.num_sample_log=2",
]


def run_main(run_dir: Path, *overrides: str, check: bool = True, base: list[str] = TINY) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "main.py", *base, f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, run_main(run_dir, "trainer.max_steps=8", f"wandb.mode={WANDB_MODE}")


def test_train_writes_checkpoints_metrics_and_report(trained) -> None:
    run_dir, proc = trained
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "config_train.yaml").is_file()
    assert "CONFIG" in proc.stdout
    (metrics_file,) = (run_dir / "csv").glob("version_*/metrics.csv")
    with open(metrics_file) as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/nll") for r in rows)
    assert any(r.get("val/true_nll") for r in rows)
    assert "true NLL" in proc.stdout and "gap" in proc.stdout
    assert "--- sample" in proc.stdout
    assert (run_dir / "wandb").is_dir() == (WANDB_MODE == "offline")  # offline wandb run, no account needed
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8 and "ema" in ckpt and ckpt["config"]["model"]["hidden_size"] == 32


def test_ppl_eval_writes_results(trained, tmp_path: Path) -> None:
    run_dir, _ = trained
    checkpoint = f"eval.checkpoint_path={run_dir}/checkpoints/last.ckpt"
    proc = run_main(tmp_path, "mode=ppl_eval", checkpoint, "wandb.mode=disabled")
    results = json.loads((tmp_path / "eval_results.json").read_text())
    for key in ("nll", "bpd", "ppl", "num_tokens", "true_nll", "nll_stderr"):
        assert key in results
    assert results["num_tokens"] == 32 * 16
    # Content-only accounting: 32 blocks of [BOS] 14 words [EOS]; the paper's counts BOS and EOS too.
    assert results["content_num_tokens"] == 32 * 14 and results["content_nll"] > 0
    # A bound below the source's exact NLL (beyond Monte-Carlo error) would be a bug.
    assert results["nll"] > results["true_nll"] - 3 * results["gap_stderr"]
    assert "NLL bound" in proc.stdout


def test_sample_eval_writes_jsonl(trained, tmp_path: Path) -> None:
    run_dir, _ = trained
    run_main(
        tmp_path,
        "mode=sample_eval",
        f"eval.checkpoint_path={run_dir}/checkpoints/last.ckpt",
        "sampling.predictor=ddpm",
        "sampling.num_sample_batches=2",
        "loader.eval_global_batch_size=3",
    )
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        assert {"text", "sampler", "steps", "nfe", "seconds", "seed"} <= set(r)
        assert r["sampler"] == "ddpm" and r["steps"] == 8 and r["nfe"] >= 8


def test_resume_continues_the_step_count(trained, tmp_path: Path) -> None:
    run_dir, _ = trained
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoints").mkdir()
    (resumed / "checkpoints" / "last.ckpt").write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    proc = run_main(resumed, "trainer.max_steps=12", "wandb.mode=disabled")
    assert "Resuming from" in proc.stdout
    ckpt = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12
    assert ckpt["ema"]["num_updates"] == 12


def test_bf16_mixed_training_with_clipping(tmp_path: Path) -> None:
    """bf16 autocast (the GPU default) with gradient clipping: optim.fused=auto must not hand Lightning a fused
    optimizer there (it refuses to clip one under mixed precision, at the first step)."""
    proc = run_main(tmp_path, "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0", "trainer.max_steps=2",
                    "trainer.val_check_interval=2", "wandb.mode=disabled")
    assert "Final validation" in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2


def test_unknown_mode_lists_the_modes(tmp_path: Path) -> None:
    proc = run_main(tmp_path, "mode=fit", check=False)
    assert proc.returncode != 0
    assert "Valid modes: ['ppl_eval', 'sample_eval', 'train']" in proc.stderr + proc.stdout


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_main(tmp_path, "mode=ppl_eval", "eval.checkpoint_path=nope/last.ckpt", check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr + proc.stdout


def test_train_on_your_own_text_files(tmp_path: Path) -> None:
    """data=text_files with a folder of .txt files and a tokenizer from a local directory."""
    import numpy as np

    from synthetic import MarkovSource, build_tokenizer

    source = MarkovSource.from_seed(0)
    build_tokenizer(source).save_pretrained(tmp_path / "tokenizer")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = source.sample(40, 30, np.random.default_rng(0))
    for part in range(2):
        docs = [" ".join(source.words[w] for w in row) for row in words[part * 20 : (part + 1) * 20]]
        (corpus / f"part{part}.txt").write_text("\n\n".join(docs))
    run_dir = tmp_path / "run"
    without_experiment = ["model=micro"] + [o for o in TINY if not o.startswith(("experiment=", "data."))]
    proc = run_main(
        run_dir,
        "data=text_files",
        f"data.train_path={corpus}",
        f"data.tokenizer_name_or_path={tmp_path / 'tokenizer'}",
        "trainer.max_steps=4",
        "wandb.mode=disabled",
        base=without_experiment,
    )
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "NLL bound" in proc.stdout and "true NLL" not in proc.stdout


@pytest.mark.parametrize(
    "overrides",
    [
        # Discrete-time MDLM and D3PM go through the same CLI path as SEDD and AR (their losses and samplers
        # are tested in process); -m slow runs them through the CLI too (suite time: docs/testing.md).
        pytest.param(["parameterization=subs", "T=1000"], marks=pytest.mark.slow),
        pytest.param(["parameterization=d3pm", "T=1000", "subs_masking=true", "sampling.predictor=ddpm"],
                     marks=pytest.mark.slow),
        ["parameterization=sedd", "noise=geometric", "sampling.predictor=analytic"],
        ["parameterization=ar", "backbone=ar"],
    ],
    ids=["subs-T1000", "d3pm", "sedd", "ar"],
)
def test_every_parameterization_trains_evaluates_and_samples(tmp_path: Path, overrides: list[str]) -> None:
    run_dir = tmp_path / "run"
    proc = run_main(run_dir, *overrides, "trainer.max_steps=4", "wandb.mode=disabled")
    ar = "parameterization=ar" in overrides
    assert ("  NLL        " if ar else "  NLL bound  ") in proc.stdout and "--- sample" in proc.stdout  # AR: exact
    checkpoint = f"eval.checkpoint_path={run_dir}/checkpoints/last.ckpt"
    run_main(tmp_path / "eval", "mode=ppl_eval", checkpoint, "wandb.mode=disabled", *overrides)
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["nll"] > 0 and results["nll"] == results["nll"]
    # AR scores L - 1 next tokens (EOS among them, BOS never); the diffusion bound all L positions.
    blocks = 32
    assert results["num_tokens"] == blocks * (15 if ar else 16)
    assert results["content_num_tokens"] == blocks * 14


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parameterization=ar"], "algorithm=ar with backbone DiT: it needs a causal backbone: backbone=ar"),
        # Each case is a process start (~8 s); the slow ones are checked in process elsewhere too, or are
        # Hydra's own message.
        pytest.param(["backbone=ar"], "algorithm=mdlm with backbone ARTransformer: it needs a bidirectional backbone",
                     marks=pytest.mark.slow),
        (["parameterization=sedd", "sampling.predictor=ddpm"], "valid choices: ['analytic']"),
        pytest.param(["parameterization=d3pm"], "T=1000", marks=pytest.mark.slow),
        pytest.param(["parameterization=nope"], "Could not find 'algorithm/nope'", marks=pytest.mark.slow),
        pytest.param(["subs_masking=true"], "subs_masking=true is not an option of algorithm=mdlm",
                     marks=pytest.mark.slow),
        (["sampling.predictor=ddpm", "sampler=analytic"], "contradicts sampler=analytic"),
        (["data=ptb"], "(experiment=quickstart sets data keys for its own data set)"),
        (["sampling.var_length=true"], "sampling.var_length=true applies to block diffusion (algorithm=bd3lm)"),
        (["sampling.length=32"], "sampling.length=32 is longer than model.length=16, which algorithm=mdlm fills"),
    ],
)
def test_invalid_combinations_are_rejected_up_front(tmp_path: Path, overrides: list[str], message: str) -> None:
    proc = run_main(tmp_path, *overrides, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout


def final_bound(stdout: str) -> str:
    """The last "NLL bound X" that main.py printed (4 decimals)."""
    return [line.split()[2] for line in stdout.splitlines() if line.strip().startswith("NLL bound")][-1]


def test_change_of_variables_checkpoint_evaluates_as_trained(tmp_path: Path) -> None:
    """ppl_eval of a change_of_variables model gives the bound of the end-of-training validation.

    Before the algorithm's options travelled with the checkpoint, evaluation fed the network sigma
    instead of the uniform variable it was trained on, silently.
    """
    options = ["time_conditioning=true", "training.change_of_variables=true"]
    train = run_main(tmp_path / "run", *options, "trainer.max_steps=8", "wandb.mode=disabled")
    checkpoint = f"eval.checkpoint_path={tmp_path / 'run'}/checkpoints/last.ckpt"
    evaluated = run_main(tmp_path / "eval", "mode=ppl_eval", checkpoint, "wandb.mode=disabled")
    assert "change_of_variables=True" in evaluated.stdout
    assert final_bound(evaluated.stdout) == final_bound(train.stdout)
