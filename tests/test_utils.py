import pytest

from utils import plan_batches, resolve_accelerator


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
