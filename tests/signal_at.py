"""A test helper callback: send a real signal to this process at a chosen point of a training run.

Added to a run with Hydra overrides (the test puts ``tests/`` on ``PYTHONPATH``)::

    +callbacks.signal_at._target_=signal_at.SignalAt +callbacks.signal_at.signal=SIGTERM
    +callbacks.signal_at.hook=validation_batch +callbacks.signal_at.step=4 +callbacks.signal_at.rank=1

It makes the moment of a preemption reproducible (in the middle of gradient accumulation, during a
validation, on one rank only), which polling a run from outside cannot. The signal is delivered by
the kernel to the real handler, as ``kill`` would.
"""

from __future__ import annotations

import os
import signal as signal_module
from typing import Any

import lightning as L

HOOKS = ("train_batch", "validation_batch")


class SignalAt(L.Callback):
    """Send ``signal`` once, at the start of the first ``hook`` batch (``train_batch`` / ``validation_batch``)
    with ``global_step == step`` and ``batch_idx >= batch``, on process ``rank``."""

    def __init__(self, signal: str, hook: str, step: int, rank: int = 0, batch: int = 0) -> None:
        if hook not in HOOKS:
            raise ValueError(f"hook={hook!r}; valid choices: {list(HOOKS)}")
        self.signum = getattr(signal_module, signal)
        self.hook, self.step, self.rank, self.batch = hook, step, rank, batch
        self.sent = False

    def _maybe_send(self, trainer: L.Trainer, hook: str, batch_idx: int) -> None:
        if self.sent or hook != self.hook or trainer.sanity_checking:
            return
        if trainer.global_rank == self.rank and trainer.global_step == self.step and batch_idx >= self.batch:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._maybe_send(trainer, "train_batch", batch_idx)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._maybe_send(trainer, "validation_batch", batch_idx)

