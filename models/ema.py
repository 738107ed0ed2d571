"""Exponential moving average of parameters, stored in checkpoints under the key ``ema``.

The state dict has the original MDLM layout (``decay``, ``num_updates``, ``shadow_params``,
``collected_params``), so released checkpoints' EMA weights load directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


class ExponentialMovingAverage:
    """shadow <- d * shadow + (1 - d) * param after each optimizer step.

    With ``use_num_updates`` the decay warms up as ``d = min(decay, (1 + n) / (10 + n))``
    after n updates, so that short runs get a useful average.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float, use_num_updates: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"training.ema must be in [0, 1], got {decay}.")
        self.decay = decay
        self.num_updates: int | None = 0 if use_num_updates else None
        self.shadow_params = [p.detach().clone() for p in parameters if p.requires_grad]
        self.collected_params: list[Tensor] = []

    def _trainable(self, parameters: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        params = [p for p in parameters if p.requires_grad]
        if len(params) != len(self.shadow_params):
            raise ValueError(
                f"EMA holds {len(self.shadow_params)} tensors but got {len(params)} parameters."
            )
        return params

    @torch.no_grad()
    def update(self, parameters: Iterable[nn.Parameter]) -> None:
        params = self._trainable(parameters)
        decay = self.decay
        if self.num_updates is not None:
            self.num_updates += 1
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        if self.shadow_params[0].device != params[0].device:
            self.shadow_params = [s.to(params[0].device) for s in self.shadow_params]
        torch._foreach_lerp_(self.shadow_params, [p.detach() for p in params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        """Write the averaged weights into ``parameters``."""
        for s, p in zip(self.shadow_params, self._trainable(parameters), strict=True):
            p.copy_(s)

    @torch.no_grad()
    def store(self, parameters: Iterable[nn.Parameter]) -> None:
        """Keep a copy of the current weights, to be put back by :meth:`restore`."""
        self.collected_params = [p.detach().clone() for p in parameters if p.requires_grad]

    @torch.no_grad()
    def restore(self, parameters: Iterable[nn.Parameter]) -> None:
        if not self.collected_params:
            raise RuntimeError("EMA.restore() called without a matching store().")
        for c, p in zip(self.collected_params, self._trainable(parameters), strict=True):
            p.copy_(c)
        self.collected_params = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow_params": self.shadow_params,
            "collected_params": self.collected_params,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow_params"]
        if len(shadow) != len(self.shadow_params):
            raise ValueError(
                f"EMA state has {len(shadow)} tensors, the model has {len(self.shadow_params)}: "
                "the checkpoint was made with a different model."
            )
        for mine, theirs in zip(self.shadow_params, shadow, strict=True):
            if mine.shape != theirs.shape:
                raise ValueError(f"EMA tensor shape {tuple(theirs.shape)} != model's {tuple(mine.shape)}.")
        self.decay = float(state["decay"])
        self.num_updates = state["num_updates"]
        self.shadow_params = [
            t.detach().clone().to(mine.device) for t, mine in zip(shadow, self.shadow_params, strict=True)
        ]
        self.collected_params = list(state.get("collected_params") or [])
