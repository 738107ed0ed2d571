"""The EMA under FSDP, on real FSDP with two CPU processes (gloo): sharded like the parameters,
gathered into full tensors for the checkpoint and scattered back on resume, bit for bit.

Lightning runs FSDP only on CUDA, so these tests wrap the LightningModule in torch's FSDP
themselves (as Lightning's strategy does: ``use_orig_params=True``, one unit per DiT block) and
call the module's checkpoint hooks directly. The run through ``main.py strategy=fsdp`` with EMA is
``tests/test_cluster.py::test_fsdp_trains_with_ema_and_resumes_exactly`` (``-m gpu``).
"""

from __future__ import annotations

import copy
import functools
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(seed: int):
    from algorithms import AR
    from diffusion import Diffusion
    from models.dit import DiT

    torch.manual_seed(seed)
    backbone = DiT(61, 16, 8, 2, 2)  # vocab 61: the embedding's 976 numbers split unevenly over shards
    return Diffusion(backbone=backbone, algorithm=AR(0), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                     ema_decay=0.9)


def wrap(module):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from models.dit import DiTBlock

    root = FSDP(module, auto_wrap_policy=ModuleWrapPolicy({DiTBlock}), use_orig_params=True,
                device_id=torch.device("cpu"))
    module.shard_ema(root)
    return root


def train_steps(module, steps: int) -> None:
    """Elementwise updates (the same on a shard as on the full tensor), each followed by an EMA update."""
    for k in range(steps):
        with torch.no_grad():
            for p in module.trainable_parameters():
                p.mul_(0.9).add_(0.01 * (k + 1))
        module.ema.update(module.trainable_parameters())


def full_state_dict(root) -> dict:
    from models.ema import _full_state_dict_type

    with _full_state_dict_type(root, rank0_only=True):
        return root.state_dict()


def equal_lists(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    check_round_trips(rank, Path(folder))  # a failure raises, and mp.spawn reports it
    dist.barrier()
    # Passed. Leave without running C++ destructors: gloo's teardown at interpreter exit
    # occasionally aborts ("terminate called without an active exception") on a loaded machine,
    # after every check has passed.
    os._exit(0)


def check_round_trips(rank: int, folder: Path) -> None:
    module = build(seed=0)
    reference = copy.deepcopy(module)  # the same model, unsharded, in this process
    root = wrap(module)
    full_sizes = [p.numel() for p in reference.trainable_parameters()]
    local_sizes = [s.numel() for s in module.ema.shadow_params]
    assert sum(local_sizes) < sum(full_sizes), "the EMA is not sharded"  # about half on each rank
    for m in (module, reference):
        train_steps(m, 3)

    # Save: the checkpoint holds full tensors equal to the unsharded run's, on rank 0.
    checkpoint = {"state_dict": full_state_dict(root)}
    module.on_save_checkpoint(checkpoint)
    # ... and during an EMA swap (a save during validation): the state dict is the training weights.
    with module.ema_weights():
        swapped = {"state_dict": full_state_dict(root)}
        module.on_save_checkpoint(swapped)
    if rank == 0:
        assert equal_lists(checkpoint["ema"]["shadow_params"], reference.ema.shadow_params)
        assert checkpoint["ema"]["num_updates"] == reference.ema.num_updates == 3
        raw = reference.state_dict()
        for saved in (checkpoint, swapped):
            assert all(torch.equal(saved["state_dict"][k], v) for k, v in raw.items() if k in saved["state_dict"])
        assert equal_lists(swapped["ema"]["shadow_params"], reference.ema.shadow_params)
        torch.save(checkpoint, folder / "last.ckpt")
    else:
        assert checkpoint["ema"]["shadow_params"] == []  # gathered to rank 0 only
    dist.barrier()

    # Resume: a fresh sharded module gets exactly this rank's shards back.
    loaded = torch.load(folder / "last.ckpt", weights_only=True)
    resumed = build(seed=1)
    resumed_root = wrap(resumed)
    resumed.on_load_checkpoint(loaded)
    assert equal_lists(resumed.ema.shadow_params, module.ema.shadow_params)
    with resumed.ema_weights():  # swapping the sharded EMA in and out works shard by shard
        assert equal_lists([p.detach() for p in resumed.trainable_parameters()], module.ema.shadow_params)
    assert not equal_lists([p.detach() for p in resumed.trainable_parameters()], module.ema.shadow_params)
    del resumed_root

    # The same file resumes an unsharded run (one process, or DDP) too.
    single = build(seed=2)
    single.on_load_checkpoint(loaded)
    assert equal_lists(single.ema.shadow_params, reference.ema.shadow_params)

    # A checkpoint of another model is refused with the EMA's message, on every rank.
    other = dict(loaded, ema={**loaded["ema"], "shadow_params": loaded["ema"]["shadow_params"][:-1]})
    with pytest.raises(ValueError, match="different model"):
        wrap_and_load(other)


def wrap_and_load(checkpoint: dict) -> None:
    module = build(seed=3)
    wrap(module)
    module.on_load_checkpoint(checkpoint)


def test_sharded_ema_round_trips_through_full_checkpoints(tmp_path: Path) -> None:
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
