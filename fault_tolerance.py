"""Surviving crashes and preemption: atomic checkpoint writes, a checkpoint on SIGTERM, resume choice.

- :class:`AtomicCheckpointIO`: every checkpoint is written to a temporary file in its own
  folder, flushed to disk, then renamed over the target (``os.replace``, atomic on POSIX file
  systems). A process killed mid-save (``kill -9``, node failure) leaves the previous
  checkpoint intact. Lightning's default writes through a temporary file in ``/tmp`` and
  *moves* it, which is a copy, not a rename, when ``/tmp`` and the run folder are on
  different file systems (the usual case on a cluster).
- :class:`PreemptionCheckpoint`: on SIGTERM, and under slurm on the requeue signal
  (``#SBATCH --signal=USR1@120``), all processes agree to stop after the current optimizer step
  (or validation batch), write ``checkpoints/last.ckpt`` together and raise
  :class:`TrainingStopped`; the requeue signal also runs ``scontrol requeue $SLURM_JOB_ID``.
  Resuming from that checkpoint is exact, with one process or several. (Lightning's own
  handlers are replaced: its requeue handler saved ``hpc_ckpt_<n>.ckpt`` inside the signal
  handler at any point of a step, and its SIGTERM handler hung multi-process runs.)
- :func:`resume_checkpoint`: the newest of ``last.ckpt`` and ``hpc_ckpt_*.ckpt``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

TMP_MARKER = ".tmp-"  # temporary checkpoint files are named <target>.tmp-<pid>


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<path>.tmp-<pid>`` in the same folder, fsync, then ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options; got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}{TMP_MARKER}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)  # make the rename itself durable


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. a file system that cannot open folders
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class TrainingStopped(Exception):
    """Training stopped on a signal after ``last.ckpt`` was written; ``main.py`` exits with 128 + ``signum``."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}: saved {path}")
        self.signum, self.step, self.path = signum, step, path


class PreemptionCheckpoint(L.Callback):
    """Write ``<dirpath>/last.ckpt`` and stop when SIGTERM (or, under slurm, the requeue signal) arrives.

    The signal handlers are ours and only set a flag; Lightning's SIGTERM handler is replaced for
    the training run. (Lightning's broadcasts from inside the handler and raises per process at
    the end of a batch; with several processes a SIGTERM to one of them, or to all at slightly
    different times, left the ranks in different collectives and the run hung.)

    The flag is acted on at a point every process reaches in the same order:

    - after an optimizer step (``on_train_batch_end`` when ``global_step`` moved, so never in the
      middle of gradient accumulation). The periodic checkpoints are written at the same point,
      so resuming from this one is as exact as resuming from those;
    - after a validation batch during ``fit`` (periodic validation, the sanity check), so a long
      validation does not use up the grace period. Resuming re-runs that validation and then
      continues training exactly (training noise is seeded per batch, not drawn from a stream
      that validation advances).

    With several processes the flags are summed over ranks there (one all-reduce of two numbers
    per optimizer step; Lightning itself broadcasts a flag before every batch); validation batches
    are checked only up to the number that every rank runs (the shards may differ by one batch).
    All ranks then save together and raise :class:`TrainingStopped`. The requeue signal also runs
    ``scontrol requeue`` (rank 0). Other exceptions save nothing: a crash in the middle of a step
    could leave a half-updated state, and the last periodic checkpoint is the safe place to resume.
    """

    def __init__(self, dirpath: str | os.PathLike, filename: str = "last", requeue_signal: str = "SIGUSR1") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.requeue_signal = getattr(signal, requeue_signal)
        self._asked: set[int] = set()  # signals received and not yet acted on
        self._last_step = -1
        self._slurm = False  # requeue handling is on (a slurm job), decided once at setup
        self._val_batches = 0  # validation batches seen in the current validation run
        self._val_common = 0  # ... of which every rank runs this many

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._slurm = stage == "fit" and under_slurm()

    def _install(self) -> None:
        """Take SIGTERM (and the requeue signal) over from Lightning, which registers its handlers after
        ``setup``/``on_fit_start``; its teardown restores the handlers that were there before it."""
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_signal)
        if self._slurm:
            signal.signal(self.requeue_signal, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._asked.add(signum)  # acted on at the next agreed point; nothing else runs in the handler

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self._last_step:
            return  # inside gradient accumulation: wait for the optimizer step
        self._last_step = trainer.global_step
        self._act(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_batches = 0
        batches = int(sum(trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches))
        if trainer.world_size > 1 and trainer.state.fn == "fit":
            count = torch.tensor([batches], device=trainer.strategy.root_device)
            batches = int(trainer.strategy.reduce(count, reduce_op="min").item())
        self._val_common = batches

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._val_batches += 1
        if trainer.state.fn == "fit" and self._val_batches <= self._val_common:
            self._act(trainer)

    def _act(self, trainer: L.Trainer) -> None:
        asked = [signal.SIGTERM in self._asked, self.requeue_signal in self._asked]
        if trainer.world_size > 1:
            flags = torch.tensor(asked, dtype=torch.int32, device=trainer.strategy.root_device)
            asked = (trainer.strategy.reduce(flags, reduce_op="sum") > 0).tolist()  # any rank
        stop, requeue = asked
        if not (stop or requeue):
            return
        self._asked.clear()
        trainer.save_checkpoint(self.path)
        signum = signal.SIGTERM if stop else self.requeue_signal
        if trainer.is_global_zero:
            print(f"{signal.Signals(signum).name}: saved {self.path} at step {trainer.global_step}.")
            if not stop:
                self._requeue()
        raise TrainingStopped(signum, trainer.global_step, self.path)

    @staticmethod
    def _requeue() -> None:
        job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ["SLURM_JOB_ID"]
        if os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        status = "requeued" if result.returncode == 0 else f"requeue failed ({result.stderr.strip()})"
        print(f"Job {job} {status}.")


def under_slurm() -> bool:
    """A slurm job (not an interactive shell), as Lightning's SLURMEnvironment decides."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def resume_checkpoint(last: Path, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the newest (by modification time) of ``last`` and ``run_dir/hpc_ckpt_*.ckpt``."""
    candidates = [p for p in (last, *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None
