"""Noise schedules for masked (absorbing-state) diffusion.

A schedule maps time ``t in [0, 1]`` to the total noise ``sigma(t)``; the probability that a
token is still clean is ``alpha_t = exp(-sigma(t))`` and its masking probability is
``1 - alpha_t``. Every schedule also returns the rate ``dsigma/dt`` that weights the
continuous-time NELBO.

New schedules subclass :class:`NoiseSchedule`, implement ``total_noise`` and ``rate_noise``,
and get a config file in ``configs/noise/``.
"""

from __future__ import annotations

import abc
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


class LogLinear(NoiseSchedule):
    """MDLM's default: alpha_t = 1 - (1 - eps) t, i.e. a masking probability linear in t.

    sigma(t) = -log(1 - (1 - eps) t),  dsigma/dt = (1 - eps) / (1 - (1 - eps) t).
    ``eps`` keeps sigma(1) finite (sigma(1) = -log eps).
    """

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        if not 0.0 < eps < 1.0:
            raise ValueError(f"noise.eps must be in (0, 1), got {eps}.")
        self.eps = eps

    def total_noise(self, t: Tensor) -> Tensor:
        return -torch.log1p(-(1 - self.eps) * t)

    def rate_noise(self, t: Tensor) -> Tensor:
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def move_chance(self, t: Tensor) -> Tensor:
        return (1 - self.eps) * t

    def inverse_move_chance(self, move_chance: Tensor) -> Tensor:
        return move_chance / (1 - self.eps)
