"""Cluster runs: sbatch scripts (syntax, rendered srun commands), the slurm sweep launcher, DDP vs one process."""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from test_main_e2e import TINY, run_main

import main
from config_aliases import translate

SCRIPTS = sorted((ROOT / "scripts" / "slurm").glob("*.sbatch"))
EXPECTED = {
    "train_owt_mdlm", "train_owt_sedd", "train_owt_ar", "train_lm1b_ar", "train_lm1b_d3pm", "eval_owt_mdlm",
    "eval_owt_ar", "eval_owt_sedd", "sample_owt_mdlm", "sample_owt_mdlm_semi_ar",
    "train_owt_bd3lm", "train_lm1b_bd3lm", "eval_owt_bd3lm", "sample_owt_bd3lm",
    "train_lm1b_duo", "train_owt_duo", "distill_owt_duo",
}
NEEDS_CHECKPOINT = ("eval", "train_owt_bd3lm", "train_lm1b_bd3lm", "distill")
SLURM_ENV = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_NAME": "mdlm-owt", "SLURM_JOB_ID": "4242"}


def render(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environment.update(DRY_RUN="1", **(env or {}))
    return subprocess.run(["bash", str(script), *args], cwd=ROOT, env=environment, capture_output=True, text=True)


def test_every_paper_run_has_a_script() -> None:
    assert {s.stem for s in SCRIPTS} == EXPECTED


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.stem)
def test_script_syntax_and_rendered_command(script: Path, tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text
    args = ["/ckpt/last.ckpt"] if script.stem.startswith(NEEDS_CHECKPOINT) else []
    proc = render(script, *args, env=SLURM_ENV)
    assert proc.returncode == 0, proc.stderr
    command = shlex.split(proc.stdout)
    assert command[:4] == ["srun", "python", "-u", "main.py"]
    overrides = command[4:]
    assert "hydra.run.dir=outputs/mdlm-owt/4242" in overrides  # a requeued job resumes in the same folder
    if script.stem.startswith(("train", "eval", "distill")):
        assert "trainer.num_nodes=2" in overrides and "trainer.devices=8" in overrides
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=translate([o for o in overrides if not o.startswith("hydra.")]
                                                    + [f"checkpointing.save_dir={tmp_path}"]), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        main.validate_config(cfg)
    if script.stem.startswith("eval"):
        assert cfg.mode == "ppl_eval" and cfg.eval.checkpoint_path == "/ckpt/last.ckpt"
    if "bd3lm" in script.stem and script.stem.startswith("train"):  # fine-tuned from an MDLM, as in the paper
        assert cfg.training.from_pretrained == "/ckpt/last.ckpt" and cfg.training.clip_search_widths
        assert cfg.block_size == 16 and cfg.algorithm._target_ == "block_diffusion.BD3LM"
    if "duo" in script.stem:  # the reference's recipes: the curriculum for 500K of 1M steps; distilled in 5 rounds
        if script.stem.startswith("train"):
            assert cfg.algorithm._target_ == "uniform_diffusion.DUO" and cfg.algorithm.curriculum_end == 500_000
            assert cfg.trainer.max_steps == 1_000_000 and cfg.sampling.steps == 1024
        else:
            assert cfg.algorithm._target_ == "distillation.DUODistill" and cfg.algorithm.T == 512
            assert cfg.training.from_pretrained == "/ckpt/last.ckpt" and cfg.sampling.steps == 8
            assert cfg.trainer.max_steps == 5 * cfg.algorithm.update_teacher_every
    if "semi_ar" in script.stem:
        assert cfg.sampling.semi_ar and cfg.model.length + cfg.sampling.num_strides * cfg.sampling.stride_length == 2048


def test_eval_scripts_need_a_checkpoint() -> None:
    proc = render(ROOT / "scripts" / "slurm" / "eval_owt_mdlm.sbatch")
    assert proc.returncode == 2 and "usage: sbatch" in proc.stderr


def test_slurm_sweep_launcher_config_composes(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "experiment=lm1b_mdlm",
                                           f"checkpointing.save_dir={tmp_path}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0 and launcher.tasks_per_node == 8


# --------------------------------------------------------------------------- DDP vs one process
LOSS_RUN = [*TINY, "wandb.mode=disabled", "trainer.max_steps=60", "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=1000", "sampling.num_sample_log=0", "data.num_train_sequences=480",
            "trainer.accelerator=cpu", "lr_scheduler.num_warmup_steps=5"]
# Same data order and global batch, different noise (each process draws its own): the curves
# agree only statistically. Stated tolerance: the mean training loss over the last 20 of 60 steps
# within 5% and the final validation NLL within 0.1 nats.
LOSS_TOLERANCE, NLL_TOLERANCE = 0.05, 0.1


def loss_curve(run_dir: Path) -> list[float]:
    (metrics,) = (run_dir / "csv").glob("version_*/metrics.csv")
    with open(metrics) as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def final_nll(proc: subprocess.CompletedProcess) -> float:
    line = next(line for line in proc.stdout.splitlines() if "NLL bound" in line)
    return float(line.split()[2])


def test_two_ddp_processes_train_like_one(tmp_path: Path) -> None:
    one = run_main(tmp_path / "one", *LOSS_RUN, "trainer.devices=1")
    two = run_main(tmp_path / "two", *LOSS_RUN, "trainer.devices=2", "strategy=ddp")
    curve_one, curve_two = loss_curve(tmp_path / "one"), loss_curve(tmp_path / "two")
    assert len(curve_one) == len(curve_two) == 60
    late_one, late_two = sum(curve_one[-20:]) / 20, sum(curve_two[-20:]) / 20
    assert abs(late_one - late_two) <= LOSS_TOLERANCE * late_one, (late_one, late_two)
    assert abs(final_nll(one) - final_nll(two)) <= NLL_TOLERANCE
    assert late_one < sum(curve_one[:10]) / 10 and late_two < sum(curve_two[:10]) / 10  # both learn


@pytest.mark.gpu
def test_fsdp_trains_with_ema_and_resumes_exactly(tmp_path: Path) -> None:
    """strategy=fsdp (Lightning: CUDA only) with EMA and gradient clipping through FSDP's global norm, on up
    to 2 GPUs: a run stopped at step 4 and resumed to 8 ends where the straight run does (EMA included),
    and the checkpoint (full EMA tensors) evaluates in one process. The CPU round trips of the sharded
    EMA are tests/test_fsdp_ema.py."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("FSDP needs CUDA in Lightning")
    devices = min(2, torch.cuda.device_count())
    fsdp = ["strategy=fsdp", "training.ema=0.9", "trainer.accelerator=cuda", f"trainer.devices={devices}",
            "trainer.gradient_clip_val=0.5", "wandb.mode=disabled", "sampling.num_sample_log=0",
            "trainer.val_check_interval=1000", "callbacks.checkpoint_every_n_steps.every_n_train_steps=1"]
    run_main(tmp_path / "straight", *fsdp, "trainer.max_steps=8")
    run_main(tmp_path / "resumed", *fsdp, "trainer.max_steps=4")
    proc = run_main(tmp_path / "resumed", *fsdp, "trainer.max_steps=8")
    assert "Resuming from" in proc.stdout and "Final validation" in proc.stdout
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for run in ("straight", "resumed"))
    assert a["global_step"] == b["global_step"] == 8
    # CUDA kernels (atomics in the backward) are not bit-reproducible run to run: compare closely.
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-4, atol=1e-5)
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    proc = run_main(tmp_path / "eval", "mode=ppl_eval", f"eval.checkpoint_path={checkpoint}", "trainer.devices=1",
                    "strategy=ddp", "trainer.accelerator=cuda")
    assert "EMA weights" in proc.stdout  # the full EMA tensors loaded into an unsharded model


def test_sourcing_setup_restores_the_callers_shell_options() -> None:
    """`source scripts/setup.sh` used to leave an interactive shell in `set -euo pipefail`, so the
    next failing command closed the user's terminal."""
    script = ("source scripts/setup.sh >/dev/null 2>&1; echo \"flags=$-\"; shopt -po pipefail")
    loose = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "set +o pipefail" in loose.stdout and not any(f in loose.stdout.split("flags=")[1].split()[0] for f in "eu")
    strict = subprocess.run(["bash", "-c", "set -euo pipefail; " + script], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    flags = strict.stdout.split("flags=")[1].split()[0]
    assert "set -o pipefail" in strict.stdout and "e" in flags and "u" in flags
