"""Surviving crashes and preemption: atomic checkpoint writes, a checkpoint on SIGTERM, resume choice.

- :class:`AtomicCheckpointIO`: every checkpoint is written to a temporary file in its own
  folder, flushed to disk, then renamed over the target (``os.replace``, atomic on POSIX file
  systems). A process killed mid-save (``kill -9``, node failure) leaves the previous
  checkpoint intact. Lightning's default writes through a temporary file in ``/tmp`` and
  *moves* it, which is a copy, not a rename, when ``/tmp`` and the run folder are on
  different file systems (the usual case on a cluster).
- :class:`PreemptionCheckpoint`: on SIGTERM Lightning stops at the next batch boundary with
  ``SIGTERMException``; this callback then writes ``checkpoints/last.ckpt``. Under slurm it also
  takes the requeue signal (``#SBATCH --signal=USR1@120``): it writes ``last.ckpt`` at the next
  batch boundary, runs ``scontrol requeue $SLURM_JOB_ID`` and stops training, so the requeued
  job resumes exactly. (Lightning's own handler, turned off in ``main.build_trainer``, saved
  ``hpc_ckpt_<n>.ckpt`` inside the signal handler, at any point of a step.)
- :func:`resume_checkpoint`: the newest of ``last.ckpt`` and ``hpc_ckpt_*.ckpt``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

TMP_MARKER = ".tmp-"  # temporary checkpoint files are named <target>.tmp-<pid>
# With several processes, whether any rank got the requeue signal is agreed on (an all-reduce, a
# device sync) every this many optimizer steps, not every step; slurm's warning comes minutes ahead.
REQUEUE_CHECK_EVERY = 10


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


class PreemptionCheckpoint(L.Callback):
    """Write ``<dirpath>/last.ckpt`` when training stops on SIGTERM (and only then).

    After a SIGTERM, Lightning finishes the current batch and raises ``SIGTERMException``. The
    checkpoint is written at the end of that batch (``on_train_batch_end``), the same point
    where the periodic checkpoints are written, so resuming from it is exact like resuming from
    those (one process; with several, Lightning raises on all ranks together at the next batch
    start and the checkpoint is written then). A SIGTERM outside a training batch (e.g. during
    validation) saves when the exception arrives. Other exceptions save nothing: a crash in the
    middle of a step could leave a half-updated state, and the last periodic checkpoint is the
    safe place to resume from.
    """

    def __init__(self, dirpath: str | os.PathLike, filename: str = "last", requeue_signal: str = "SIGUSR1") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.requeue_signal = getattr(signal, requeue_signal)
        self._saved_step: int | None = None
        self._requeue_asked = False
        self._last_step = -1
        self._slurm = False  # requeue handling is on (a slurm job), decided once at setup
        self.requeued = False  # training stopped for a slurm requeue (main.py exits non-zero then)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._slurm = stage == "fit" and under_slurm()
        if self._slurm:
            signal.signal(self.requeue_signal, self._ask_requeue)

    def _ask_requeue(self, signum: int, frame: Any) -> None:
        self._requeue_asked = True  # acted on at the end of the batch; nothing else runs in the handler

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # One process only: with several, the flag may be set on some ranks and not yet on others
        # (Lightning broadcasts it at the next batch start), and saving is collective.
        if trainer.world_size == 1 and trainer.received_sigterm:
            self._save(trainer)
        stepped = trainer.global_step != self._last_step  # an optimizer step just ended (not mid-accumulation)
        self._last_step = trainer.global_step
        if not (self._slurm and stepped):
            return
        if trainer.world_size == 1:
            asked = self._requeue_asked
        elif trainer.global_step % REQUEUE_CHECK_EVERY == 0:
            asked = trainer.strategy.reduce_boolean_decision(self._requeue_asked, all=False)
        else:
            return
        if asked:
            self._requeue(trainer)

    def _requeue(self, trainer: L.Trainer) -> None:
        """Save after an optimizer step (exact resume, also with gradient accumulation), ask slurm to
        requeue the job, stop training."""
        self._requeue_asked = False
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step
        trainer.should_stop = True
        self.requeued = True
        if trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ["SLURM_JOB_ID"]
            if os.environ.get("SLURM_ARRAY_TASK_ID"):
                job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            status = "requeued" if result.returncode == 0 else f"requeue failed ({result.stderr.strip()})"
            print(f"Requeue signal: saved {self.path} at step {trainer.global_step}; job {job} {status}.")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and self._saved_step != trainer.global_step:
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step
        if trainer.is_global_zero:
            print(f"SIGTERM: saved {self.path} at step {trainer.global_step}; run the same command to resume.")


def under_slurm() -> bool:
    """A slurm job (not an interactive shell), as Lightning's SLURMEnvironment decides."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def resume_checkpoint(last: Path, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the newest (by modification time) of ``last`` and ``run_dir/hpc_ckpt_*.ckpt``."""
    candidates = [p for p in (last, *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None
