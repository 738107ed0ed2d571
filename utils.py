"""Small shared helpers: config printing, device and batch-size planning, checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rich
import rich.syntax
import rich.tree
import torch
from omegaconf import DictConfig, OmegaConf


def print_config_tree(cfg: DictConfig, save_path: Path | None = None) -> None:
    """Print the resolved config as a tree (one branch per top-level key); save it as YAML."""
    tree = rich.tree.Tree("CONFIG", style="bold", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold")
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rich.print(tree)
    if save_path is not None:
        save_path.parent.mkdir(parents=True, exist_ok=True)
        save_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def resolve_accelerator(accelerator: str, devices: int | str) -> tuple[str, int]:
    """'auto' picks CUDA when available, else CPU; devices 'auto' takes every GPU (or 1 CPU)."""
    valid = ("auto", "cpu", "cuda", "gpu")
    if accelerator not in valid:
        raise ValueError(f"trainer.accelerator={accelerator!r} is not one of {valid}.")
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu":
        accelerator = "cuda"
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.accelerator=cuda but no CUDA device is visible; use trainer.accelerator=auto or cpu.")
    if devices == "auto":
        devices = torch.cuda.device_count() if accelerator == "cuda" else 1
    devices = int(devices)
    if devices < 1:
        raise ValueError(f"trainer.devices must be a positive integer or 'auto', got {devices}.")
    return accelerator, devices


def default_precision(accelerator: str) -> str:
    """bf16 autocast on CUDA (fp16 would overflow the -1e6 mask logit), fp32 on CPU."""
    if accelerator == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is split: per-device micro-batch times devices times accumulation."""

    per_device: int
    accumulate: int
    world_size: int

    @property
    def global_size(self) -> int:
        return self.per_device * self.accumulate * self.world_size


def plan_batches(global_batch_size: int, world_size: int, per_device: int | None = None) -> BatchPlan:
    """Split ``global_batch_size`` over ``world_size`` processes.

    Without ``per_device`` every process gets ``global / world`` and no accumulation; with it,
    gradient accumulation makes up the rest. The split must be exact, so that the global
    batch (and hence the optimization) is the same on any number of devices.
    """
    if global_batch_size < 1 or world_size < 1:
        raise ValueError(f"Need positive sizes, got global_batch_size={global_batch_size}, world_size={world_size}.")
    if per_device is None:
        if global_batch_size % world_size:
            raise ValueError(
                f"loader.global_batch_size={global_batch_size} is not divisible by {world_size} processes "
                "(devices x nodes); change it or set loader.batch_size."
            )
        per_device = global_batch_size // world_size
    if per_device < 1 or global_batch_size % (per_device * world_size):
        raise ValueError(
            f"loader.global_batch_size={global_batch_size} is not a multiple of loader.batch_size={per_device} "
            f"x {world_size} processes; choose sizes whose product divides the global batch."
        )
    return BatchPlan(per_device, global_batch_size // (per_device * world_size), world_size)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
