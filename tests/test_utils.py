import pytest

from utils import (
    GIB,
    available_cpus,
    check_logits_memory,
    configure_cpu_threads,
    plan_batches,
    plan_eval_batches,
    resolve_accelerator,
)


def test_plan_batches_default_split() -> None:
    plan = plan_batches(512, 8)
    assert (plan.per_device, plan.accumulate, plan.global_size) == (64, 1, 512)


def test_plan_batches_accumulates_to_the_global_batch() -> None:
    plan = plan_batches(512, 4, per_device=16)
    assert (plan.per_device, plan.accumulate, plan.global_size) == (16, 8, 512)
    plan = plan_batches(512, 16, per_device=32)  # 2 nodes x 8 GPUs
    assert plan.accumulate == 1 and plan.global_size == 512


@pytest.mark.parametrize("args", [(512, 3, None), (512, 4, 48), (0, 1, None)])
def test_plan_batches_rejects_inexact_splits(args) -> None:
    with pytest.raises(ValueError, match="global_batch_size"):
        plan_batches(*args)


def test_resolve_accelerator_on_cpu() -> None:
    import torch

    accelerator, devices = resolve_accelerator("auto", "auto")
    assert accelerator == ("cuda" if torch.cuda.is_available() else "cpu")
    assert devices >= 1
    with pytest.raises(ValueError, match="not one of"):
        resolve_accelerator("tpu", 1)


def test_eval_batch_problems_name_the_eval_keys() -> None:
    """Before: loader.eval_global_batch_size=30 loader.eval_batch_size=8 was reported as a problem with
    loader.global_batch_size / loader.batch_size, keys the user never set."""
    assert plan_eval_batches(30, 1, per_device=8).per_device == 8  # evaluation accumulates nothing
    assert plan_eval_batches(32, 4).per_device == 8
    with pytest.raises(ValueError, match=r"loader.eval_global_batch_size=30 .* loader.eval_batch_size") as info:
        plan_eval_batches(30, 4)
    assert "loader.global_batch_size" not in str(info.value)
    with pytest.raises(ValueError, match="loader.eval_batch_size must be >= 1"):
        plan_eval_batches(32, 1, per_device=0)


def test_available_cpus_respects_the_cgroup_quota(tmp_path) -> None:
    import os

    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert available_cpus(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a core: one thread
    assert available_cpus(cpu_max) == 1
    assert available_cpus(tmp_path / "missing") == affinity


def test_configure_cpu_threads_splits_the_cores_over_processes(tmp_path, monkeypatch) -> None:
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("400000 100000\n")  # 4 cores of quota
    try:
        line = configure_cpu_threads(processes=2, cpu_max=cpu_max)
        expected = max(1, min(4, available_cpus()) // 2)
        assert torch.get_num_threads() == expected and f"CPU threads: {expected} per process" in line
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert "OMP_NUM_THREADS=1" in configure_cpu_threads(cpu_max=cpu_max)
    finally:
        torch.set_num_threads(before)


def test_a_batch_whose_logits_cannot_fit_fails_before_allocating() -> None:
    """The README's GPT-2 commands on CPU: global batch 512 x 128 x 50,258 logits were killed for memory."""
    with pytest.raises(ValueError, match=r"loader.eval_batch_size=512 needs about 49.1 GiB .* 24.0 GiB .*"
                                         r"Set loader.eval_batch_size=125 \(or smaller\), or use trainer=cpu"):
        check_logits_memory(512, 128, 50258, "loader.eval_batch_size", "eval", available=24 * GIB)
    check_logits_memory(32, 128, 50258, "loader.eval_batch_size", "eval", available=24 * GIB)  # 3.1 GiB: fine
    with pytest.raises(ValueError, match="training step"):
        check_logits_memory(64, 128, 50258, "loader.batch_size", "train", available=8 * GIB)
