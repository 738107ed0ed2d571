"""Small shared helpers: config printing, device and batch-size planning, checkpoints."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rich
import rich.syntax
import rich.tree
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm


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


def progress_line(done: int, total: int, elapsed: float, prefix: str, unit: str = "it") -> str:
    """A tqdm meter as one printed line, e.g. ``ppl_eval: 33%|███▎      | 1/3 [00:42<01:24, 42.00s/data set]``.

    For an outer loop whose steps print (results, inner bars such as Lightning's validation bar or
    a data-cache build): a live bar redraws its terminal line in place, and every print between two
    of its updates breaks it. A line printed per step survives them, and reads the same in a log file.
    """
    return tqdm.format_meter(done, total, elapsed, ncols=100, prefix=prefix, unit=unit)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPU cores this process may use: its affinity mask, capped by the cgroup's CPU quota.

    ``os.cpu_count()`` counts the machine's logical CPUs, which in a container or under slurm is
    often more than the job may use; more threads than cores then slow every matrix product down.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def configure_cpu_threads(processes: int = 1, cpu_max: Path = CGROUP_CPU_MAX) -> str:
    """Set torch's intra-op threads to the available cores / ``processes``; returns a line for the banner.

    ``OMP_NUM_THREADS`` set by the user wins (it is left as it is).
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return f"CPU threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    cores = available_cpus(cpu_max)
    threads = max(1, cores // max(1, processes))
    torch.set_num_threads(threads)
    return (f"CPU threads: {threads} per process ({cores} cores available, {processes} process(es); "
            "set OMP_NUM_THREADS to choose)")


GIB = 2**30


def available_memory() -> int | None:
    """Bytes of memory this process can still get: MemAvailable, capped by the cgroup's limit; None if unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max" and available is not None:
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


# Copies of the (B, L, V) float32 logits alive at the peak of a step: the output, its float / masked
# copy and the log-softmax (evaluation, sampling); training adds their gradients.
LOGITS_COPIES = {"eval": 4, "train": 8}


def check_logits_memory(batch: int, length: int, vocab_size: int, key: str, stage: str,
                        available: int | None = None, hint: str = "") -> None:
    """Refuse, before anything is allocated, a per-process batch whose logits alone exceed the memory.

    ``key`` names the option that sets ``batch`` (``loader.batch_size`` / ``loader.eval_batch_size``).
    For CPU runs: a GPU reports its own out-of-memory error, with the same cure.
    """
    available = available_memory() if available is None else available
    need = batch * length * vocab_size * 4 * LOGITS_COPIES[stage]
    if available is None or need <= available:
        return
    fits = max(1, batch * available // (2 * need))  # half the memory for the logits, the rest for everything else
    raise ValueError(
        f"{key}={batch} needs about {need / GIB:.1f} GiB for the ({batch}, {length}, {vocab_size}) logits of one "
        f"{'training step' if stage == 'train' else 'evaluation batch'} alone, and {available / GIB:.1f} GiB of memory "
        f"is available. Set {key}={fits} (or smaller){hint}, or use trainer=cpu for CPU-sized defaults."
    )


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


FULL_PRECISIONS = ("32", "32-true", "64", "64-true")  # Lightning precisions without autocast or a grad scaler


def resolve_precision(precision: str | int, accelerator: str) -> str:
    """``trainer.precision``, with ``auto`` resolved by :func:`default_precision`."""
    return default_precision(accelerator) if precision == "auto" else str(precision)


def fused_adamw(fused: bool | str, precision: str, clip: float | None) -> bool | None:
    """The ``fused`` argument of ``torch.optim.AdamW`` for ``optim.fused``: True (torch's one-kernel update) or
    None (torch's default implementation).

    ``auto``: fused in full precision only. Under a mixed precision Lightning clips gradients before the step,
    which a fused optimizer does not allow (it unscales gradients inside its step), so ``true`` with a mixed
    precision and ``trainer.gradient_clip_val`` is an error rather than a failure at the first step.
    """
    if fused == "auto":
        return True if precision in FULL_PRECISIONS else None
    if fused not in (True, False):
        raise ValueError(f"optim.fused={fused!r}; valid choices: auto, true, false")
    if fused and clip and precision not in FULL_PRECISIONS:
        raise ValueError(f"optim.fused=true with trainer.precision={precision} and trainer.gradient_clip_val={clip}: "
                         "Lightning cannot clip the gradients of a fused optimizer under mixed precision. "
                         "Use optim.fused=auto (fused in full precision only) or false.")
    return True if fused else None


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
    """Split the training batch ``loader.global_batch_size`` over ``world_size`` processes.

    Without ``per_device`` (``loader.batch_size``) every process gets ``global / world`` and no
    accumulation; with it, gradient accumulation makes up the rest. The split must be exact, so
    that the global batch (and hence the optimization) is the same on any number of devices.
    """
    if global_batch_size < 1 or world_size < 1:
        raise ValueError(f"Need positive sizes, got loader.global_batch_size={global_batch_size}, "
                         f"world_size={world_size}.")
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


def plan_eval_batches(eval_global_batch_size: int, world_size: int, per_device: int | None = None) -> BatchPlan:
    """The evaluation batch per process: ``loader.eval_batch_size`` when given, else the global
    ``loader.eval_global_batch_size`` split over ``world_size`` processes (exactly).

    Evaluation accumulates nothing, so a given per-process size needs no relation to the global one.
    """
    if per_device is not None:
        if per_device < 1:
            raise ValueError(f"loader.eval_batch_size must be >= 1, got {per_device}.")
        return BatchPlan(per_device, 1, world_size)
    if eval_global_batch_size < 1 or eval_global_batch_size % world_size:
        raise ValueError(
            f"loader.eval_global_batch_size={eval_global_batch_size} is not a positive multiple of {world_size} "
            "processes (devices x nodes); change it or set loader.eval_batch_size (per process)."
        )
    return BatchPlan(eval_global_batch_size // world_size, 1, world_size)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
