"""SEDD: the log-score parameterization and the score-entropy loss.

* The loss against a slow reference straight from its formula.
* On the toy problem of ``test_samplers.py`` (exact joint p over 27 sequences), the true
  ratio p_t(y) / p_t(x) of the absorbing process, computed by brute force over all 64 noisy
  states, is what the SEDD parameterization gives from the exact conditionals.
* The denoising score entropy is 0 at the exact score of a point-mass data distribution, and
  for the correlated toy joint its expectation over x0 | x_t exceeds its value at the exact
  score by the score entropy against the exact ratios, which is 0 at the exact score and
  strictly positive for any other.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from test_samplers import DIGITS, JOINT, TABLE, L, state_index
from torch import Tensor, nn

from algorithms import SEDD, log_expm1, q_xt, score_entropy, sedd_log_score
from noise_schedule import LogLinear

MASK = 3
VOCAB = 4  # 3 real tokens + mask
LOG_ZERO = -1e4  # exp(-1e4) == 0 in float32


def slow_score_entropy(log_score: Tensor, x0: Tensor, xt: Tensor, sigma: Tensor) -> Tensor:
    """sum_{v != mask} s_v - r log s_{x0} + r (log r - 1), r = 1 / (e^sigma - 1), masked tokens only."""
    out = torch.zeros(xt.shape, dtype=torch.float64)
    for b, i in itertools.product(range(xt.shape[0]), range(xt.shape[1])):
        if int(xt[b, i]) != MASK:
            continue
        r = 1 / math.expm1(float(sigma[b]))
        scores = [math.exp(float(v)) for v in log_score[b, i]]
        out[b, i] = (sum(s for v, s in enumerate(scores) if v != MASK)
                     - r * float(log_score[b, i, int(x0[b, i])]) + r * (math.log(r) - 1))
    return out


def random_case(seed: int, B: int = 5, Ln: int = 8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, Ln, VOCAB, generator=g) * 2
    x0 = torch.randint(0, MASK, (B, Ln), generator=g)
    sigma = torch.tensor([1e-3, 0.05, 0.7, 2.0, 6.9])[:B]
    xt = q_xt(x0, torch.full((B, 1), 0.6), MASK, generator=g)
    return logits, x0, xt, sigma


def test_sedd_log_score_formula() -> None:
    logits, _, xt, sigma = random_case(0)
    log_score = sedd_log_score(logits, xt, sigma)
    expected = logits - torch.log(torch.expm1(sigma))[:, None, None] - math.log(VOCAB - 1)
    expected.scatter_(-1, xt[..., None], 0.0)  # the current token: log score 0
    torch.testing.assert_close(log_score, expected)
    # log(e^sigma - 1) without overflow for large sigma.
    torch.testing.assert_close(log_expm1(torch.tensor([100.0, 1e-6])), torch.tensor([100.0, math.log(1e-6)]))


def test_score_entropy_matches_slow_reference() -> None:
    for seed in range(3):
        logits, x0, xt, sigma = random_case(seed)
        log_score = sedd_log_score(logits, xt, sigma)
        fast = score_entropy(log_score, x0, xt, sigma, MASK)
        torch.testing.assert_close(fast.double(), slow_score_entropy(log_score, x0, xt, sigma), rtol=1e-4, atol=1e-3)
        assert (fast >= 0).all() and (fast[xt != MASK] == 0).all()


class FixedLogits(nn.Module):
    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.sigmas: list[Tensor] = []

    def forward(self, x: Tensor, sigma: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        self.sigmas.append(sigma)
        return self.logits


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_sedd_loss_is_dsigma_times_score_entropy(time_conditioning: bool) -> None:
    logits, x0, xt, _ = random_case(4)
    noise = LogLinear()
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 1.0])
    backbone = FixedLogits(logits)
    algo = SEDD(noise, MASK, time_conditioning=time_conditioning)
    loss = algo.diffusion_nll(backbone, x0, xt, t)
    level = noise(t)
    # The score always uses the true sigma, whatever the network is fed.
    assert torch.all(backbone.sigmas[0] == (level.sigma if time_conditioning else 0))
    log_score = sedd_log_score(logits, xt, level.sigma)
    expected = level.dsigma[:, None] * slow_score_entropy(log_score, x0, xt, level.sigma).float()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-3)
    # The sampler-facing callable returns the same log scores.
    torch.testing.assert_close(algo.denoiser(backbone)(xt, level.sigma), log_score)


def test_sedd_loss_end_to_end_masks_padding() -> None:
    logits, x0, _, _ = random_case(5)
    attention = torch.ones_like(x0)
    attention[:, -2:] = 0
    out = SEDD(LogLinear(), MASK).loss(FixedLogits(logits), x0, attention)
    assert out.nll.shape == x0.shape and torch.equal(out.mask, attention)
    assert (out.nll[:, -2:] == 0).all() and (out.nll >= 0).all() and out.nll.sum() > 0


# ---- the exact score of the toy problem --------------------------------------------------

def noisy_marginals(joint: np.ndarray, alpha: float) -> np.ndarray:
    """(64,) p_t(x) = sum_x0 p(x0) prod_j q_t(x_j | x0_j), by brute force."""
    sequences = np.array(list(itertools.product(range(3), repeat=L)))  # (27, L)
    weights = joint.reshape(-1)
    p_t = np.zeros(len(DIGITS))
    for state, x in enumerate(DIGITS):
        per_token = np.where(x == MASK, 1 - alpha, alpha * (sequences == x))  # (27, L)
        p_t[state] = (weights * per_token.prod(axis=1)).sum()
    return p_t


def oracle_logits(table: np.ndarray, x: Tensor) -> Tensor:
    """Logits whose SEDD log score is log[p(x0^i = v | visible) / (e^sigma - 1)]: log p + log(V - 1)."""
    with np.errstate(divide="ignore"):
        log_table = torch.tensor(np.log(table), dtype=torch.float32).clamp_min(LOG_ZERO)
    return log_table[state_index(x)] + math.log(VOCAB - 1)


@pytest.mark.parametrize("sigma", [0.02, 0.7, 4.0])
def test_parameterized_exact_score_is_the_true_ratio(sigma: float) -> None:
    """For x with x^i masked and y = x with x^i := v: p_t(y) / p_t(x) = p(v | visible) / (e^sigma - 1)."""
    p_t = noisy_marginals(JOINT, math.exp(-sigma))
    x = torch.tensor(DIGITS)                                                        # (64, L)
    score = sedd_log_score(oracle_logits(TABLE, x), x, torch.full((64,), sigma)).double().exp()
    checked = 0
    for state, i, v in itertools.product(range(64), range(L), range(3)):
        if DIGITS[state, i] != MASK:
            continue
        y = DIGITS[state].copy()
        y[i] = v
        ratio = p_t[state_index(torch.tensor(y))] / p_t[state]
        assert abs(float(score[state, i, v]) / ratio - 1) < 1e-5
        checked += 1
    assert checked == 3 * 3 * 4**2  # masked (state, position) pairs x 3 tokens
    assert torch.all(score[x == MASK][:, MASK] == 1)  # the current token: ratio 1


def test_score_entropy_is_zero_at_the_exact_score_of_a_point_mass() -> None:
    """Data = one sequence: the exact score is r at x0 and 0 elsewhere, and the loss is 0."""
    joint = np.zeros((3,) * L)
    joint[2, 0, 1] = 1.0
    table = np.zeros((64, L, VOCAB))
    table[:, np.arange(L), [2, 0, 1]] = 1.0  # p(x0^i | anything) is a point mass
    x = torch.tensor(DIGITS)
    x0 = torch.tensor([[2, 0, 1]]).expand(64, L)
    consistent = ((x == MASK) | (x == x0)).all(-1)  # states reachable from x0
    x, x0 = x[consistent], x0[consistent]
    for sigma in (1e-3, 0.5, 5.0):
        s = torch.full((len(x),), sigma)
        log_score = sedd_log_score(oracle_logits(table, x), x, s)
        loss = score_entropy(log_score, x0, x, s, MASK)
        assert (x == MASK).any() and loss.abs().max() < 1e-5 * (1 + 1 / math.expm1(sigma))
        perturbed = score_entropy(log_score + 0.1 * (x == MASK)[..., None], x0, x, s, MASK)
        assert (perturbed[x == MASK] > 0).all()


@pytest.mark.parametrize("sigma", [0.05, 1.0])
def test_expected_score_entropy_is_minimised_by_the_exact_score(sigma: float) -> None:
    """E_{x0 | x_t}[DSE(s)] - E_{x0 | x_t}[DSE(s*)] = SE(s; s*) = sum_v s_v - s*_v - s*_v log(s_v / s*_v).

    That is the score entropy against the exact ratios: 0 at s = s*, > 0 otherwise. Checked for
    every noisy state, with x0 enumerated and weighted by p(x0 | x_t), and the gradient of the
    expectation vanishes at s*.
    """
    sequences = torch.cartesian_prod(*[torch.arange(3)] * L)                        # (27, L)
    weights = torch.tensor(JOINT.reshape(-1), dtype=torch.float64)
    x = torch.tensor(DIGITS)[(torch.tensor(DIGITS) == MASK).any(-1)]                 # (37, L) with a mask
    rows_x, rows_x0, rows_w = [], [], []
    for state in x:
        visible = state != MASK
        consistent = (sequences[:, visible] == state[visible]).all(-1)
        posterior = weights * consistent / (weights * consistent).sum()             # p(x0 | x_t)
        rows_x.append(state.expand(27, L))
        rows_x0.append(sequences)
        rows_w.append(posterior)
    xt, x0, w = torch.cat(rows_x), torch.cat(rows_x0), torch.cat(rows_w)             # (37 * 27, ...)
    s = torch.full((len(xt),), sigma)

    def expected(log_score: Tensor) -> Tensor:
        return (w * score_entropy(log_score, x0, xt, s, MASK).double().sum(-1)).view(-1, 27).sum(-1)

    exact = sedd_log_score(oracle_logits(TABLE, xt), xt, s).requires_grad_()
    base = expected(exact)
    (grad,) = torch.autograd.grad(base.sum(), exact)
    # Each x0 row holds its own copy of the state's scores: sum the gradient over the copies.
    assert grad.view(-1, 27, L, VOCAB).sum(1).abs().max() < 1e-4

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(x), L, VOCAB, generator=g).repeat_interleave(27, 0)  # one per state
    perturbed = exact.detach() + 0.3 * noise * (xt == MASK)[..., None]
    perturbed[..., MASK] = exact.detach()[..., MASK]  # the current token is not a transition
    gap = expected(perturbed) - base.detach()
    masked = xt == MASK
    star, other = exact.detach().double().exp(), perturbed.double().exp()
    se = torch.where(masked[..., None], other - star - star * (other.log() - star.log()), 0.0)
    se[..., MASK] = 0
    se = se.sum((-1, -2)).view(-1, 27)[:, 0]  # the same for every x0 row of a state
    torch.testing.assert_close(gap, se, rtol=1e-3, atol=1e-5)
    assert (gap > 1e-4).all()
