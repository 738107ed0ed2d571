"""The MDLM bound against the exact NLL of the built-in source.

With the exact posterior marginals p(x0_i | x_t) as the denoiser, the continuous-time NELBO
is tight: its expectation equals -log p(x0). Any other denoiser gives a larger value, and a
value below the truth beyond Monte-Carlo error means the loss (or its weighting) is wrong.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from algorithms import MDLM
from dataloader import SyntheticData, vocab_and_mask
from noise_schedule import LogLinear
from synthetic import BOS_ID, EOS_ID, WORD_OFFSET

LOG_ZERO = -1e4  # exp(-1e4) == 0 in float32


class OracleBackbone(nn.Module):
    """Returns the log of the exact posterior marginals of the source as logits."""

    def __init__(self, data: SyntheticData, vocab_size: int, mask_index: int, context: bool = True) -> None:
        super().__init__()
        self.source, self.vocab_size, self.mask_index, self.context = data.source, vocab_size, mask_index, context

    def forward(self, xt: Tensor, sigma: Tensor) -> Tensor:
        words = xt[:, 1:-1]                                                    # (N, n)
        observed = (words != self.mask_index) & self.context
        marginals = self.source.posterior_marginals(torch.where(observed, words - WORD_OFFSET, 0), observed)
        logits = torch.full((*xt.shape, self.vocab_size), LOG_ZERO, dtype=torch.float64)
        logits[:, 1:-1, WORD_OFFSET:] = marginals.log().clamp_min(LOG_ZERO)
        logits[:, 0, BOS_ID] = 0.0
        logits[:, -1, EOS_ID] = 0.0
        return logits.float()


def bound_minus_truth(context: bool, repeats: int = 24) -> tuple[float, float]:
    """Mean and standard error of (NELBO - true NLL) per token over sequences x time draws."""
    torch.manual_seed(0)
    data = SyntheticData(block_size=12, num_train_sequences=1, num_valid_sequences=400)
    vocab_size, mask_index = vocab_and_mask(data.tokenizer)
    valid = data.valid_dataset()
    x0 = torch.stack([valid[i]["input_ids"] for i in range(len(valid))]).long()
    truth = torch.stack([valid[i]["true_nll"] for i in range(len(valid))])       # (N,) nats
    algo = MDLM(LogLinear(eps=1e-3), mask_index, sampling_eps=1e-3)
    backbone = OracleBackbone(data, vocab_size, mask_index, context=context)
    ones = torch.ones_like(x0)
    gaps = torch.cat([algo.loss(backbone, x0, ones).nll.double().sum(-1) - truth for _ in range(repeats)])
    gaps = gaps / x0.shape[1]
    return float(gaps.mean()), float(gaps.std() / math.sqrt(len(gaps)))


def test_exact_denoiser_makes_the_bound_tight() -> None:
    mean, stderr = bound_minus_truth(context=True)
    assert stderr < 0.02
    assert abs(mean) < 4 * stderr, f"NELBO - NLL = {mean:.4f} ± {stderr:.4f}: the bound must be tight"


@pytest.mark.parametrize("context", [False])
def test_denoiser_ignoring_context_is_strictly_worse(context: bool) -> None:
    mean, stderr = bound_minus_truth(context=context, repeats=4)
    assert mean > 10 * stderr and mean > 0.3
