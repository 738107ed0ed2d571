"""Uniform-state diffusion (uniform_diffusion.py, uniform_samplers.py): losses against slow references,
the NELBO and the sampler against the exact answer of a toy problem, and UDLM / DUO through the CLI.

Toy problem (that of test_samplers.py): K = 3 real tokens, the mask id 3 in the vocabulary but never a
state, length L = 3, a correlated joint p over the 27 sequences. For uniform-state diffusion everything
is enumerable: ``q(x_t | x_0) = prod_j (alpha [x_t^j = x_0^j] + (1 - alpha) / K)``, and the network the
NELBO asks for (the module docstring of uniform_diffusion.py) is

    x_theta^i(v | x_t) ∝ sum_{x_0: x_0^i = v} p(x_0) prod_{j != i} q(x_t^j | x_0^j),

the posterior of x_0^i given the *other* positions of x_t. With it the continuous-time NELBO is exactly
``H(p) + KL(p_1 || uniform)`` (the prior's mismatch at t = 1), and the sampler's law after any number
of steps is a dynamic program over the 27 states.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from test_main_e2e import run_main
from test_samplers import JOINT, MASK, L, assert_matches, state_index
from test_samplers import V as K
from torch import Tensor, nn

import registry
from algorithms import MDLM, Draws
from noise_schedule import Cosine, LogLinear, NoiseSchedule
from samplers import X0_LOG_PROBS_UNIFORM, DDPMSampler, check_fits, semi_ar_sample
from uniform_diffusion import (
    DUO,
    UDLM,
    q_xt_uniform,
    udlm_nelbo,
    uniform_prior_kl,
)
from uniform_samplers import UniformAncestralSampler

VOCAB = K + 1                                                      # ids 0..3, the mask 3
SEQS = torch.tensor(list(itertools.product(range(K), repeat=L)))   # (27, L)
P = torch.from_numpy(JOINT.reshape(-1))                            # (27,) float64
ONE_HOT = torch.nn.functional.one_hot(SEQS, K).double()            # (27, L, K)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


# --------------------------------------------------------------------------- the toy's exact quantities
def forward_factors(xt: Tensor, alpha: Tensor) -> Tensor:
    """(B, 27, L): ``q(x_t^j | x_0^j)`` for every clean sequence x_0 (rows of SEQS), x_t (B, L), alpha (B,)."""
    alpha = alpha.double()[:, None, None]
    same = (xt[:, None, :] == SEQS[None]).double()                 # (B, 27, L)
    return alpha * same + (1 - alpha) / K


def optimal_x_theta(xt: Tensor, alpha: Tensor) -> Tensor:
    """(B, L, K) float64: the NELBO-optimal x_theta, ∝ sum_{x_0^i = v} p(x_0) prod_{j != i} q(x_t^j | x_0^j)."""
    factors = forward_factors(xt, alpha)
    others = factors.prod(-1, keepdim=True) / factors               # (B, 27, L), every factor > 0
    out = torch.einsum("bsi,s,siv->biv", others, P, ONE_HOT)
    return out / out.sum(-1, keepdim=True)


def exact_posterior(xt: Tensor, alpha: Tensor) -> Tensor:
    """(B, L, K) float64: ``p(x_0^i = v | x_t)`` (what a masked model's denoiser is; not optimal here)."""
    weights = forward_factors(xt, alpha).prod(-1)                   # (B, 27)
    out = torch.einsum("bs,s,siv->biv", weights, P, ONE_HOT)
    return out / out.sum(-1, keepdim=True)


def as_logits(x_theta: Tensor) -> Tensor:
    """(B, L, K) probabilities -> (B, L, VOCAB) float32 logits, the mask column at -1e6."""
    logits = torch.full((*x_theta.shape[:2], VOCAB), -1e6)
    logits[..., :K] = x_theta.log().float()
    return logits


class ToyNetwork(nn.Module):
    """A 'backbone' that returns the toy's exact x_theta (as logits) at the alpha its sigma says; counts calls."""

    vocab_size = VOCAB

    def __init__(self, denoiser: str = "optimal") -> None:
        super().__init__()
        self.x_theta = optimal_x_theta if denoiser == "optimal" else exact_posterior
        self.calls = 0

    def forward(self, xt: Tensor, sigma: Tensor, **kwargs: object) -> Tensor:
        assert not (xt == MASK).any(), "a uniform-state model never sees the mask"
        self.calls += 1
        return as_logits(self.x_theta(xt, torch.exp(-sigma.double())))


def alpha_of(noise: NoiseSchedule, t: float | Tensor) -> Tensor:
    return torch.exp(-noise.total_noise(torch.as_tensor(t, dtype=torch.float64)))


def entropy() -> float:
    return float(-(P * P.log()).sum())


def prior_mismatch(noise: NoiseSchedule) -> float:
    """``KL(p_1 || uniform)`` over the 27 sequences, p_1 the law of x_1."""
    factors = forward_factors(SEQS, alpha_of(noise, 1.0).expand(27)).prod(-1)  # (27 x_1, 27 x_0)
    p1 = factors @ P
    return float((p1 * (p1 * K**L).log()).sum())


# --------------------------------------------------------------------------- (a) the UDLM NELBO
def slow_udlm(logits: Tensor, x0: Tensor, xt: Tensor, sigma: Tensor, dsigma: Tensor, mask: int) -> Tensor:
    """The NELBO integrand from its definition, one token and one y at a time, float64:
    ``dsigma / K sum_{y != x_t} [s_y - r_y - r_y log(s_y / r_y)]``, ``r = xbar / xbar_{x_t}``,
    ``s = xbar_theta / xbar_theta_{x_t}``."""
    batch, length, vocab = logits.shape
    k = vocab - 1
    out = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        alpha = math.exp(-float(sigma[b]))
        for i in range(length):
            row = logits[b, i].double().clone()
            row[mask] = -math.inf
            p = torch.softmax(row, -1).tolist()
            x, z = int(x0[b, i]), int(xt[b, i])
            xbar = [k * alpha * (y == x) + 1 - alpha for y in range(vocab)]
            xbar_theta = [k * alpha * p[y] + 1 - alpha for y in range(vocab)]
            total = 0.0
            for y in range(vocab):
                if y in (mask, z):
                    continue
                r, s = xbar[y] / xbar[z], xbar_theta[y] / xbar_theta[z]
                total += s - r - r * math.log(s / r)
            out[b, i] = float(dsigma[b]) / k * total
    return out


def random_case(seed: int, batch: int = 6, length: int = 5, vocab: int = 9, mask: int = 4):
    g = torch.Generator().manual_seed(seed)
    real = torch.tensor([v for v in range(vocab) if v != mask])
    logits = 3 * torch.randn(batch, length, vocab, generator=g)
    x0 = real[torch.randint(vocab - 1, (batch, length), generator=g)]
    xt = torch.where(torch.rand(batch, length, generator=g) < 0.5, x0,
                     real[torch.randint(vocab - 1, (batch, length), generator=g)])
    sigma = torch.tensor([1e-3, 0.05, 0.7, 2.0, 4.0, 6.9], dtype=torch.float64)[:batch]
    dsigma = torch.rand(batch, generator=g, dtype=torch.float64) * 10 + 0.1
    return logits, x0, xt, sigma, dsigma, mask


@pytest.mark.parametrize("seed", [0, 1])
def test_udlm_nelbo_matches_slow_reference(seed: int) -> None:
    logits, x0, xt, sigma, dsigma, mask = random_case(seed)
    assert (xt == x0).any() and (xt != x0).any()
    fast = udlm_nelbo(logits, x0, xt, sigma, dsigma, mask)
    slow = slow_udlm(logits, x0, xt, sigma, dsigma, mask)
    torch.testing.assert_close(fast.double(), slow, rtol=2e-5, atol=1e-6)
    assert (slow >= 0).all()


def discrete_kl(x_theta: Tensor, x0: int, xt: int, alpha_t: float, alpha_s: float) -> float:
    """``KL(q(x_s | x_t, x_0) || q(x_s | x_t, x_theta))`` of one token over K real tokens, by Bayes, float64."""
    k = x_theta.shape[0]
    ratio = alpha_t / alpha_s

    def posterior(x0_probs: Tensor) -> Tensor:
        into_xt = ratio * (torch.arange(k) == xt).double() + (1 - ratio) / k       # q(x_t | x_s = v)
        prior = alpha_s * x0_probs + (1 - alpha_s) / k                             # q(x_s = v | x_0)
        joint = into_xt * prior
        return joint / joint.sum()

    q, p = posterior(torch.nn.functional.one_hot(torch.tensor(x0), k).double()), posterior(x_theta)
    return float((q * (q / p).log()).sum())


def test_udlm_nelbo_is_the_limit_of_discrete_time_kls() -> None:
    """``n KL(q(x_s | x_t, x_0) || p_theta(x_s | x_t))`` with s = t - 1/n tends to the continuous integrand."""
    noise, n = LogLinear(), 20_000
    g = torch.Generator().manual_seed(3)
    for t in (0.05, 0.4, 0.9):
        alpha_t, alpha_s = float(alpha_of(noise, t)), float(alpha_of(noise, t - 1 / n))
        level = noise(torch.tensor([t], dtype=torch.float64))
        logits = torch.randn(1, 4, VOCAB, generator=g, dtype=torch.float64)
        x_theta = torch.softmax(logits[0, :, :K], -1)
        x0, xt = torch.tensor([[0, 1, 2, 0]]), torch.tensor([[0, 2, 2, 1]])
        continuous = udlm_nelbo(logits.float(), x0, xt, level.sigma, level.dsigma, MASK)[0].double()
        discrete = torch.tensor([n * discrete_kl(x_theta[i], int(x0[0, i]), int(xt[0, i]), alpha_t, alpha_s)
                                 for i in range(4)], dtype=torch.float64)
        torch.testing.assert_close(continuous, discrete, rtol=2e-3, atol=1e-6)


def test_nelbo_of_the_exact_network_is_entropy_plus_prior_mismatch() -> None:
    """∫_0^1 E[sum_i L_t] dt + L KL(q(x_1 | x_0) || u) = H(p) + KL(p_1 || u^L) to quadrature accuracy (every
    weight enters: K, dsigma, the schedule, the closed form, the prior term). Plugging p(x_0^i | x_t) into
    x_theta instead gives a bound more than a nat looser."""
    noise = LogLinear()
    xt = SEQS.repeat_interleave(27, 0)        # (729, L): every (x_t, x_0) pair
    x0 = SEQS.repeat(27, 1)
    weight_of_pair = None

    def expected_loss(t: float, x_theta) -> float:
        nonlocal weight_of_pair
        level = noise(torch.tensor([t], dtype=torch.float64))
        alpha = torch.exp(-level.sigma).expand(729)
        factors = forward_factors(xt, alpha)                            # (729, 27, L)
        pair = factors.prod(-1)[torch.arange(729), torch.arange(729) % 27] * P.repeat(27)  # q(x_t | x_0) p(x_0)
        logits = as_logits(x_theta(xt, alpha))
        loss = udlm_nelbo(logits, x0, xt, level.sigma.expand(729), level.dsigma.expand(729), MASK)
        return float((loss.double().sum(-1) * pair).sum())

    prior = L * float(uniform_prior_kl(noise.total_noise(torch.tensor(1.0, dtype=torch.float64)), K))
    # t = e^u: the integrand is O(log 1/t) at 0; below t = 1e-9 it adds < 1e-7.
    nodes, weights = np.polynomial.legendre.leggauss(48)
    lo = math.log(1e-9)
    bound = {}
    for name, x_theta in (("optimal", optimal_x_theta), ("posterior", exact_posterior)):
        total = 0.0
        for a, b in zip(np.linspace(lo, 0.0, 9)[:-1], np.linspace(lo, 0.0, 9)[1:], strict=True):
            u = (a + b) / 2 + (b - a) / 2 * nodes
            total += (b - a) / 2 * sum(w * math.exp(x) * expected_loss(math.exp(x), x_theta)
                                       for w, x in zip(weights, u, strict=True))
        bound[name] = total + prior
    truth = entropy() + prior_mismatch(noise)
    assert abs(bound["optimal"] - truth) < 2e-5, (bound, truth)
    assert bound["posterior"] > truth + 1.0
    assert entropy() < truth < entropy() + 1e-6


def test_udlm_loss_on_the_toy_is_unbiased() -> None:
    """UDLM.loss itself (times, forward process, weights, prior term) with the exact network: its mean over
    many sequences of p is the NELBO, H(p) + KL(p_1 || u), within 5 standard errors."""
    algorithm = UDLM(LogLinear(), MASK)
    network = ToyNetwork()
    g = torch.Generator().manual_seed(5)
    x0 = SEQS[torch.multinomial(P, 40_000, replacement=True, generator=g)]
    torch.manual_seed(5)
    out = algorithm.loss(network, x0, torch.ones_like(x0))
    per_sequence = out.nll.double().sum(-1)
    truth = entropy() + prior_mismatch(LogLinear())
    stderr = per_sequence.std().item() / math.sqrt(len(per_sequence))
    assert abs(per_sequence.mean().item() - truth) < 5 * stderr, (per_sequence.mean().item(), truth, stderr)
    assert stderr < 0.2  # measured 0.12: a 1.5x weight (K - 1 for K) would be off by 1.5 nats


# --------------------------------------------------------------------------- forward process
def test_forward_process_law_and_no_mask() -> None:
    vocab, mask, n = 7, 2, 120_000
    x0 = torch.full((n, 1), 5)
    g = torch.Generator().manual_seed(0)
    xt = q_xt_uniform(x0, torch.tensor(0.6), vocab, mask, generator=g)
    counts = torch.bincount(xt[:, 0], minlength=vocab).numpy()
    assert counts[mask] == 0
    expected = np.full(vocab, 0.6 / 6)
    expected[5] += 0.4
    expected[mask] = 0
    real = expected > 0
    assert stats.chisquare(counts[real], expected[real] * n).pvalue > 1e-3
    # Given uniforms (validation's Draws, a generator per row): the same law, the same tokens for the same row.
    u = torch.rand(4, n // 4, generator=g)
    given = q_xt_uniform(x0.view(4, -1), torch.tensor(0.6), vocab, mask, u=u)
    counts = torch.bincount(given.flatten(), minlength=vocab).numpy()
    assert counts[mask] == 0 and stats.chisquare(counts[real], expected[real] * n).pvalue > 1e-3
    assert torch.equal(q_xt_uniform(x0.view(4, -1)[2:], torch.tensor(0.6), vocab, mask, u=u[2:]), given[2:])


# --------------------------------------------------------------------------- (b) DUO
def scipy_alpha(a: float, k: int) -> float:
    mu = a / math.sqrt(1 - a * a)
    integral, _ = integrate.quad(lambda z: stats.norm.pdf(z - mu) * stats.norm.cdf(z) ** (k - 1), -15, mu + 15,
                                 points=[mu], limit=500, epsabs=1e-15, epsrel=1e-13)
    return k / (k - 1) * (integral - 1 / k)


class FixedLogits(nn.Module):
    """A backbone with fixed logits that records the sigma it was given."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits, self.vocab_size, self.sigmas = logits, logits.shape[-1], []

    def forward(self, xt: Tensor, sigma: Tensor, **kwargs: object) -> Tensor:
        self.sigmas.append(sigma)
        return self.logits


def test_duo_band_loss_matches_slow_reference() -> None:
    """DUO's per-token training loss: gamma on the band, alpha = T(ã) by scipy quadrature, dalpha/dt by finite
    differences of it, and the slow NELBO integrand; the network is conditioned on sigma = -log T(ã)."""
    logits, x0, xt, _, _, mask = random_case(2, batch=4)
    k = logits.shape[-1] - 1
    duo = DUO(LogLinear(), mask)
    t = torch.tensor([0.001, 0.3, 0.7, 1.0], dtype=torch.float64)
    network = FixedLogits(logits)
    fast = duo.band_nll(network, x0, xt, t)

    def alpha(time: float) -> float:
        gamma = -3.5 + time * 1.75
        return scipy_alpha(math.sqrt(1 / (1 + math.exp(gamma))), k)

    h = 1e-5
    sigma = torch.tensor([-math.log(alpha(x)) for x in t.tolist()], dtype=torch.float64)
    dalpha = torch.tensor([(alpha(x + h) - alpha(x - h)) / (2 * h) for x in t.tolist()], dtype=torch.float64)
    dsigma = -dalpha / torch.exp(-sigma)
    slow = slow_udlm(logits, x0, xt, sigma, dsigma, mask)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(network.sigmas[0].double(), sigma, rtol=1e-6, atol=0)


def test_duo_trains_on_the_band_and_evaluates_the_nelbo() -> None:
    """Training mode: the band loss; eval mode: exactly UDLM's NELBO for the same draws."""
    logits, x0, _, _, _, mask = random_case(4, batch=4)
    network = FixedLogits(logits)
    draws = Draws(time=torch.tensor([0.1, 0.4, 0.6, 0.9]), mask=torch.rand(x0.shape, generator=torch.Generator()))
    duo, udlm = DUO(LogLinear(), mask), UDLM(LogLinear(), mask)
    network.eval()
    evaluated = duo.loss(network, x0, torch.ones_like(x0), draws=draws)
    torch.testing.assert_close(evaluated.nll, udlm.loss(network, x0, torch.ones_like(x0), draws=draws).nll)
    network.train()
    trained = duo.loss(network, x0, torch.ones_like(x0), draws=draws)
    sigma, _, _, _ = duo.band_noise(draws.time.double() * (1 - 1e-3) + 1e-3, k := logits.shape[-1] - 1)
    torch.testing.assert_close(network.sigmas[-1].double(), sigma, rtol=1e-6, atol=0)  # the band's noise levels
    assert not torch.allclose(trained.nll, evaluated.nll) and k == 8


def test_duo_band_option_checks() -> None:
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        DUO(LogLinear(), 3, gamma_min=-1.0, gamma_max=-2.0)
    with pytest.raises(ValueError, match="sampling_eps"):
        UDLM(LogLinear(), 3, sampling_eps=0.0)


# --------------------------------------------------------------------------- (d) the sampler
def step_matrix(alpha_t: float, alpha_s: float, free: Tensor) -> Tensor:
    """(27, 27) ``P(x_s | x_t)`` of one ancestral step with the exact network; ``free`` (L,) positions move."""
    x_theta = optimal_x_theta(SEQS, torch.full((27,), alpha_t, dtype=torch.float64))   # (27, L, K)
    ratio = alpha_t / alpha_s
    into_xt = ratio * torch.nn.functional.one_hot(SEQS, K).double() + (1 - ratio) / K  # (27, L, K) q(x_t^i | x_s^i)
    step = into_xt * (alpha_s * x_theta + (1 - alpha_s) / K)
    step = step / step.sum(-1, keepdim=True)                                            # (27, L, K)
    stay = torch.nn.functional.one_hot(SEQS, K).double()
    step = torch.where(free[None, :, None], step, stay)
    matrix = torch.ones(27, 27, dtype=torch.float64)
    for i in range(L):
        matrix *= step[:, i, SEQS[:, i]]                                                # (27 x_t, 27 x_s)
    return matrix


def exact_law(noise: NoiseSchedule, steps: int, eps: float, start: tuple[int, ...], removal: str | None) -> Tensor:
    """(27,) the law of the sampler's output by dynamic programming over the 27 states."""
    start_t = torch.tensor(start)
    free = start_t == MASK
    consistent = ((SEQS == start_t) | free).all(-1).double()                  # uniform prior on the free positions
    dist = consistent / consistent.sum()
    alphas = alpha_of(noise, torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)).tolist()
    for i in range(steps):
        dist = dist @ step_matrix(alphas[i], alphas[i + 1], free)
    if removal == "sample":
        dist = dist @ step_matrix(alphas[-1], 1.0, free)
    elif removal == "argmax":
        greedy = optimal_x_theta(SEQS, torch.full((27,), alphas[-1], dtype=torch.float64)).argmax(-1)
        final = torch.where(free, greedy, SEQS)
        index = (final * torch.tensor([K * K, K, 1])).sum(-1)
        dist = torch.zeros(27, dtype=torch.float64).index_add_(0, index, dist)
    return dist


def embedded(law27: Tensor) -> np.ndarray:
    """The 27-state law in test_samplers' 64-state space (assert_matches)."""
    out = np.zeros((K + 1) ** L)
    out[state_index(SEQS).numpy()] = law27.numpy()
    return out


def run(sampler: UniformAncestralSampler, start: tuple[int, ...], batch: int, seed: int,
        network: ToyNetwork | None = None):
    denoiser = UDLM(sampler.noise, MASK).denoiser(network or ToyNetwork())
    x = torch.tensor(start).expand(batch, L).clone()
    return sampler.sample(denoiser, x, generator=torch.Generator().manual_seed(seed))


CASES = {
    "1step": (1, 1e-5, (MASK,) * L, "argmax"),
    "2steps": (2, 1e-5, (MASK,) * L, "sample"),
    "4steps": (4, 1e-5, (MASK,) * L, "argmax"),
    "stop_early": (2, 0.3, (MASK,) * L, None),
    "prefix": (2, 1e-5, (1, MASK, MASK), "sample"),
    "infill": (3, 0.1, (MASK, 2, MASK), "argmax"),
}


@pytest.mark.parametrize("schedule", [LogLinear, Cosine])
@pytest.mark.parametrize("case", CASES)
def test_sampler_finite_step_law(case: str, schedule: type) -> None:
    steps, eps, start, removal = CASES[case]
    noise = schedule()
    sampler = UniformAncestralSampler(noise, MASK, steps, eps=eps, noise_removal=removal or False)
    network = ToyNetwork()
    out = run(sampler, start, 30_000, seed=len(case), network=network)
    assert out.nfe == network.calls == steps + (removal is not None)
    assert not (out.tokens == MASK).any()
    given = torch.tensor(start) != MASK
    assert (out.tokens[:, given] == torch.tensor(start)[given]).all()
    assert_matches(out.tokens, embedded(exact_law(noise, steps, eps, start, removal)))


def test_sampler_with_many_steps_reaches_the_joint() -> None:
    noise = LogLinear()
    law = exact_law(noise, 200, 1e-5, (MASK,) * L, "sample")
    # What remains: the factorised steps (total variation 0.0042 at 100 steps, 0.0021 at 200, 0.0010 at 400) and
    # the prior's mismatch at t = 1.
    assert 0.5 * (law - P).abs().sum() < 0.003
    out = run(UniformAncestralSampler(noise, MASK, 200, eps=1e-5, noise_removal="sample"), (MASK,) * L, 8000, 20)
    assert_matches(out.tokens, embedded(law))
    assert_matches(out.tokens, embedded(P))


def test_sampler_semi_ar_windows_keep_the_given_tokens() -> None:
    sampler = UniformAncestralSampler(LogLinear(), MASK, 4)
    denoiser = UDLM(sampler.noise, MASK).denoiser(ToyNetwork())
    x = torch.tensor([[2, MASK, MASK]]).repeat(6, 1)
    out = semi_ar_sample(sampler, denoiser, x, stride_length=1, num_strides=3,
                         generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (6, L + 3) and not (out.tokens == MASK).any() and (out.tokens[:, 0] == 2).all()
    assert out.nfe == 4 * 5


def test_sampler_temperature_and_reproducibility() -> None:
    noise = LogLinear()
    greedy_ish = UniformAncestralSampler(noise, MASK, 6, temperature=0.05, noise_removal="sample")
    a, b = (run(greedy_ish, (MASK,) * L, 2000, seed=9) for _ in range(2))
    assert torch.equal(a.tokens, b.tokens)
    exact = run(UniformAncestralSampler(noise, MASK, 6, noise_removal="sample"), (MASK,) * L, 2000, seed=9)
    distinct = lambda tokens: len(set(map(tuple, tokens.tolist())))  # noqa: E731
    assert distinct(a.tokens) < distinct(exact.tokens)


def test_fit_checks_keep_the_families_apart() -> None:
    assert registry.samplers_accepting(X0_LOG_PROBS_UNIFORM) == ["uniform_ancestral"]
    fitting = lambda: ["x"]  # noqa: E731
    with pytest.raises(ValueError, match="sampler=ddpm does not apply to algorithm=udlm"):
        check_fits(DDPMSampler, UDLM, fitting)
    with pytest.raises(ValueError, match="sampler=uniform_ancestral does not apply to algorithm=mdlm"):
        check_fits(UniformAncestralSampler, MDLM, fitting)
    for algorithm in (UDLM, DUO):
        check_fits(UniformAncestralSampler, algorithm, fitting)
        assert algorithm.default_sampler == "uniform_ancestral"


def test_denoiser_gives_the_mask_no_probability() -> None:
    logits = torch.randn(2, 5, 6)
    logits[..., 2] = 50.0  # the network likes the mask: it still gets 0
    denoiser = UDLM(LogLinear(), 2).denoiser(FixedLogits(logits))
    log_p = denoiser(torch.zeros(2, 5, dtype=torch.long), torch.ones(2))
    assert (log_p[..., 2].exp() == 0).all() and torch.allclose(log_p.exp().sum(-1), torch.ones(2, 5))
    assert denoiser.vocab_size == 6 and denoiser.time_conditioned


# --------------------------------------------------------------------------- (e) the command line
@pytest.mark.parametrize("algorithm", ["udlm", pytest.param("duo", marks=pytest.mark.slow)])
def test_train_ppl_eval_and_sample_eval(tmp_path: Path, algorithm: str) -> None:
    run_main(tmp_path / "train", f"algorithm={algorithm}", "trainer.max_steps=20", "trainer.val_check_interval=10",
             "trainer.num_sanity_val_steps=0", "sampling.num_sample_log=1", "wandb.mode=disabled")
    checkpoint = f"eval.checkpoint_path={tmp_path / 'train' / 'checkpoints' / 'last.ckpt'}"
    proc = run_main(tmp_path / "ppl", "mode=ppl_eval", checkpoint, "wandb.mode=disabled")
    assert f"algorithm={algorithm}" in proc.stdout
    results = json.loads((tmp_path / "ppl" / "eval_results.json").read_text())
    assert results["nll"] > results["true_nll"] - 3 * results["gap_stderr"] and results["num_tokens"] == 32 * 16
    run_main(tmp_path / "sample", "mode=sample_eval", checkpoint, "sampling.steps=6", "sampling.num_sample_batches=1",
             "loader.eval_global_batch_size=3", "sampling.prefix=the cat", "wandb.mode=disabled")
    records = [json.loads(line) for line in (tmp_path / "sample" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert all(r["sampler"] == "uniform_ancestral" and r["nfe"] == 7 and r["text"].startswith("the cat")
               for r in records)
