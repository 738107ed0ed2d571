"""Exponential moving average of parameters, stored in checkpoints under the key ``ema``.

The state dict has the original MDLM layout (``decay``, ``num_updates``, ``shadow_params``,
``collected_params``), so released checkpoints' EMA weights load directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
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


# --------------------------------------------------------------------------- sharded (FSDP) parameters
# Under FSDP (use_orig_params=True) each parameter is a view of this process's shard of a flat
# parameter, so an EMA built from those views is sharded the same way: update, copy_to, store and
# restore work shard by shard, and the EMA costs 1/world_size of the weights per process. Only its
# checkpoint needs the full tensors; they are gathered and scattered by FSDP itself, with the
# shards put in the parameters' places for the duration (the weights are put back afterwards).
FSDP_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter's name without the wrappers' prefixes: the key of a full state dict."""
    for prefix in FSDP_PREFIXES:
        name = name.replace(prefix, "")
    return name


@contextlib.contextmanager
def _weights_kept(params: list[nn.Parameter]) -> Iterator[None]:
    """Whatever the block writes into ``params``, their weights are put back after it."""
    kept = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, k in zip(params, kept, strict=True):
                p.copy_(k)


def _full_state_dict_type(root: nn.Module, rank0_only: bool) -> contextlib.AbstractContextManager:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    on_gpu = any(p.is_cuda for p in root.parameters())  # offloading a CPU state dict to the CPU crashes torch
    config = FullStateDictConfig(offload_to_cpu=on_gpu, rank0_only=rank0_only)
    return FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config)


def gather_shards(root: nn.Module, params: dict[str, nn.Parameter], shards: list[Tensor]) -> list[Tensor]:
    """The full tensors whose local shards are ``shards`` (one per parameter of ``params``, in order),
    on rank 0 (on the CPU when training on GPUs); an empty list on the other ranks. Collective: every
    rank calls it. ``root`` is the outermost FSDP module, ``params`` its parameters by clean name."""
    targets = list(params.values())
    with _weights_kept(targets), _full_state_dict_type(root, rank0_only=True):
        with torch.no_grad():
            for p, shard in zip(targets, shards, strict=True):
                p.copy_(shard)
        state = root.state_dict()
    if not state:
        return []
    missing = [name for name in params if name not in state]
    if missing:
        raise RuntimeError(f"FSDP's full state dict lacks {missing[:3]} (keys like {list(state)[:3]}).")
    return [state[name].detach().clone() for name in params]


def scatter_full(root: nn.Module, params: dict[str, nn.Parameter], full: list[Tensor]) -> list[Tensor]:
    """This rank's shards of the full tensors ``full`` (one per parameter of ``params``, in order).
    Collective: every rank calls it with the same full tensors."""
    targets = list(params.values())
    with _weights_kept(targets), _full_state_dict_type(root, rank0_only=False):
        # strict=False: buffers are not part of an EMA; a wrong shape is still an error.
        result = root.load_state_dict(dict(zip(params, full, strict=True)), strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"FSDP did not recognise {result.unexpected_keys[:3]}.")
        return [p.detach().clone() for p in targets]
