"""The duality function T(ã) of uniform-state diffusion (duality.py): quadrature, table, Monte Carlo.

``P(argmax(ã e_x + sqrt(1 - ã²) ε) = x) = T(ã) + (1 - T(ã)) / K`` is checked by drawing Gaussian
vectors, with tolerances of 5 Monte-Carlo standard errors (seeds fixed: the tests never flake).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import duality
from duality import duality_quadrature, duality_table, gaussian_latent

GPT2_VOCAB = 50258  # GPT-2's 50257 tokens + the mask id: K = 50257 states
SMALL_K = (2, 5, 100)
TABLE_K = (*SMALL_K, 30522, GPT2_VOCAB - 1)


def mu_of(a: float) -> float:
    return a / math.sqrt(1 - a * a)


def scipy_alpha(a: float, k: int) -> float:
    """T(ã) by ``scipy.integrate.quad`` of the defining integral (the reference of the tests)."""
    mu = mu_of(a)
    integral, _ = integrate.quad(lambda z: stats.norm.pdf(z - mu) * stats.norm.cdf(z) ** (k - 1), -15, mu + 15,
                                 points=[mu, 4.0], limit=500, epsabs=1e-15, epsrel=1e-13)
    return k / (k - 1) * (integral - 1 / k)


def win_rate_tolerance(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("k", TABLE_K)
def test_endpoints_and_monotone(k: int) -> None:
    table = duality_table(k)
    ends = table(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert abs(ends.alpha[0].item()) < 1e-15 and ends.alpha[1].item() == 1.0 and ends.one_minus[1].item() < 1e-38
    a = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    value = table(a)
    assert (value.alpha.diff() >= 0).all() and (value.slope >= 0).all()
    assert torch.allclose(value.alpha + value.one_minus, torch.ones_like(a), atol=1e-15)


@pytest.mark.parametrize("k", (2, 100, GPT2_VOCAB - 1))
def test_quadrature_matches_scipy(k: int) -> None:
    a = [0.05, 0.5, 0.9, 0.95, 0.985]
    ours = duality_quadrature(torch.tensor([mu_of(x) for x in a], dtype=torch.float64), k)[0]
    reference = torch.tensor([scipy_alpha(x, k) for x in a], dtype=torch.float64)
    torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-13)


@pytest.mark.parametrize("k", TABLE_K)
def test_table_interpolation_error(k: int) -> None:
    """The interpolated table against the quadrature between the grid points (the errors the docstring states)."""
    n = duality.GRID_POINTS - 1
    a = torch.cat([(torch.arange(n, dtype=torch.float64) + 0.5) / n,
                   torch.rand(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(k))])
    a = a[a < 1]
    value = duality_table(k)(a)
    mu = a / ((1 - a) * (1 + a)).sqrt()
    exact, one_minus, d_mu, _ = duality_quadrature(mu, k)
    slope = torch.where(mu < duality.MU_MAX, d_mu * ((1 - a) * (1 + a)).pow(-1.5), 0.0)
    assert (value.alpha - exact).abs().max() < 5e-10
    relevant = one_minus > 1e-6
    assert ((value.one_minus - one_minus).abs() / one_minus)[relevant].max() < 1e-6
    assert (value.slope - slope).abs().max() < 1e-6
    steep = slope > 1e-4 * slope.max()
    assert ((value.slope - slope).abs() / slope)[steep].max() < 1e-4


@pytest.mark.parametrize("k", (5, GPT2_VOCAB - 1))
def test_derivative_matches_finite_differences(k: int) -> None:
    a = torch.tensor([0.2, 0.6, 0.9, 0.95, 0.97, 0.985], dtype=torch.float64)
    h = 2e-6  # truncation error h² T''' / 6 and rounding 1e-16 / h both below 1e-8 relative here
    table = duality_table(k)
    central = (table(a + h).alpha - table(a - h).alpha) / (2 * h)
    torch.testing.assert_close(table(a).slope, central, rtol=1e-6, atol=1e-9)
    mu = lambda x: x / ((1 - x) * (1 + x)).sqrt()  # noqa: E731
    quad = (duality_quadrature(mu(a + h), k)[0] - duality_quadrature(mu(a - h), k)[0]) / (2 * h)
    torch.testing.assert_close(table(a).slope, quad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("k", SMALL_K)
def test_monte_carlo_argmax_of_gaussian_latent(k: int) -> None:
    """argmax of ``gaussian_latent`` (mask id in the middle of the vocabulary) is x_0 w.p. T + (1 - T)/K, each
    other real token w.p. (1 - T)/K, the mask never."""
    mask = k // 2
    vocab = k + 1
    real = torch.tensor([v for v in range(vocab) if v != mask])
    n = 200_000 if k < 100 else 50_000
    generator = torch.Generator().manual_seed(k)
    for a in (0.3, 0.7, 0.9):
        x0 = real[torch.randint(k, (n, 1), generator=generator)]
        z = gaussian_latent(x0, torch.full((n,), a), vocab, mask, generator).argmax(-1)  # (n, 1)
        assert not (z == mask).any()
        alpha = duality_table(k)(torch.tensor(a, dtype=torch.float64)).alpha.item()
        p_hit = alpha + (1 - alpha) / k
        hit = (z == x0).double().mean().item()
        assert abs(hit - p_hit) < win_rate_tolerance(p_hit, n), (a, hit, p_hit)
        other = real[(real != x0[0, 0]).nonzero()[0, 0]]  # one fixed wrong token, among the rows with that x_0
        rows = x0[:, 0] == x0[0, 0]
        p_other, freq = (1 - alpha) / k, (z[rows, 0] == other).double().mean().item()
        assert abs(freq - p_other) < win_rate_tolerance(p_other, int(rows.sum())), (a, freq, p_other)


def test_monte_carlo_gpt2_vocabulary() -> None:
    """K = 50257 (GPT-2 + mask): whole 50258-wide Gaussian vectors at two ã, and 10^6 draws of the exact
    law of the other coordinates' maximum (``M = Φ^{-1}(U^{1/(K-1)})``) at five ã."""
    k = GPT2_VOCAB - 1
    table = duality_table(k)
    generator = torch.Generator().manual_seed(0)
    n = 1200
    for a in (0.95, 0.985):
        hits = 0
        for _ in range(0, n, 200):
            x0 = torch.randint(k, (200, 1), generator=generator)
            hits += int((gaussian_latent(x0, torch.full((200,), a), GPT2_VOCAB, k, generator).argmax(-1) == x0).sum())
        alpha = table(torch.tensor(a, dtype=torch.float64)).alpha.item()
        p_hit = alpha + (1 - alpha) / k
        assert abs(hits / n - p_hit) < win_rate_tolerance(p_hit, n), (a, hits / n, p_hit)
    n = 1_000_000
    rng = np.random.default_rng(1)
    for a in (0.5, 0.9, 0.95, 0.97, 0.985):
        u = torch.from_numpy(rng.random(n))
        others_max = -torch.special.ndtri(-torch.expm1(u.log() / (k - 1)))  # Φ^{-1}(U^{1/(K-1)}), upper tail
        own = torch.from_numpy(rng.standard_normal(n))
        s = math.sqrt(1 - a * a)
        hit = ((a + s * own) > s * others_max).double().mean().item()
        alpha = table(torch.tensor(a, dtype=torch.float64)).alpha.item()
        p_hit = alpha + (1 - alpha) / k
        assert abs(hit - p_hit) < win_rate_tolerance(p_hit, n), (a, hit, p_hit)


def test_bad_category_count_is_refused() -> None:
    with pytest.raises(ValueError, match="num_categories must be an integer >= 2"):
        duality_table(1)
