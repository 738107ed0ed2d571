import math

import pytest
import torch

from lr_schedules import cosine_decay_warmup


def lrs(max_steps: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    scheduler = cosine_decay_warmup(optimizer, max_steps, **kwargs)
    out = []
    for _ in range(max_steps + 1):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_then_cosine_to_lr_min() -> None:
    values = lrs(100)
    assert values[0] == pytest.approx(1e-6)
    assert values[5] == pytest.approx(1e-6 + (3e-4 - 1e-6) * 0.5)
    assert values[10] == pytest.approx(3e-4)
    assert values[55] == pytest.approx(1e-6 + (3e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[100] == pytest.approx(1e-6)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_steps"):
        lrs(0)
    with pytest.raises(ValueError, match="warmup_fraction"):
        lrs(10, warmup_fraction=1.5)
