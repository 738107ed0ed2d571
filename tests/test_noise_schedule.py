import math

import pytest
import torch
from conftest import ROOT
from hydra.utils import instantiate
from omegaconf import OmegaConf

from noise_schedule import Cosine, CosineSqr, Geometric, Linear, LogLinear, NoiseSchedule


@pytest.mark.parametrize("eps", [1e-3, 1e-1])
def test_loglinear_formula(eps: float) -> None:
    noise = LogLinear(eps=eps)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    level = noise(t)
    expected_sigma = torch.tensor([-math.log(1 - (1 - eps) * float(x)) for x in t], dtype=torch.float64)
    torch.testing.assert_close(level.sigma, expected_sigma)
    torch.testing.assert_close(level.alpha, 1 - (1 - eps) * t)
    torch.testing.assert_close(level.move_chance, (1 - eps) * t)
    torch.testing.assert_close(noise.move_chance(t), level.move_chance)


def test_loglinear_derivative_matches_autograd() -> None:
    noise = LogLinear()
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(noise.total_noise(t).sum(), t)
    torch.testing.assert_close(noise.rate_noise(t.detach()), grad)


def test_loglinear_monotone_and_endpoints() -> None:
    noise = LogLinear(eps=1e-3)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    alpha = noise(t).alpha
    assert torch.all(alpha[1:] < alpha[:-1])
    assert alpha[0] == 1.0
    assert abs(float(alpha[-1]) - 1e-3) < 1e-12


def test_nelbo_weight_is_one_over_t_for_loglinear() -> None:
    # -alpha'/(1 - alpha) with alpha = 1 - (1 - eps) t is exactly 1/t.
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(LogLinear(eps=1e-3)(t).nelbo_weight, 1 / t)


def test_eps_validated() -> None:
    with pytest.raises(ValueError, match="noise.eps"):
        LogLinear(eps=0.0)


def test_loglinear_inverse_move_chance() -> None:
    noise = LogLinear()
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(noise.inverse_move_chance(noise.move_chance(t)), t)


# --- Every schedule in configs/noise/, built from its config file. -------------------------

NOISE_CONFIGS = ROOT / "configs" / "noise"
SCHEDULES = sorted(p.stem for p in NOISE_CONFIGS.glob("*.yaml"))

# alpha(1) of each shipped config (float64), pinned so a changed default is noticed.
# cosine, cosinesqr and loglinear end at alpha(1) = eps; linear at exp(-7); geometric (SEDD's
# sigma_max = 20) at exp(-20).
ALPHA_AT_ONE = {
    "cosine": 1e-3,
    "cosinesqr": 1e-3,
    "geometric": math.exp(-20.0),
    "linear": math.exp(-7.0),
    "loglinear": 1e-3,
}


def load_schedule(name: str) -> NoiseSchedule:
    return instantiate(OmegaConf.load(NOISE_CONFIGS / f"{name}.yaml"))


def test_every_config_has_a_pinned_alpha_at_one() -> None:
    assert SCHEDULES == sorted(ALPHA_AT_ONE), "add the new schedule's alpha(1) to ALPHA_AT_ONE"


@pytest.mark.parametrize("name", SCHEDULES)
def test_rate_noise_matches_autograd(name: str) -> None:
    # No closed form used here is singular on [0, 1], so the whole grid is checked.
    noise = load_schedule(name)
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(noise.total_noise(t).sum(), t)
    torch.testing.assert_close(noise.rate_noise(t.detach()), grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_strictly_decreasing_from_one_to_zero(name: str) -> None:
    """alpha(0) > 0.99 and alpha(1) < 0.01 for every shipped config.

    Actual values: alpha(0) = 1 (loglinear, cosine, cosinesqr), exp(-1e-3) = 0.9990 (linear),
    exp(-1e-4) = 0.9999 (geometric); alpha(1) = 1e-3 (loglinear, cosine, cosinesqr),
    exp(-7) = 9.1e-4 (linear), exp(-20) = 2.1e-9 (geometric).
    """
    noise = load_schedule(name)
    t = torch.linspace(0.0, 1.0, 10_001, dtype=torch.float64)
    alpha = noise(t).alpha
    assert torch.all(alpha[1:] < alpha[:-1])
    assert alpha[0] > 0.99
    assert alpha[-1] < 1e-2
    assert math.isclose(float(alpha[-1]), ALPHA_AT_ONE[name], rel_tol=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_inverse_move_chance_round_trip(name: str) -> None:
    """inverse_move_chance(move_chance(t)) == t to 1e-9 wherever the inverse is well conditioned.

    A rounding error delta in m moves t by ~delta / (dm/dt). Where dm/dt vanishes (t = 0 for
    cosine, t = 1 for cosinesqr) it moves t by up to ~sqrt(delta) ~ 1e-8, so such points,
    which may only be end points, get a 1e-6 tolerance. (Geometric's smallest dm/dt, 5e-7 at
    t = 1, still leaves errors below 1e-10.)
    """
    noise = load_schedule(name)
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    level = noise(t)
    dm_dt = level.alpha * level.dsigma
    recovered = noise.inverse_move_chance(noise.move_chance(t))
    well_conditioned = dm_dt > 1e-7
    assert well_conditioned[1:-1].all(), "the inverse may only be singular at an end point"
    torch.testing.assert_close(recovered[well_conditioned], t[well_conditioned], rtol=0, atol=1e-9)
    torch.testing.assert_close(recovered, t, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SCHEDULES)
def test_move_chance_is_one_minus_alpha(name: str) -> None:
    noise = load_schedule(name)
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    torch.testing.assert_close(noise.move_chance(t), -torch.expm1(-noise.total_noise(t)), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", SCHEDULES)
def test_float32_outputs_are_finite(name: str) -> None:
    noise = load_schedule(name)
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float32)
    level = noise(t)
    m = noise.move_chance(t)
    for out in (level.sigma, level.dsigma, level.alpha, m, noise.inverse_move_chance(m)):
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    inverse_at_ends = noise.inverse_move_chance(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(inverse_at_ends).all()
    # float32 agrees with float64 (relative for sigma; absolute for the probabilities).
    t64 = t.double()
    torch.testing.assert_close(level.sigma.double(), noise.total_noise(t64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.double(), noise.move_chance(t64), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (Linear, {"sigma_min": 7.0, "sigma_max": 7.0}, "noise.sigma_min"),
        (Linear, {"sigma_min": 2.0, "sigma_max": 1.0}, "noise.sigma_min"),
        (Linear, {"sigma_min": -1e-3}, "noise.sigma_min"),
        (Linear, {"sigma_max": math.inf}, "noise.sigma_max"),
        (Geometric, {"sigma_min": 0.0}, "noise.sigma_min"),
        (Geometric, {"sigma_min": 20.0, "sigma_max": 1e-4}, "noise.sigma_min"),
        (Geometric, {"sigma_min": math.nan}, "noise.sigma_min"),
        (Cosine, {"eps": 0.0}, "noise.eps"),
        (Cosine, {"eps": 1.0}, "noise.eps"),
        (CosineSqr, {"eps": -0.5}, "noise.eps"),
        (CosineSqr, {"eps": 1.5}, "noise.eps"),
    ],
)
def test_constructors_reject_invalid_args(cls: type[NoiseSchedule], kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_linear_sigma_min_zero_is_allowed() -> None:
    assert Linear(sigma_min=0.0)(torch.zeros(1)).alpha.item() == 1.0


@pytest.mark.parametrize(
    ("noise", "expected"),
    [
        (Linear(), "Linear(sigma_min=0.001, sigma_max=7.0)"),
        (Geometric(), "Geometric(sigma_min=0.0001, sigma_max=20.0)"),
        (Cosine(), "Cosine(eps=0.001)"),
        (CosineSqr(), "CosineSqr(eps=0.001)"),
        (LogLinear(), "LogLinear(eps=0.001)"),
    ],
)
def test_repr(noise: NoiseSchedule, expected: str) -> None:
    assert repr(noise) == expected


def test_closed_forms_match_the_textbook_formulas() -> None:
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    eps, u = 1e-3, math.pi * t / 2
    torch.testing.assert_close(Linear()(t).sigma, 1e-3 + t * (7.0 - 1e-3))
    torch.testing.assert_close(Geometric()(t).sigma, 1e-4 ** (1 - t) * 20.0**t)
    torch.testing.assert_close(Cosine()(t).sigma, -torch.log(eps + (1 - eps) * torch.cos(u)))
    torch.testing.assert_close(CosineSqr()(t).sigma, -torch.log(eps + (1 - eps) * torch.cos(u) ** 2))
