"""Exact resume: the training order and randomness after a restart are the uninterrupted run's.

Unit tests pin :class:`dataloader.ResumableSampler`; the end-to-end tests stop a run mid-epoch
(``trainer.max_steps``), resume it from ``last.ckpt`` through ``main.py`` as a user would, and
compare the final weights, EMA and optimizer state bit for bit with an uninterrupted run: in one
process and in two DDP processes (gloo, CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_main_e2e import TINY, run_main

from dataloader import DataModule, ResumableSampler, ShardSampler, SyntheticData


# --------------------------------------------------------------------------- sampler
def consumed(sampler_per_rank: list[ResumableSampler], batches: int, batch_size: int) -> list[int]:
    """The items all ranks take in their first ``batches`` batches, in global order."""
    taken = [list(iter(s))[: batches * batch_size] for s in sampler_per_rank]
    return [i for step in zip(*taken, strict=True) for i in step]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_partition_the_epoch_and_consume_its_prefix(world_size: int) -> None:
    n, batch_size = 50, 4
    samplers = [ResumableSampler(n, world_size, r, shuffle=True, seed=7) for r in range(world_size)]
    order = samplers[0].order(0).tolist()
    per_rank = [list(iter(s)) for s in samplers]
    assert all(len(p) == n // world_size == len(s) for p, s in zip(per_rank, samplers, strict=True))
    flat = [i for p in per_rank for i in p]
    assert len(set(flat)) == len(flat) == (n // world_size) * world_size  # disjoint, nothing padded
    for c in range(1, n // (world_size * batch_size) + 1):  # after c batches per rank: exactly a prefix
        assert sorted(consumed(samplers, c, batch_size)) == sorted(order[: c * batch_size * world_size])


def test_resume_yields_exactly_the_rest_of_the_epoch() -> None:
    n, world_size, batch_size, done = 37, 2, 3, 4
    full = [list(iter(ResumableSampler(n, world_size, r, seed=3))) for r in range(world_size)]
    for rank in range(world_size):
        sampler = ResumableSampler(n, world_size, rank, seed=3)
        sampler.resume(epoch=0, consumed=done * batch_size * world_size)
        assert list(iter(sampler)) == full[rank][done * batch_size :]
        assert list(iter(sampler)) == full[rank]  # the skip applies once


def test_resume_applies_only_to_its_epoch_and_epochs_differ() -> None:
    sampler = ResumableSampler(20, seed=0)
    epoch0 = list(iter(sampler))
    sampler.resume(epoch=1, consumed=5)
    assert list(iter(sampler)) == epoch0  # still epoch 0: no skip
    sampler.set_epoch(1)
    epoch1_rest = list(iter(sampler))
    assert epoch1_rest == sampler.order(1).tolist()[5:]
    assert sampler.order(1).tolist() != epoch0
    assert sorted(sampler.order(1).tolist()) == list(range(20))


def test_with_epoch_keys_and_validation() -> None:
    sampler = ResumableSampler(6, seed=1, with_epoch=True)
    sampler.set_epoch(2)
    keys = list(iter(sampler))
    assert [k[0] for k in keys] == [2] * 6 and sorted(k[1] for k in keys) == list(range(6))
    with pytest.raises(ValueError, match="multiple"):
        ResumableSampler(10, num_replicas=3).resume(0, 4)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, num_replicas=2, rank=2)


def test_shard_sampler_covers_each_item_once_without_padding() -> None:
    shards = [list(iter(ShardSampler(11, 3, r))) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert [len(s) for s in shards] == [len(ShardSampler(11, 3, r)) for r in range(3)] == [4, 4, 3]


def test_datamodule_loader_resumes_from_its_state() -> None:
    data = SyntheticData(block_size=8, num_train_sequences=40, num_valid_sequences=8)
    full = DataModule(data, batch_size=4, eval_batch_size=4, seed=5)
    batches = [b["input_ids"] for b in full.train_dataloader()]
    resumed = DataModule(data, batch_size=4, eval_batch_size=4, seed=5)
    resumed.load_state_dict({"epoch": 0, "batches": 3, "batch_size": 4, "world_size": 1})
    rest = [b["input_ids"] for b in resumed.train_dataloader()]
    assert len(rest) == len(batches) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, batches[3:], strict=True))


# --------------------------------------------------------------------------- end to end
RESUME = [
    *TINY,
    "data.num_train_sequences=48",  # 6 batches of 8 per epoch: max_steps 7 stops inside epoch 2
    "callbacks.checkpoint_every_n_steps.every_n_train_steps=1",
    "trainer.val_check_interval=1000",
    "sampling.num_sample_log=0",
    "wandb.mode=disabled",
]


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        assert torch.equal(x, y)
    states_a, states_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for sa, sb in zip(states_a.values(), states_b.values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process, 10 steps without interruption: the reference."""
    run_dir = tmp_path_factory.mktemp("straight")
    run_main(run_dir, *RESUME, "trainer.max_steps=10")
    return final_state(run_dir)


def interrupt_and_resume(run_dir: Path, *extra: str, forget_data_state: bool = False) -> dict:
    """Stop after 7 steps (inside the second epoch), then run the same command again up to 10."""
    run_main(run_dir, *RESUME, *extra, "trainer.max_steps=7")
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    stopped = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert stopped["global_step"] == 7 and stopped["DataModule"] == {
        "epoch": 1, "batches": 1, "batch_size": 8 // (2 if extra else 1), "world_size": 2 if extra else 1}
    if forget_data_state:
        del stopped["DataModule"]
        torch.save(stopped, ckpt_path)
    proc = run_main(run_dir, *RESUME, *extra, "trainer.max_steps=10")
    assert "Resuming from" in proc.stdout
    return final_state(run_dir)


def test_resumed_run_ends_with_identical_weights(tmp_path: Path, straight_run: dict) -> None:
    assert_same_training_state(straight_run, interrupt_and_resume(tmp_path))


def test_resume_without_data_state_would_differ(tmp_path: Path, straight_run: dict) -> None:
    """The equality above is not vacuous: restarting the epoch from its start changes the weights."""
    restarted = interrupt_and_resume(tmp_path, forget_data_state=True)
    assert any(not torch.equal(straight_run["state_dict"][k], restarted["state_dict"][k])
               for k in straight_run["state_dict"])


def test_two_ddp_processes_resume_exactly(tmp_path: Path) -> None:
    """2 CPU processes (gloo), 4 sequences each per step: interrupted + resumed == uninterrupted."""
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "strategy=ddp"]
    run_main(tmp_path / "straight", *RESUME, *ddp, "trainer.max_steps=10")
    assert_same_training_state(final_state(tmp_path / "straight"), interrupt_and_resume(tmp_path / "resumed", *ddp))


# The quickstart's micro model (hidden 128, batch 32 x 64): big enough for multi-threaded kernels.
BUSY_RUN = ["experiment=quickstart", "trainer.max_steps=16", "trainer.val_check_interval=1000",
            "sampling.num_sample_log=0", "wandb.mode=disabled", "trainer.num_sanity_val_steps=0",
            "trainer.limit_val_batches=1", "data.num_train_sequences=1000", "data.num_valid_sequences=32"]


def run_twice_at_once(tmp_path: Path, *extra: str) -> tuple[dict, dict]:
    """The same command twice, at the same time (each run's threads compete for the cores, as on a busy node)."""
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    cmds = [[sys.executable, "main.py", *BUSY_RUN, *extra, f"hydra.run.dir={tmp_path / name}"] for name in ("a", "b")]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for cmd in cmds]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    return final_state(tmp_path / "a"), final_state(tmp_path / "b")


def test_the_same_command_twice_gives_identical_weights(tmp_path: Path) -> None:
    """The run-to-run baseline of the resume tests: without it "bit-identical resume" could not be told
    apart from noise. Two runs at once on a 2-core CPU differed by ~1e-7 before deterministic algorithms
    were turned on for CPU (trainer.deterministic=auto); with OMP_NUM_THREADS=1 they were identical."""
    a, b = run_twice_at_once(tmp_path)
    assert_same_training_state(a, b)
