"""Crashes and preemption: atomic checkpoint writes, kill -9 during a save, SIGTERM, exact resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_main_e2e import TINY, run_main
from test_resume import RESUME, assert_same_training_state, final_state

from fault_tolerance import TMP_MARKER, AtomicCheckpointIO, resume_checkpoint

# Bigger than the e2e default so that a checkpoint takes a few milliseconds to write.
KILL_RUN = [*RESUME, "model.hidden_size=128", "model.n_blocks=2", "model.n_heads=4", "trainer.max_steps=30"]


def test_atomic_save_keeps_the_old_checkpoint_when_a_save_fails(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)

    def broken_save(obj, f) -> None:
        f.write(b"partial bytes")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_resume_picks_the_newest_checkpoint(tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert resume_checkpoint(last, tmp_path) is None
    last.parent.mkdir()
    last.write_bytes(b"x")
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"y")
    os.utime(last, ns=(1, 1))
    assert resume_checkpoint(last, tmp_path) == hpc
    os.utime(hpc, ns=(0, 0))
    assert resume_checkpoint(last, tmp_path) == last


def start_training(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "main.py", *TINY, f"hydra.run.dir={run_dir}", *KILL_RUN]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0, poll: float = 0.0005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended (exit {process.returncode}) first:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(poll)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_main(run_dir, *KILL_RUN)
    return final_state(run_dir)


def test_kill_9_during_a_save_then_resume(tmp_path: Path, uninterrupted: dict) -> None:
    checkpoints = tmp_path / "checkpoints"
    process = start_training(tmp_path)
    wait_for(lambda: (checkpoints / "last.ckpt").is_file(), process)

    def saving() -> bool:
        return checkpoints.is_dir() and any(TMP_MARKER in p.name for p in checkpoints.iterdir())

    wait_for(saving, process)
    process.send_signal(signal.SIGKILL)  # in the middle of writing the next last.ckpt
    process.wait()
    assert any(TMP_MARKER in p.name for p in checkpoints.iterdir())  # the half-written file
    survivor = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert 1 <= survivor["global_step"] < 30
    proc = run_main(tmp_path, *KILL_RUN)
    assert "Resuming from" in proc.stdout
    assert_same_training_state(uninterrupted, final_state(tmp_path))


def test_sigterm_saves_a_checkpoint_and_resume_is_exact(tmp_path: Path, uninterrupted: dict) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    process = start_training(tmp_path)
    wait_for(lambda: last.is_file() and torch.load(last, weights_only=True)["global_step"] >= 3, process, poll=0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert "SIGTERM: saved" in output, output[-3000:]
    # A preempted run is not a finished one: it exits as killed by SIGTERM, so job chains and
    # schedulers see it (before the fix it exited 0).
    assert process.returncode == 128 + signal.SIGTERM, (process.returncode, output[-3000:])
    stopped = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 3 <= stopped < 30
    run_main(tmp_path, *KILL_RUN)
    assert_same_training_state(uninterrupted, final_state(tmp_path))


@pytest.fixture(scope="module")
def uninterrupted_accumulating(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference run with gradient accumulation (2 micro-batches of 4 per step)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted_accumulating")
    run_main(run_dir, *KILL_RUN, "loader.batch_size=4")
    return final_state(run_dir)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_slurm_requeue_signal_saves_requeues_and_resumes_exactly(
    tmp_path: Path, accumulate: int, request: pytest.FixtureRequest
) -> None:
    """Under slurm (faked: SLURM_* variables, a recording `scontrol`): USR1 -> last.ckpt after an optimizer
    step, `scontrol requeue`, exit 138 -> the requeued command resumes to the uninterrupted weights, with
    and without gradient accumulation.

    (Lightning's own handler wrote hpc_ckpt inside the signal handler, at any point of a step: the
    resume completed but was not bit-exact.)"""
    extra = ["loader.batch_size=4"] if accumulate == 2 else []
    uninterrupted = request.getfixturevalue("uninterrupted_accumulating" if accumulate == 2 else "uninterrupted")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mdlm",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run_dir = tmp_path / "run"
    env = {**os.environ, **slurm, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "main.py", *TINY, f"hydra.run.dir={run_dir}", *KILL_RUN, *extra]
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for(lambda: last.is_file() and torch.load(last, weights_only=True)["global_step"] >= 3, process, poll=0.05)
    process.send_signal(signal.SIGUSR1)  # slurm's warning before the time limit (#SBATCH --signal=USR1@120)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR1, output[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "Requeue signal: saved" in output and not list(run_dir.glob("hpc_ckpt_*.ckpt"))
    stopped = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 3 <= stopped < 30
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"Resuming from {last}" in proc.stdout
    assert_same_training_state(uninterrupted, final_state(run_dir))


def kill_during_a_save(run_dir: Path, complete_saves: int) -> tuple[int, int]:
    """Train, wait for ``complete_saves`` saved steps, then SIGKILL while the next checkpoint is written.

    Returns (the step of the newest complete last.ckpt seen before the kill, the step of the survivor).
    """
    checkpoints = run_dir / "checkpoints"
    process = start_training(run_dir)
    seen = -1

    def saved_enough() -> bool:
        nonlocal seen
        if (checkpoints / "last.ckpt").is_file():
            try:
                step = torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
                seen = max(seen, step)
            except Exception:  # noqa: BLE001 - replaced while it was read: look again
                pass
        return seen >= complete_saves

    def saving() -> bool:
        return checkpoints.is_dir() and any(TMP_MARKER in p.name for p in checkpoints.iterdir())

    wait_for(saved_enough, process, poll=0.01)
    wait_for(saving, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return seen, torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_twenty_kill_9_trials_during_checkpoint_writes_all_resume(tmp_path: Path, uninterrupted: dict) -> None:
    """20 runs killed with SIGKILL while a checkpoint is being written (after the 1st to 5th save), each
    resumed by the same command: every one resumes, none goes back beyond the last complete checkpoint,
    and every resumed run ends with the uninterrupted run's weights."""
    resumed = 0
    for trial in range(20):
        run_dir = tmp_path / f"trial{trial}"
        seen, survivor = kill_during_a_save(run_dir, 1 + trial % 5)
        assert survivor >= seen, (trial, survivor, seen)
        proc = run_main(run_dir, *KILL_RUN)
        assert "Resuming from" in proc.stdout
        assert_same_training_state(uninterrupted, final_state(run_dir))
        resumed += 1
    print(f"\n{resumed}/20 kill -9 trials resumed to the uninterrupted weights")
    assert resumed == 20
