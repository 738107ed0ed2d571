import math

import pytest
import torch

from noise_schedule import LogLinear


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
