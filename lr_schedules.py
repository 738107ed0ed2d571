"""Learning-rate schedules as multiplicative factors on ``optim.lr`` (one config file each).

``configs/lr_scheduler/constant_warmup.yaml`` uses transformers' constant schedule with
warm-up; the cosine schedule of the paper's AR/long runs is defined here because its warm-up
is a fraction of ``trainer.max_steps`` (no arithmetic in configs).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def cosine_decay_warmup(
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    warmup_fraction: float = 0.1,
    warmup_lr_init: float = 1e-6,
    lr_min: float = 1e-6,
) -> LambdaLR:
    """Linear warm-up from ``warmup_lr_init`` to the base LR, then cosine decay to ``lr_min``.

    With W = round(warmup_fraction * max_steps) and base LR ``lr``, at step n:

        n <  W:  lr_n = warmup_lr_init + (lr - warmup_lr_init) n / W
        n >= W:  lr_n = lr_min + (lr - lr_min) (1 + cos(pi min(1, (n - W) / (max_steps - W)))) / 2
    """
    if max_steps < 1:
        raise ValueError(f"cosine_decay_warmup needs trainer.max_steps >= 1, got {max_steps}.")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"lr_scheduler.warmup_fraction must be in [0, 1), got {warmup_fraction}.")
    warmup = round(warmup_fraction * max_steps)
    base_lrs = [group["lr"] for group in optimizer.param_groups]

    def factor_for(base_lr: float):
        def factor(step: int) -> float:
            if step < warmup:
                return (warmup_lr_init + (base_lr - warmup_lr_init) * step / warmup) / base_lr
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return (lr_min + (base_lr - lr_min) * 0.5 * (1 + math.cos(math.pi * progress))) / base_lr

        return factor

    return LambdaLR(optimizer, [factor_for(lr) for lr in base_lrs])
