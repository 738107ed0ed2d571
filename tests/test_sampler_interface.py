"""Every sampler of configs/sampler/ that takes p_theta(x_0 | x_t), built from its YAML as
`python main.py sampler=<name>` builds it, on the toy problem of test_samplers.py: given tokens are
kept (prefix and infilling templates), nothing is left masked, rows of a batch are independent,
NFE is recorded, semi-AR windows work, and the draws are reproducible from the generator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from test_configs import make_cfg
from test_samplers import LOG_TABLE, MASK, L, state_index

import registry
from noise_schedule import LogLinear
from samplers import X0_LOG_PROBS, semi_ar_sample

NAMES = registry.samplers_accepting(X0_LOG_PROBS)


def test_the_new_samplers_are_registered() -> None:
    assert {"ddpm", "ddpm_cache", "first_hitting", "remdm", "confidence"} <= set(NAMES)


def toy(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The toy's exact denoiser for windows of length L (any sigma per row)."""
    assert sigma.shape == (x.shape[0],)
    return LOG_TABLE[state_index(x)]


def build(name: str, tmp_path: Path, *overrides: str):
    cfg = make_cfg(tmp_path, [f"sampler={name}", "sampling.steps=6", *overrides])
    return instantiate(cfg.sampler)(noise=LogLinear(), mask_index=MASK, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_templates_batches_and_nfe(name: str, tmp_path: Path) -> None:
    sampler = build(name, tmp_path)
    x = torch.tensor([[MASK, MASK, MASK], [1, MASK, MASK], [MASK, 2, MASK], [0, 1, 2]]).repeat(8, 1)
    a = sampler.sample(toy, x, generator=torch.Generator().manual_seed(0))
    b = sampler.sample(toy, x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe >= 1
    assert not (a.tokens == MASK).any()
    given = x != MASK
    assert torch.equal(a.tokens[given], x[given])


@pytest.mark.parametrize("name", NAMES)
def test_semi_ar_windows(name: str, tmp_path: Path) -> None:
    sampler = build(name, tmp_path)
    out = semi_ar_sample(sampler, toy, torch.full((5, L), MASK), stride_length=1, num_strides=2,
                         generator=torch.Generator().manual_seed(1))
    assert out.tokens.shape == (5, L + 2) and not (out.tokens == MASK).any() and out.nfe >= 3


@pytest.mark.parametrize("name", NAMES)
def test_temperature_and_nucleus_options(name: str, tmp_path: Path) -> None:
    """Every sampler takes sampler.temperature / top_p / top_p_rule (the command-line names)."""
    sampler = build(name, tmp_path, "sampler.temperature=0.7", "sampler.top_p=0.9", "sampler.top_p_rule=hf")
    assert sampler.top_p == 0.9 and sampler.top_p_rule == "hf"
    out = sampler.sample(toy, torch.full((4, L), MASK), generator=torch.Generator().manual_seed(2))
    assert not (out.tokens == MASK).any()
