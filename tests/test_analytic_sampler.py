"""SEDD's analytic (Tweedie tau-leaping) sampler against an exact score on the toy problem.

The toy problem and its exact conditionals are those of ``test_samplers.py``. The exact log
score of the absorbing process at a state x_t is, for a masked position i and a real token v,
``log p(x_0^i = v | visible tokens) - log(e^sigma - 1)``, and 0 at the current token. With it,
one analytic step from t to s is the exact reverse step, the one the ancestral samplers take;
the final denoising step samples each masked position from p(x_0^i | visible tokens). So the
law of the output after a finite number of steps is known exactly (dynamic programming over
the 64 states), and with many steps it is the joint p itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import build_sampler, diffusion_samplers
from test_samplers import (
    ALL_MASK,
    DIGITS,
    MASK,
    NUM_STATES,
    TABLE,
    L,
    V,
    assert_matches,
    exact_law,
    state_index,
    target_law,
)
from torch import Tensor

from noise_schedule import Cosine, LogLinear, NoiseSchedule
from samplers import AnalyticSampler, staggered_score, transposed_transition

SAMPLERS = diffusion_samplers()

VOCAB = V + 1




SCHEDULES = {"loglinear": LogLinear, "cosine": Cosine}

with np.errstate(divide="ignore"):
    LOG_TABLE64 = torch.tensor(np.log(TABLE))  # (64, L, V + 1) float64, -inf where p = 0
# Finite junk on the entries of unmasked positions that are not the current token: the
# sampler must ignore them (an unmasked token never changes).
JUNK = torch.randn(NUM_STATES, L, VOCAB, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


class ScoreOracle:
    """Exact log score of the toy problem; counts its calls and records the sigmas."""

    def __init__(self) -> None:
        self.calls = 0
        self.sigmas: list[float] = []

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        assert sigma.shape == (x.shape[0],) and sigma.dtype == torch.float32
        self.calls += 1
        self.sigmas.append(sigma[0].item())
        states = state_index(x)
        log_expm1 = torch.log(torch.expm1(sigma.double()))[:, None, None]                # (B, 1, 1)
        masked = (x == MASK)[..., None]
        log_score = torch.where(masked, LOG_TABLE64[states] - log_expm1, JUNK[states])  # (B, L, V + 1)
        return log_score.scatter(-1, x[..., None], 0.0).float()  # ratio 1 at the current token


# The final denoising step: every masked position drawn from p(x_0^i | visible tokens).
FINAL = np.ones((NUM_STATES, NUM_STATES))
for _j in range(L):
    FINAL *= TABLE[:, _j, DIGITS[:, _j]]


def analytic_law(
    noise: NoiseSchedule, steps: int, eps: float, start: tuple[int, ...], noise_removal: bool
) -> np.ndarray:
    """(64,) exact law of the output: the exact reverse steps, then the denoising step."""
    law = exact_law(noise, steps, eps, start, noise_removal=False)
    return law @ FINAL if noise_removal else law


def run(sampler: AnalyticSampler, start: tuple[int, ...], batch: int, seed: int,
        oracle: ScoreOracle | None = None):
    x = torch.tensor(start).expand(batch, L).clone()
    return sampler.sample(oracle or ScoreOracle(), x, generator=torch.Generator().manual_seed(seed))


def make(noise: NoiseSchedule | None = None, **kwargs: object) -> AnalyticSampler:
    sampler = build_sampler("analytic", noise=noise or LogLinear(), mask_index=MASK, **kwargs)
    assert isinstance(sampler, AnalyticSampler)
    return sampler


# ---- the update itself -------------------------------------------------------------------

def test_staggered_score_and_transition_are_matrix_exponentials() -> None:
    """For the absorbing generator Q (real -> mask at rate 1): transition = exp(dsigma Q)[:, x],
    staggered score = s exp(-dsigma Q)."""
    Q = np.zeros((VOCAB, VOCAB))
    for v in range(V):
        Q[v, v], Q[v, MASK] = -1.0, 1.0
    dsigma = torch.tensor(0.37, dtype=torch.float64)
    forward, backward = scipy.linalg.expm(0.37 * Q), scipy.linalg.expm(-0.37 * Q)
    x = torch.arange(VOCAB)
    np.testing.assert_allclose(transposed_transition(x, dsigma, VOCAB, MASK).numpy(), forward.T, atol=1e-12)
    score = torch.rand(6, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(staggered_score(score, dsigma, MASK).numpy(), score.numpy() @ backward, atol=1e-12)


def test_one_step_is_the_exact_reverse_step() -> None:
    """Masked position, exact score s_v = p_v / expm1(sigma_t): probs_v = p_v (m_t - m_s) / m_t."""
    noise = Cosine()
    t, s = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.55, dtype=torch.float64)
    sigma_t, sigma_s = noise.total_noise(t), noise.total_noise(s)
    p = torch.tensor([0.2, 0.5, 0.3, 0.0], dtype=torch.float64)
    score = p / torch.expm1(sigma_t)
    score[MASK] = 1.0
    dsigma = sigma_t - sigma_s
    transition = transposed_transition(torch.tensor([MASK]), dsigma, VOCAB, MASK)
    probs = staggered_score(score[None], dsigma, MASK) * transition
    m_t, m_s = noise.move_chance(t), noise.move_chance(s)
    expected = p * (m_t - m_s) / m_t
    expected[MASK] = m_s / m_t
    torch.testing.assert_close(probs[0], expected)


# ---- exact law for a finite number of steps ----------------------------------------------

CASES = {
    "1step": (1, 1e-5, ALL_MASK, True),
    "2steps": (2, 1e-5, ALL_MASK, True),
    "4steps": (4, 1e-5, ALL_MASK, True),
    "removal": (2, 0.3, ALL_MASK, True),       # many positions left for the denoising step, which
                                               # samples (an argmax would fail this test)
    "no_removal": (2, 0.3, ALL_MASK, False),   # ... or left masked
    "prefix": (2, 1e-5, (1, MASK, MASK), True),
    "infill": (3, 1e-5, (MASK, 2, MASK), True),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", CASES)
def test_exact_law_finite_steps(case: str, schedule: str) -> None:
    steps, eps, start, noise_removal = CASES[case]
    noise = SCHEDULES[schedule]()
    out = run(make(noise, steps=steps, eps=eps, noise_removal=noise_removal), start, batch=40_000, seed=7)
    assert_matches(out.tokens, analytic_law(noise, steps, eps, start, noise_removal))


def test_many_steps_reach_target() -> None:
    noise, eps, steps = LogLinear(), 1e-5, 1000
    law = analytic_law(noise, steps, eps, ALL_MASK, noise_removal=True)
    assert 0.5 * np.abs(law - target_law()).sum() < 1e-3
    oracle = ScoreOracle()
    out = run(make(noise, steps=steps, eps=eps), ALL_MASK, batch=20_000, seed=11, oracle=oracle)
    assert_matches(out.tokens, target_law())
    assert out.nfe == oracle.calls <= steps + 1
    assert not (out.tokens == MASK).any()


# ---- NFE, sigma, given tokens --------------------------------------------------------------

def test_nfe_and_sigmas() -> None:
    noise, steps = Cosine(), 7
    oracle = ScoreOracle()
    out = run(make(noise, steps=steps, eps=0.4), ALL_MASK, 256, 0, oracle)
    assert out.nfe == oracle.calls == steps + 1  # masks left at t = 0.4 -> denoising step
    grid = torch.linspace(1.0, 0.4, steps + 1, dtype=torch.float64)
    expected = noise.total_noise(grid).float().tolist()
    assert oracle.sigmas == [*expected[:steps], expected[-1]]


def test_without_noise_removal_masks_can_remain() -> None:
    out = run(make(steps=1, eps=0.5, noise_removal=False), ALL_MASK, 64, 0)
    assert (out.tokens == MASK).any() and out.nfe == 1


def test_stops_calling_once_nothing_is_masked() -> None:
    x = torch.randint(0, V, (5, L), generator=torch.Generator().manual_seed(0))
    oracle = ScoreOracle()
    out = make(steps=6).sample(oracle, x)
    assert torch.equal(out.tokens, x) and out.nfe == oracle.calls == 0


def test_given_tokens_are_kept() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (512, L), generator=generator)
    x[torch.rand(512, L, generator=generator) < 0.6] = MASK
    before = x.clone()
    out = make(steps=10).sample(ScoreOracle(), x, generator=generator)
    assert torch.equal(x, before), "the input must not be modified in place"
    assert torch.equal(out.tokens[x != MASK], x[x != MASK])
    assert (out.tokens != MASK).all()


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    make(steps=3).sample(ScoreOracle(), torch.full((2, L), MASK), progress=True)
    assert "sampling (analytic)" in capsys.readouterr().err


# ---- configuration and input errors --------------------------------------------------------

def test_registered() -> None:
    assert SAMPLERS["analytic"] is AnalyticSampler


@pytest.mark.parametrize(
    "kwargs",
    [{"steps": 0}, {"steps": 2.5}, {"steps": True}, {"steps": 4, "eps": 0.0}, {"steps": 4, "eps": 1.0},
     {"steps": 4, "mask_index": -1}],
)
def test_invalid_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"steps|eps|mask_index"):
        build_sampler("analytic", **({"noise": LogLinear(), "mask_index": MASK} | kwargs))


def test_invalid_input() -> None:
    sampler = make(steps=2)
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(ScoreOracle(), torch.full((L,), MASK))
    with pytest.raises(TypeError, match="long"):
        sampler.sample(ScoreOracle(), torch.full((2, L), float(MASK)))
    with pytest.raises(ValueError, match="denoiser"):
        sampler.sample(lambda x, sigma: torch.zeros(x.shape[0], x.shape[1], MASK), torch.full((2, L), MASK))
