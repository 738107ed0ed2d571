import math

import pytest
import torch

from algorithms import MDLM, NEG_INF, build_algorithm, q_xt, sample_times, subs_log_probs, subs_nelbo
from noise_schedule import LogLinear

MASK = 5
VOCAB = 6  # 5 real tokens + mask


def slow_subs_nelbo(logits, x0, xt, t, eps):
    """Per-token NELBO straight from the formula, one token at a time in Python floats."""
    B, L, V = logits.shape
    out = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        tb = float(t[b])
        sigma = -math.log(1 - (1 - eps) * tb)
        dsigma = (1 - eps) / (1 - (1 - eps) * tb)
        for i in range(L):
            if int(xt[b, i]) != MASK:
                continue  # carry-over: log p(x0 | xt) = 0 on unmasked tokens
            row = [float(v) for v in logits[b, i]]
            row[MASK] = NEG_INF  # zero masking probability
            log_z = math.log(sum(math.exp(v - max(row)) for v in row)) + max(row)
            log_p = row[int(x0[b, i])] - log_z
            out[b, i] = -log_p * dsigma / math.expm1(sigma)
    return out


def test_subs_nelbo_matches_slow_reference() -> None:
    g = torch.Generator().manual_seed(0)
    B, L = 4, 7
    logits = torch.randn(B, L, VOCAB, generator=g) * 3
    x0 = torch.randint(0, MASK, (B, L), generator=g)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0])
    noise = LogLinear(eps=1e-3)
    xt = q_xt(x0, noise(t).move_chance[:, None], MASK, generator=g)
    assert (xt == MASK).any() and (xt != MASK).any()
    fast = subs_nelbo(logits, x0, xt, MASK, noise(t).nelbo_weight)
    torch.testing.assert_close(fast.double(), slow_subs_nelbo(logits, x0, xt, t, 1e-3), rtol=1e-5, atol=1e-5)


def test_subs_log_probs_parameterization() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, VOCAB, generator=g)
    xt = torch.tensor([[0, MASK, 2, MASK, 4], [MASK, MASK, MASK, 1, 3]])
    log_p = subs_log_probs(logits, xt, MASK)
    probs = log_p.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 5))
    assert torch.all(probs[..., MASK] == 0)  # zero masking
    unmasked = xt != MASK
    one_hot = torch.nn.functional.one_hot(xt[unmasked], VOCAB).float()
    torch.testing.assert_close(probs[unmasked], one_hot)  # carry-over
    # Masked rows: softmax of the logits without the mask column.
    expected = torch.softmax(logits[..., :MASK], -1)
    torch.testing.assert_close(probs[~unmasked][:, :MASK], expected[~unmasked])


def test_subs_nelbo_consistent_with_log_probs() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, VOCAB, generator=g)
    x0 = torch.randint(0, MASK, (3, 6), generator=g)
    xt = q_xt(x0, torch.full((3, 1), 0.5), MASK, generator=g)
    weight = torch.tensor([1.0, 2.0, 3.0])
    log_p = subs_log_probs(logits, xt, MASK).gather(-1, x0[..., None]).squeeze(-1)
    torch.testing.assert_close(subs_nelbo(logits, x0, xt, MASK, weight), -log_p * weight[:, None])


def test_antithetic_times_one_per_stratum() -> None:
    n, eps = 64, 1e-3
    t = sample_times(n, eps, antithetic=True, generator=torch.Generator().manual_seed(0))
    u = (t - eps) / (1 - eps)
    strata = torch.sort((u * n).floor().long()).values
    assert torch.equal(strata, torch.arange(n))
    assert t.min() >= eps and t.max() <= 1
    plain = sample_times(n, eps, antithetic=False, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(torch.sort((((plain - eps) / (1 - eps)) * n).floor().long()).values, torch.arange(n))


def test_q_xt_masks_at_the_right_rate() -> None:
    x0 = torch.zeros(200, 500, dtype=torch.long)
    rates = torch.linspace(0, 1, 200)[:, None]
    xt = q_xt(x0, rates, MASK, generator=torch.Generator().manual_seed(0))
    observed = (xt == MASK).float().mean(1)
    assert torch.all((observed - rates[:, 0]).abs() < 0.08)
    assert torch.all(xt[0] == 0) and torch.all(xt[-1] == MASK)


class ConstantBackbone(torch.nn.Module):
    """Returns fixed logits and records the sigma it was given."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.seen_sigma = None

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.seen_sigma = sigma
        return self.logits.expand(x.shape[0], x.shape[1], -1)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_time_conditioning_flag(time_conditioning: bool) -> None:
    backbone = ConstantBackbone(torch.zeros(1, 1, VOCAB))
    algo = MDLM(LogLinear(), MASK, time_conditioning=time_conditioning)
    algo.loss(backbone, torch.zeros(8, 4, dtype=torch.long), torch.ones(8, 4))
    assert torch.all(backbone.seen_sigma > 0) == time_conditioning
    assert torch.all(backbone.seen_sigma == 0) != time_conditioning


def test_uniform_denoiser_bound_is_log_vocab() -> None:
    # A denoiser that predicts uniformly over the 5 real tokens pays log 5 per token in
    # expectation: E_t[ (1/t) * P(masked at t) * log 5 ] = log 5 for the loglinear schedule.
    torch.manual_seed(0)
    algo = MDLM(LogLinear(eps=1e-3), MASK, sampling_eps=1e-3)
    x0 = torch.randint(0, MASK, (4096, 32))
    nll = algo.loss(ConstantBackbone(torch.zeros(1, 1, VOCAB)), x0, torch.ones_like(x0)).nll
    assert abs(float(nll.mean()) - math.log(5)) < 0.02


def test_unknown_parameterization_lists_choices() -> None:
    with pytest.raises(ValueError, match="Valid choices: \\['subs'\\]"):
        build_algorithm("nope", noise=LogLinear(), mask_index=MASK)
