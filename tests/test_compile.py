"""``compile=true``: the torch.compile'd DiT gives the eager logits and loss (slow: compiling takes minutes on CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from algorithms import MDLM, Draws
from models.dit import DiT
from noise_schedule import LogLinear

VOCAB, MASK = 61, 60


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float32 reassociation (compiled kernels fuse and reorder sums; with these random weights
    activations are large): 1e-4 of the largest value. A wrong kernel differs by O(1)."""
    torch.testing.assert_close(a, b, atol=1e-4 * float(b.detach().abs().max()), rtol=1e-3)


@pytest.mark.slow
def test_compiled_backbone_matches_eager() -> None:
    torch.manual_seed(0)
    eager = DiT(VOCAB, hidden_size=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=True)  # in place, as main.build_module does
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep their names
    algorithm = MDLM(LogLinear(), MASK)
    for batch, length in ((2, 16), (3, 24)):  # dynamic shapes: a second shape does not break it
        x0 = torch.randint(0, MASK, (batch, length))
        sigma = torch.rand(batch)
        assert_close(compiled(x0, sigma), eager(x0, sigma))
        draws = Draws(time=torch.rand(batch), mask=torch.rand(batch, length))
        ones = torch.ones(batch, length)
        fast, slow = (algorithm.loss(m, x0, ones, draws=draws).nll for m in (compiled, eager))
        assert_close(fast, slow)
        fast.sum().backward()
        slow.sum().backward()
        for a, b in zip(compiled.parameters(), eager.parameters(), strict=True):
            assert_close(a.grad, b.grad)
        compiled.zero_grad()
        eager.zero_grad()
