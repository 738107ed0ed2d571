"""Discrete-time losses: D3PM (absorbing) and MDLM/SUBS with T > 0.

* Both per-step KLs against a slow reference that builds the transition matrices of the
  absorbing process explicitly for a tiny vocabulary and loops over tokens.
* D3PM against a transcription of the original's ``_d3pm_loss`` where that applies
  (alpha_t = 1 - t).
* The discrete-time SUBS loss approaches the continuous one as T grows, measured exactly on
  the toy problem of ``test_samplers.py``: the expectation over x0 and over the masks is a
  finite sum (27 sequences x 8 mask patterns), over t a sum over the T grid (discrete) or a
  Gauss-Legendre rule that is exact here (continuous). Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_samplers import JOINT, LOG_TABLE, L, state_index
from torch import Tensor, nn

from algorithms import D3PM, MDLM, NEG_INF, Draws, d3pm_kl, d3pm_log_probs, discrete_times, q_xt, subs_log_probs
from noise_schedule import Cosine, CosineSqr, Geometric, Linear, LogLinear, NoiseSchedule

# ---- schedules local to the tests -------------------------------------------------------




class LinearTest(NoiseSchedule):
    """sigma(t) = a + (b - a) t with sigma(0) = a > 0: the clean state at t = 0 is itself noisy."""

    def __init__(self, a: float = 0.05, b: float = 5.0) -> None:
        super().__init__()
        self.a, self.b = a, b

    def total_noise(self, t: Tensor) -> Tensor:
        return self.a + (self.b - self.a) * t

    def rate_noise(self, t: Tensor) -> Tensor:
        return torch.full_like(t, self.b - self.a)

    def inverse_move_chance(self, move_chance: Tensor) -> Tensor:
        return (-torch.log1p(-move_chance) - self.a) / (self.b - self.a)


SCHEDULES = {"loglinear": LogLinear, "cosine": Cosine}

# ---- slow reference from explicit transition matrices ----------------------------------

VOCAB = 5
MASK = 2  # deliberately not the last id


def cumulative(alpha: float) -> np.ndarray:
    """(V, V) Qbar with Qbar[i, j] = q(x_t = j | x_0 = i) = alpha [i = j] + (1 - alpha) [j = mask]."""
    q = alpha * np.eye(VOCAB)
    q[:, MASK] += 1 - alpha
    return q


def slow_step_kl(probs_x0: np.ndarray, x0: int, xt: int, alpha_t: float, alpha_s: float) -> float:
    """KL(q(x_s | x_t, x0) || p(x_s | x_t)) by D3PM's formulas, from explicit matrices.

    q(x_s | x_t, x0) = Q_{t|s}[x_s, x_t] Qbar_s[x0, x_s] / Qbar_t[x0, x_t];
    p(x_s | x_t) ∝ sum_x0' Q_{t|s}[x_s, x_t] Qbar_s[x0', x_s] p(x0' | x_t)   (D3PM eq. 4).
    """
    step = cumulative(alpha_t / alpha_s)  # one step s -> t
    qbar_s, qbar_t = cumulative(alpha_s), cumulative(alpha_t)
    q = step[:, xt] * qbar_s[x0] / qbar_t[x0, xt]
    p = step[:, xt] * (probs_x0 @ qbar_s)
    p = p / p.sum()
    assert abs(q.sum() - 1) < 1e-12
    support = q > 0
    return float(np.sum(q[support] * (np.log(q[support]) - np.log(p[support]))))


def slow_kl(probs: Tensor, x0: Tensor, xt: Tensor, alpha_t: Tensor, alpha_s: Tensor) -> Tensor:
    """(B, L) per-step KLs, one token at a time."""
    out = torch.zeros(x0.shape, dtype=torch.float64)
    for b in range(x0.shape[0]):
        for i in range(x0.shape[1]):
            out[b, i] = slow_step_kl(probs[b, i].double().numpy(), int(x0[b, i]), int(xt[b, i]),
                                     float(alpha_t[b]), float(alpha_s[b]))
    return out


class FixedLogits(nn.Module):
    """Returns fixed logits (B, L, V) and records what it was called with."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.calls: list[tuple[Tensor, Tensor]] = []
        self.attention_masks: list[Tensor | None] = []

    def forward(self, x: Tensor, sigma: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        self.calls.append((x.clone(), sigma.clone()))
        self.attention_masks.append(attention_mask)
        return self.logits


def random_batch(seed: int, T: int, noise: NoiseSchedule, B: int = 6, Ln: int = 9):
    """Random logits, x0, grid times (including t = 1/T and t = 1) and xt ~ q(xt | x0)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, Ln, VOCAB, generator=g) * 2
    x0 = torch.randint(0, VOCAB - 1, (B, Ln), generator=g)
    x0[x0 >= MASK] += 1  # real tokens only
    k = torch.randint(1, T + 1, (B,), generator=g)
    k[0], k[1] = 1, T
    t = k.double() / T
    xt = q_xt(x0, noise.move_chance(t)[:, None].float(), MASK, generator=g)
    assert (xt == MASK).any() and (xt != MASK).any()
    return logits, x0, xt, t


def alphas(noise: NoiseSchedule, t: Tensor, T: int) -> tuple[Tensor, Tensor]:
    return 1 - noise.move_chance(t), 1 - noise.move_chance(t - 1.0 / T)


@pytest.mark.parametrize("subs_masking", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_d3pm_kl_matches_transition_matrices(schedule: str, subs_masking: bool) -> None:
    noise, T = SCHEDULES[schedule](), 7
    logits, x0, xt, t = random_batch(0, T, noise)
    log_p = d3pm_log_probs(logits, MASK, subs_masking)
    p_mask = log_p[..., MASK].exp()
    assert (p_mask > 0).all() if not subs_masking else (p_mask == 0).all()  # mass on the mask, or none
    alpha_t, alpha_s = alphas(noise, t, T)
    fast = d3pm_kl(log_p, x0, xt, 1 - alpha_t, 1 - alpha_s, MASK)
    slow = slow_kl(log_p.exp(), x0, xt, alpha_t, alpha_s)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-5)
    assert torch.all(slow[xt != MASK].abs() < 1e-12)  # an unmasked x_t is copied by both

    # The algorithm: T times the same KL plus, separately, the reconstruction term.
    backbone = FixedLogits(logits)
    algo = D3PM(noise, MASK, T=T, subs_masking=subs_masking)
    torch.testing.assert_close(algo.diffusion_nll(backbone, x0, xt, t.float()).double(), T * slow,
                               rtol=1e-5, atol=1e-4)


def test_d3pm_posterior_forms_agree_without_mask_mass() -> None:
    """With p_theta(mask | x_t) = 0 the D3PM form equals sum_x0 q(x_s | x_t, x0) p_theta(x0 | x_t)."""
    noise, T = Cosine(), 5
    rng = np.random.default_rng(0)
    for k in range(1, T + 1):
        alpha_t, alpha_s = (1 - float(noise.move_chance(torch.tensor(x / T)))
                            for x in (k, k - 1))
        probs = rng.dirichlet(np.ones(VOCAB))
        probs[MASK] = 0
        probs /= probs.sum()
        step, qbar_s, qbar_t = cumulative(alpha_t / alpha_s), cumulative(alpha_s), cumulative(alpha_t)
        d3pm = step[:, MASK] * (probs @ qbar_s)
        d3pm /= d3pm.sum()
        mixture = sum(probs[x] * step[:, MASK] * qbar_s[x] / qbar_t[x, MASK] for x in range(VOCAB) if probs[x] > 0)
        np.testing.assert_allclose(d3pm, mixture, atol=1e-12)


def original_d3pm_loss(log_p: Tensor, x0: Tensor, xt: Tensor, t: Tensor, T: int) -> Tensor:
    """A transcription of the original's ``_d3pm_loss`` (which assumes alpha_t = 1 - t)."""
    dt = 1 / T
    t = t[:, None]
    alpha_t, alpha_s = 1 - t, 1 - (t - dt)
    log_x0 = log_p.gather(-1, x0[..., None]).squeeze(-1)
    p_m = log_p[..., MASK].exp()
    nr = torch.log(alpha_t * p_m / t + 1)
    term_1 = dt / t * (nr - log_x0)
    term_2 = (1 - dt / t) * (nr - torch.log(alpha_s * p_m / (t - dt) + 1))
    return T * (term_1 + term_2) * (xt == MASK)


def test_d3pm_matches_original_formula_when_alpha_is_one_minus_t() -> None:
    T = 10
    noise = LogLinear(eps=1e-12)  # alpha_t = 1 - t up to 1e-12
    logits, x0, _, _ = random_batch(1, T, noise, B=8)
    # The original divides by t - dt (NaN at t = 1/T) and clamps t to 1 - 1e-4: use 2/T .. (T-1)/T.
    t = torch.arange(2, 10, dtype=torch.float64) / T
    xt = q_xt(x0, t[:, None].float(), MASK, generator=torch.Generator().manual_seed(3))
    log_p = d3pm_log_probs(logits, MASK, subs_masking=False).double()
    ours = T * d3pm_kl(log_p, x0, xt, noise.move_chance(t), noise.move_chance(t - 1 / T), MASK)
    torch.testing.assert_close(ours, original_d3pm_loss(log_p, x0, xt, t, T), rtol=1e-9, atol=1e-9)


def test_d3pm_kl_is_finite_at_the_last_step_and_nonnegative() -> None:
    """t = 1/T with m(0) = 0: the stay-masked branch has probability 0 (the original gives NaN)."""
    noise, T = LogLinear(), 1000
    logits, x0, xt, _ = random_batch(2, T, noise)
    t = torch.full((logits.shape[0],), 1 / T, dtype=torch.float64)
    xt = q_xt(x0, torch.full((logits.shape[0], 1), 0.5), MASK, generator=torch.Generator().manual_seed(0))
    for subs_masking in (False, True):
        log_p = d3pm_log_probs(logits, MASK, subs_masking).requires_grad_()
        kl = d3pm_kl(log_p, x0, xt, noise.move_chance(t), noise.move_chance(t - 1 / T), MASK)
        kl.sum().backward()
        assert torch.isfinite(kl).all() and torch.isfinite(log_p.grad).all()
        masked = xt == MASK
        # q(x_s = x0) = 1 here, so KL = -log p(x0) + log(1 + alpha_t p_m / m_t).
        log_x0 = log_p.detach().gather(-1, x0[..., None]).squeeze(-1)
        m_t = (1 - 1e-3) / T
        expected = -log_x0 + torch.log1p((1 - m_t) / m_t * log_p.detach()[..., MASK].exp())
        torch.testing.assert_close(kl[masked], expected[masked], rtol=1e-4, atol=1e-4)
    # Non-negative everywhere on random inputs.
    for seed in range(5):
        logits, x0, xt, t = random_batch(seed, 13, Cosine())
        log_p = d3pm_log_probs(logits, MASK, subs_masking=False)
        assert (d3pm_kl(log_p, x0, xt, Cosine().move_chance(t), Cosine().move_chance(t - 1 / 13), MASK)
                >= -1e-6).all()


# ---- SUBS in discrete time ---------------------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_subs_discrete_loss_matches_transition_matrices(schedule: str) -> None:
    """The SUBS per-step KL, from the matrices with SUBS's p_theta, is (a_s - a_t)/(1 - a_t) * -log p."""
    noise, T = SCHEDULES[schedule](), 9
    logits, x0, xt, t = random_batch(4, T, noise)
    alpha_t, alpha_s = alphas(noise, t, T)
    probs = subs_log_probs(logits, xt, MASK).exp()  # zero mask mass, carry-over
    slow = T * slow_kl(probs, x0, xt, alpha_t, alpha_s)
    algo = MDLM(noise, MASK, T=T)
    fast = algo.diffusion_nll(FixedLogits(logits), x0, xt, t.float())
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-4)
    # ... which is also D3PM's loss with subs_masking (p_m = 0) on the masked tokens.
    d3pm = D3PM(noise, MASK, T=T, subs_masking=True).diffusion_nll(FixedLogits(logits), x0, xt, t.float())
    torch.testing.assert_close(d3pm, fast, rtol=1e-5, atol=1e-4)


def test_subs_discrete_uses_the_schedule_alpha() -> None:
    """With a cosine schedule the weight is T (m_t - m_s) / m_t, not the original's T (1/T) / t."""
    noise, T = Cosine(), 10
    x0 = torch.zeros(1, 1, dtype=torch.long)
    xt = torch.full((1, 1), MASK)
    logits = torch.zeros(1, 1, VOCAB)  # -log p(x0) = log 4
    for k in (1, 5, 10):  # at k = 1 both are T, since m(0) = 0
        t = torch.tensor([k / T])
        m_t, m_s = noise.move_chance(t.double()), noise.move_chance(t.double() - 1 / T)
        loss = MDLM(noise, MASK, T=T).diffusion_nll(FixedLogits(logits), x0, xt, t)
        torch.testing.assert_close(loss.double(), T * (m_t - m_s) / m_t * math.log(4) * torch.ones(1, 1))
        assert k == 1 or abs(float(loss) - math.log(4) / float(t)) > 1e-3


@pytest.mark.parametrize("T", [7, 50])
def test_discrete_times_cover_every_step_once(T: int) -> None:
    """Antithetic draws of n = T times hit each step once; t = 1/T is never skipped."""
    for algo in (MDLM(LogLinear(), MASK, T=T), D3PM(LogLinear(), MASK, T=T)):
        t = algo.sample_t(T)
        k = torch.round(t.double() * T).long()
        assert torch.equal(torch.sort(k).values, torch.arange(1, T + 1))
    u = torch.tensor([0.0, 0.5, 1 - 1e-9, 1.0])
    torch.testing.assert_close(discrete_times(u, 4), torch.tensor([0.25, 0.75, 1.0, 1.0]))


# ---- reconstruction ----------------------------------------------------------------------

def test_reconstruction_uses_the_schedule_sigma0() -> None:
    noise = LinearTest(a=0.05)  # sigma(0) = 0.05, m(0) = 1 - e^-0.05 ≈ 0.049
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 50, VOCAB, generator=g)
    x0 = torch.randint(0, MASK, (400, 50), generator=g)
    backbone = FixedLogits(logits)
    algo = D3PM(noise, MASK, T=100, time_conditioning=True)
    torch.manual_seed(0)
    rec = algo.reconstruction_nll(backbone, x0)
    (z0, sigma), = backbone.calls
    torch.testing.assert_close(sigma, torch.full((400,), 0.05))
    rate = float((z0 == MASK).float().mean())
    assert abs(rate - (1 - math.exp(-0.05))) < 0.003
    assert torch.equal(z0[z0 != MASK], x0[z0 != MASK])
    expected = -logits.log_softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
    torch.testing.assert_close(rec, expected)

    # Loglinear: sigma(0) = 0 and m(0) = 0, so z_0 = x0 (the original's case).
    backbone = FixedLogits(logits)
    D3PM(LogLinear(), MASK, T=100, time_conditioning=True).reconstruction_nll(backbone, x0)
    assert torch.equal(backbone.calls[0][0], x0) and torch.all(backbone.calls[0][1] == 0)


def test_d3pm_loss_is_diffusion_plus_reconstruction() -> None:
    noise, T = Cosine(), 20
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 12, VOCAB, generator=g)
    x0 = torch.randint(0, MASK, (8, 12), generator=g)
    attention = torch.ones_like(x0)
    attention[:, -3:] = 0
    algo = D3PM(noise, MASK, T=T, time_conditioning=True)
    t = torch.arange(1, 9).float() / 8
    algo.sample_t = lambda n, device, u=None: t  # fixed times
    backbone = FixedLogits(logits)
    out = algo.loss(backbone, x0, attention)
    (xt, sigma_t), (z0, sigma_0) = backbone.calls
    assert all(mask is attention for mask in backbone.attention_masks)  # both calls see the padding
    torch.testing.assert_close(sigma_t, noise.total_noise(t))
    expected = algo.diffusion_nll(FixedLogits(logits), x0, xt, t) + algo.reconstruction_nll(FixedLogits(logits), x0)
    torch.testing.assert_close(out.nll, expected * attention)
    assert torch.equal(out.mask, attention)


def test_d3pm_requires_discrete_time() -> None:
    with pytest.raises(ValueError, match=r"T=0 .*'d3pm'.*set T=1000"):
        D3PM(LogLinear(), MASK)


# ---- discrete -> continuous, measured exactly on the toy problem ------------------------

TOY_MASK = 3
TOY_LOG_ZERO = -1e4


class ToyOracle(nn.Module):
    """The exact SUBS denoiser of the toy joint (log p(x0^i = v | visible tokens) as logits)."""

    def forward(self, xt: Tensor, sigma: Tensor) -> Tensor:
        return LOG_TABLE[state_index(xt)].clamp_min(TOY_LOG_ZERO)  # (B, L, 4)


def toy_pairs() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every (x0, mask pattern): x0 (216, L), xt (216, L), p(x0) (216,), number masked (216,)."""
    seqs = torch.cartesian_prod(*[torch.arange(3)] * L)                          # (27, L)
    patterns = torch.cartesian_prod(*[torch.tensor([False, True])] * L)          # (8, L)
    x0 = seqs.repeat_interleave(len(patterns), 0)
    masked = patterns.repeat(len(seqs), 1)
    p_x0 = torch.tensor(JOINT.reshape(-1), dtype=torch.float64).repeat_interleave(len(patterns))
    return x0, torch.where(masked, TOY_MASK, x0), p_x0, masked.sum(-1).double()


def expected_loss(algo: MDLM, times: Tensor) -> Tensor:
    """E_{x0, xt | t}[sum_i loss_i] (K,) at each time of ``times`` (K,) float64, by exact enumeration."""
    x0, xt, p_x0, n_masked = toy_pairs()
    K, N = len(times), len(x0)
    t = times.repeat_interleave(N)
    loss = algo.diffusion_nll(ToyOracle(), x0.repeat(K, 1), xt.repeat(K, 1), t).double().sum(-1).view(K, N)
    m = algo.noise.move_chance(times)[:, None]                                   # (K, 1)
    weight = p_x0 * m**n_masked * (1 - m) ** (L - n_masked)                       # (K, N)
    return (weight * loss).sum(-1)


def discrete_bound(noise: NoiseSchedule, T: int) -> float:
    """E[loss] per token of the T-step SUBS loss: the average over the T grid times."""
    grid = torch.arange(1, T + 1, dtype=torch.float64) / T
    return float(expected_loss(MDLM(noise, TOY_MASK, T=T), grid).mean()) / L


def continuous_bound(noise: NoiseSchedule, nodes: int = 8) -> float:
    """Per token, the integral over [0, 1] of the continuous loss's expectation.

    In m = m(t): E[loss(t)] dt = f(m) dm with f a polynomial of degree L - 1, so Gauss-Legendre
    in m with ``nodes`` >= L points is exact.
    """
    m0, m1 = (float(noise.move_chance(torch.tensor(x, dtype=torch.float64))) for x in (0.0, 1.0))
    x, w = np.polynomial.legendre.leggauss(nodes)
    m = torch.tensor(m0 + (m1 - m0) * (x + 1) / 2)
    t = noise.inverse_move_chance(m)
    level = noise(t)
    dm_dt = level.dsigma * level.alpha
    values = expected_loss(MDLM(noise, TOY_MASK, sampling_eps=0.0), t) / dm_dt
    return float((torch.tensor(w) * values).sum() * (m1 - m0) / 2) / L


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_discrete_subs_loss_approaches_continuous(schedule: str) -> None:
    noise = SCHEDULES[schedule]()
    continuous = continuous_bound(noise)
    assert abs(continuous_bound(noise, nodes=16) - continuous) < 1e-6  # the quadrature is exact
    Ts = [10, 100, 1000]
    bounds = [discrete_bound(noise, T) for T in Ts]
    gaps = np.array(bounds) - continuous
    slope = np.polyfit(np.log(Ts), np.log(gaps), 1)[0]
    entropy = float(-(JOINT * np.log(JOINT)).sum()) / L
    print(f"\n[{schedule}] continuous NELBO = {continuous:.6f} nats/token (exact denoiser, toy joint; "
          f"entropy {entropy:.6f}: the tokens still visible at m(1) = 1 - eps are not paid for)")
    for T, bound, gap in zip(Ts, bounds, gaps, strict=True):
        print(f"[{schedule}] T={T:5d}: E[loss] = {bound:.6f}, gap = {gap:.3e}, T * gap = {T * gap:.4f}")
    print(f"[{schedule}] log-log slope of the gap: {slope:.3f}")
    assert np.all(gaps > 0) and np.all(np.diff(gaps) < 0)  # right-endpoint sums overestimate
    assert -1.2 < slope < -0.8


def test_toy_oracle_is_the_exact_subs_denoiser() -> None:
    x = torch.tensor([[TOY_MASK, 1, TOY_MASK]])
    log_p = subs_log_probs(ToyOracle()(x, torch.zeros(1)), x, TOY_MASK)
    assert torch.all(log_p[0, 1].exp() == torch.tensor([0.0, 1.0, 0.0, 0.0]))
    column = JOINT[:, 1, :].sum(axis=1)  # p(x0^0 | x0^1 = 1), unnormalised
    torch.testing.assert_close(log_p[0, 0, :3].exp().double(), torch.tensor(column / column.sum()))
    assert float(log_p[0, 0, TOY_MASK]) <= NEG_INF / 2


# ---- MDLM's reconstruction term: the NELBO when the schedule masks at t = 0 -----------------

ALL_SCHEDULES = {"loglinear": LogLinear, "linear": Linear, "geometric": Geometric, "cosine": Cosine,
                 "cosinesqr": CosineSqr}


def reference_reconstruction(noise: NoiseSchedule) -> float:
    """Per token, E[-log p(x0 | z0)] at t = 0 from the formula: masked positions of z0 ~ q(. | x0) pay -log p."""
    x0, z0, p_x0, n_masked = toy_pairs()
    log_p = subs_log_probs(ToyOracle()(z0, torch.zeros(len(z0))), z0, TOY_MASK).double()   # (N, L, 4)
    nll = -(log_p.gather(-1, x0[..., None]).squeeze(-1) * (z0 == TOY_MASK)).sum(-1)       # (N,)
    m0 = noise.move_chance(torch.zeros((), dtype=torch.float64))
    return float((p_x0 * m0**n_masked * (1 - m0) ** (L - n_masked) * nll).sum()) / L


def expected_reconstruction(algo: MDLM) -> float:
    """E_{x0, z0 ~ q(. | x0) at t = 0}[sum_i -log p(x0^i | z0)] of the toy joint, by exact enumeration."""
    x0, z0, p_x0, n_masked = toy_pairs()
    u = torch.where(z0 == TOY_MASK, 0.0, 1.0)  # uniforms that give each mask pattern (masked where u < m(0))
    recon = algo.reconstruction_nll(ToyOracle(), x0, u)
    if recon is None:
        return 0.0
    m0 = algo.noise.move_chance(torch.zeros((), dtype=torch.float64))
    weight = p_x0 * m0**n_masked * (1 - m0) ** (L - n_masked)
    return float((weight * recon.double().sum(-1)).sum())


@pytest.mark.parametrize("schedule", ALL_SCHEDULES)
def test_mdlm_loss_has_the_reconstruction_term_where_the_schedule_masks_at_zero(schedule: str) -> None:
    noise = ALL_SCHEDULES[schedule]()
    m0 = float(noise.move_chance(torch.zeros((), dtype=torch.float64)))
    x0 = torch.tensor([[0, 1, 2], [2, 2, 0]])
    u_time, u_mask = torch.tensor([0.3, 0.9]), torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.0, 0.99]])
    for T in (0, 1000):
        algo = MDLM(noise, TOY_MASK, T=T, sampling_eps=0.0)
        out = algo.loss(ToyOracle(), x0, torch.ones_like(x0), draws=Draws(time=u_time, mask=u_mask))
        t, xt = algo.forward_process(x0, Draws(time=u_time, mask=u_mask))
        diffusion = algo.diffusion_nll(ToyOracle(), x0, xt, t)
        recon = algo.reconstruction_nll(ToyOracle(), x0, u_mask)
        if m0 == 0.0:  # loglinear, cosine, cosinesqr: nothing is masked at t = 0, and no network call is made
            assert recon is None
            torch.testing.assert_close(out.nll, diffusion)
        else:  # linear (m(0) = 9.995e-4), geometric (1e-4): -log p(x0 | z0) at the positions u < m(0) masks
            assert m0 > 1e-5 and recon is not None
            assert (recon[u_mask < m0] > 0).all() and (recon[u_mask >= m0] == 0).all()
            torch.testing.assert_close(out.nll, diffusion + recon)


@pytest.mark.parametrize("schedule", ALL_SCHEDULES)
def test_discrete_nelbo_at_T_1000_matches_the_continuous_nelbo(schedule: str) -> None:
    """E[loss] at T = 1000 (diffusion + reconstruction) against the continuous NELBO, for every schedule.

    Continuous NELBO = integral of the continuous loss over t in [0, 1] (exact quadrature) plus the
    reconstruction term at t = 0; the discrete one differs by O(1/T). Without the reconstruction
    term, schedules with m(0) > 0 would miss m(0) x (a few nats) per token, far more than that.
    """
    noise = ALL_SCHEDULES[schedule]()
    recon = reference_reconstruction(noise)
    continuous = continuous_bound(noise) + recon
    gaps = {}
    for T in (100, 1000):
        algo = MDLM(noise, TOY_MASK, T=T)
        discrete = discrete_bound(noise, T) + expected_reconstruction(algo) / L
        gaps[T] = discrete - continuous
    print(f"\n[{schedule}] continuous NELBO {continuous:.6f} (reconstruction {recon:.2e}); "
          f"gap at T=100: {gaps[100]:.2e}, at T=1000: {gaps[1000]:.2e} nats/token")
    assert 0 < gaps[1000] < gaps[100] / 5  # right-endpoint sums overestimate, by O(1/T)
    assert 7 < gaps[100] / gaps[1000] < 13
