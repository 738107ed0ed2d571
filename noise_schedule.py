"""Noise schedules for masked (absorbing-state) diffusion.

A schedule maps time ``t in [0, 1]`` to the total noise ``sigma(t)``; the probability that a
token is still clean is ``alpha_t = exp(-sigma(t))`` and its masking probability is
``1 - alpha_t``. Every schedule also returns the rate ``dsigma/dt`` that weights the
continuous-time NELBO.

The schedules, one config file each in ``configs/noise/``:

- ``loglinear`` (:class:`LogLinear`, the default): ``alpha_t = 1 - (1 - eps) t``.
- ``linear`` (:class:`Linear`): ``sigma = sigma_min + t (sigma_max - sigma_min)``.
- ``geometric`` (:class:`Geometric`, SEDD's): ``sigma = sigma_min^(1 - t) sigma_max^t``.
- ``cosine`` (:class:`Cosine`): ``alpha_t = eps + (1 - eps) cos(pi t / 2)``.
- ``cosinesqr`` (:class:`CosineSqr`): ``alpha_t = eps + (1 - eps) cos^2(pi t / 2)``.

The continuous-time NELBO does not depend on the schedule, only on its end points: MDLM's
Table 9 reports the same 3.30 BPD on OWT for loglinear, cosine, cosine^2 and linear, but the
per-datapoint variance of the loss differs (1.81 / 3.30 / 3.30 / 7.57), which is why
loglinear is the default.

New schedules subclass :class:`NoiseSchedule`, implement ``total_noise``, ``rate_noise`` and
``inverse_move_chance`` (overriding ``move_chance`` where a closed form is more accurate),
and get a config file in ``configs/noise/``.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class NoiseLevel:
    """The noise at a batch of times; every field has the shape of ``t``."""

    sigma: Tensor   # total noise sigma(t)
    dsigma: Tensor  # rate d sigma / dt

    @property
    def alpha(self) -> Tensor:
        """Probability that a token is still clean: ``exp(-sigma)``."""
        return torch.exp(-self.sigma)

    @property
    def move_chance(self) -> Tensor:
        """Masking probability ``1 - alpha = -expm1(-sigma)`` (accurate for small sigma)."""
        return -torch.expm1(-self.sigma)

    @property
    def nelbo_weight(self) -> Tensor:
        """Continuous-time NELBO weight ``dsigma / expm1(sigma) = -alpha' / (1 - alpha)``."""
        return self.dsigma / torch.expm1(self.sigma)


class NoiseSchedule(nn.Module, abc.ABC):
    """Interface: ``sigma(t)`` and ``dsigma/dt`` for ``t`` in ``[0, 1]``.

    A ``nn.Module`` so that it moves with the LightningModule and can hold learnable
    parameters in subclasses; the built-in schedules have none.
    """

    @abc.abstractmethod
    def total_noise(self, t: Tensor) -> Tensor:
        """sigma(t), elementwise."""

    @abc.abstractmethod
    def rate_noise(self, t: Tensor) -> Tensor:
        """d sigma / dt at t, elementwise."""

    def forward(self, t: Tensor) -> NoiseLevel:
        return NoiseLevel(sigma=self.total_noise(t), dsigma=self.rate_noise(t))

    def move_chance(self, t: Tensor) -> Tensor:
        """Masking probability ``1 - alpha_t`` at time t."""
        return -torch.expm1(-self.total_noise(t))

    @abc.abstractmethod
    def inverse_move_chance(self, move_chance: Tensor) -> Tensor:
        """The time t at which the masking probability ``1 - alpha_t`` equals ``move_chance``.

        Used by importance sampling and the change of variables, which draw the masking
        probability (uniformly in its logarithm) and need the matching time.
        """


def _check_eps(eps: float) -> float:
    if not 0.0 < eps < 1.0:
        raise ValueError(f"noise.eps must be in (0, 1), got {eps}.")
    return float(eps)


def _check_sigma_range(sigma_min: float, sigma_max: float, *, min_positive: bool) -> tuple[float, float]:
    lower = "0 < sigma_min" if min_positive else "0 <= sigma_min"
    ok_min = sigma_min > 0.0 if min_positive else sigma_min >= 0.0
    if not (ok_min and sigma_min < sigma_max and math.isfinite(sigma_max)):
        raise ValueError(
            f"noise.sigma_min and noise.sigma_max must satisfy {lower} < sigma_max < inf, "
            f"got sigma_min={sigma_min}, sigma_max={sigma_max}."
        )
    return float(sigma_min), float(sigma_max)


def _sigma_from_both(move_chance: Tensor, alpha: Tensor) -> Tensor:
    """``sigma = -log(alpha)`` from whichever of ``alpha`` and ``1 - alpha`` is the smaller.

    ``-log1p(-move_chance)`` keeps relative accuracy for small sigma (t near 0);
    ``-log(alpha)`` avoids forming ``1 - move_chance`` when alpha is small (t near 1).
    """
    return torch.where(move_chance < 0.5, -torch.log1p(-move_chance), -torch.log(alpha))


def _half_pi_sin_cos(t: Tensor) -> tuple[Tensor, Tensor]:
    """``(sin(pi t / 2), cos(pi t / 2))``, both >= 0 on [0, 1], each accurate where it is small.

    The cosine is taken as ``sin(pi (1 - t) / 2)``: ``1 - t`` is exact near t = 1, so
    ``cos(pi / 2)`` comes out as 0 rather than a rounding error of either sign.
    """
    half_pi = math.pi / 2
    return torch.sin(half_pi * t), torch.sin(half_pi * (1 - t))


class LogLinear(NoiseSchedule):
    """MDLM's default: alpha_t = 1 - (1 - eps) t, i.e. a masking probability linear in t.

    sigma(t) = -log(1 - (1 - eps) t),  dsigma/dt = (1 - eps) / (1 - (1 - eps) t).
    ``eps`` keeps sigma(1) finite (sigma(1) = -log eps).
    """

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = _check_eps(eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def total_noise(self, t: Tensor) -> Tensor:
        return -torch.log1p(-(1 - self.eps) * t)

    def rate_noise(self, t: Tensor) -> Tensor:
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def move_chance(self, t: Tensor) -> Tensor:
        return (1 - self.eps) * t

    def inverse_move_chance(self, move_chance: Tensor) -> Tensor:
        return move_chance / (1 - self.eps)


class Linear(NoiseSchedule):
    """Total noise linear in t.

    sigma(t) = sigma_min + t (sigma_max - sigma_min),  dsigma/dt = sigma_max - sigma_min,
    so alpha(0) = exp(-sigma_min) and alpha(1) = exp(-sigma_max).
    Inverse: t = (-log(1 - m) - sigma_min) / (sigma_max - sigma_min).
    """

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 7.0) -> None:
        super().__init__()
        self.sigma_min, self.sigma_max = _check_sigma_range(sigma_min, sigma_max, min_positive=False)

    def extra_repr(self) -> str:
        return f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"

    def total_noise(self, t: Tensor) -> Tensor:
        return self.sigma_min + t * (self.sigma_max - self.sigma_min)

    def rate_noise(self, t: Tensor) -> Tensor:
        return torch.full_like(t, self.sigma_max - self.sigma_min)

    def inverse_move_chance(self, move_chance: Tensor) -> Tensor:
        sigma = -torch.log1p(-move_chance)
        return ((sigma - self.sigma_min) / (self.sigma_max - self.sigma_min)).clamp(0.0, 1.0)


class Geometric(NoiseSchedule):
    """SEDD's schedule: total noise geometric in t (defaults are SEDD's, 1e-4 and 20).

    sigma(t) = sigma_min^(1 - t) sigma_max^t = exp(log sigma_min + t log(sigma_max / sigma_min)),
    dsigma/dt = sigma(t) log(sigma_max / sigma_min).
    Inverse: t = log(-log(1 - m) / sigma_min) / log(sigma_max / sigma_min).
    """

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> None:
        super().__init__()
        self.sigma_min, self.sigma_max = _check_sigma_range(sigma_min, sigma_max, min_positive=True)
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def extra_repr(self) -> str:
        return f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"

    def total_noise(self, t: Tensor) -> Tensor:
        return torch.exp(math.log(self.sigma_min) + t * self.log_ratio)

    def rate_noise(self, t: Tensor) -> Tensor:
        return self.total_noise(t) * self.log_ratio

    def inverse_move_chance(self, move_chance: Tensor) -> Tensor:
        # In float32, m rounds to 1 for t near 1 (1 - m = exp(-20) ~ 2e-9): log(inf) -> clamp.
        sigma = -torch.log1p(-move_chance)
        return ((torch.log(sigma) - math.log(self.sigma_min)) / self.log_ratio).clamp(0.0, 1.0)


class Cosine(NoiseSchedule):
    """Cosine schedule: alpha_t = eps + (1 - eps) cos(pi t / 2).

    sigma(t) = -log(eps + (1 - eps) cos(pi t / 2)),
    dsigma/dt = (1 - eps) (pi / 2) sin(pi t / 2) / alpha_t,
    move chance m = (1 - eps) (1 - cos(pi t / 2)) = 2 (1 - eps) sin^2(pi t / 4),
    inverse t = (4 / pi) arcsin(sqrt(m / (2 (1 - eps)))).
    """

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = _check_eps(eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def _alpha(self, t: Tensor) -> Tensor:
        return self.eps + (1 - self.eps) * _half_pi_sin_cos(t)[1]

    def total_noise(self, t: Tensor) -> Tensor:
        return _sigma_from_both(self.move_chance(t), self._alpha(t))

    def rate_noise(self, t: Tensor) -> Tensor:
        sin, _ = _half_pi_sin_cos(t)
        return (1 - self.eps) * (math.pi / 2) * sin / self._alpha(t)

    def move_chance(self, t: Tensor) -> Tensor:
        return 2 * (1 - self.eps) * torch.sin(math.pi / 4 * t) ** 2

    def inverse_move_chance(self, move_chance: Tensor) -> Tensor:
        # m <= 1 keeps the arcsin argument <= 0.71; the clamp only absorbs rounding at t = 1.
        return (4 / math.pi * torch.asin(torch.sqrt(move_chance / (2 * (1 - self.eps))))).clamp(0.0, 1.0)


class CosineSqr(NoiseSchedule):
    """Squared-cosine schedule: alpha_t = eps + (1 - eps) cos^2(pi t / 2).

    sigma(t) = -log(eps + (1 - eps) cos^2(pi t / 2)),
    dsigma/dt = (1 - eps) pi sin(pi t / 2) cos(pi t / 2) / alpha_t
              = (1 - eps) (pi / 2) sin(pi t) / alpha_t,
    move chance m = (1 - eps) sin^2(pi t / 2),
    inverse t = (2 / pi) arcsin(sqrt(m / (1 - eps))).
    dm/dt vanishes at t = 1, so the inverse there only recovers t to ~sqrt(rounding error).
    """

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = _check_eps(eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def _alpha(self, t: Tensor) -> Tensor:
        return self.eps + (1 - self.eps) * _half_pi_sin_cos(t)[1] ** 2

    def total_noise(self, t: Tensor) -> Tensor:
        return _sigma_from_both(self.move_chance(t), self._alpha(t))

    def rate_noise(self, t: Tensor) -> Tensor:
        sin, cos = _half_pi_sin_cos(t)
        return (1 - self.eps) * math.pi * sin * cos / self._alpha(t)

    def move_chance(self, t: Tensor) -> Tensor:
        return (1 - self.eps) * torch.sin(math.pi / 2 * t) ** 2

    def inverse_move_chance(self, move_chance: Tensor) -> Tensor:
        # m / (1 - eps) can round above 1 at t = 1; clamp it so arcsin stays defined.
        ratio = (move_chance / (1 - self.eps)).clamp(0.0, 1.0)
        return 2 / math.pi * torch.asin(torch.sqrt(ratio))
