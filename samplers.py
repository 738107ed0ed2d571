"""Ancestral samplers for masked (absorbing-state) diffusion, MDLM-style.

A sampler turns a denoiser ``x_t, sigma -> log p_theta(x_0 | x_t)`` into samples. It never
sees the LightningModule, only that callable, so it can be tested against an exact oracle.

One reverse step goes from time ``t`` to ``s < t``. With masking probabilities
``m_t = 1 - alpha_t`` and ``m_s = 1 - alpha_s``, a masked position moves to

    q(x_s = v)    ∝ p_theta(x_0 = v | x_t) * (m_t - m_s)    for every real token v,
    q(x_s = mask) ∝ m_s,

(normalised by ``m_t``), independently across positions; unmasked positions are copied
(the SUBS "carry-over" rule). The time grid is ``t_i = linspace(1, eps, steps + 1)``. After
the last step, positions still masked are optionally set to ``argmax p_theta(x_0 | x_t)`` at
``t = eps`` ("noise removal").

Positions of the initial ``x`` that are not the mask token are kept as given, so the same
call samples unconditionally (all-mask input) or fills in a prefix / infilling template.

New samplers subclass :class:`Sampler`, implement ``sample`` and get an entry in
:data:`SAMPLERS` and a config file.
"""

from __future__ import annotations

import abc
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm import tqdm

from noise_schedule import NoiseSchedule

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoiser(x_t: (B, L) long, sigma: (B,) float) -> log p_theta(x_0 | x_t): (B, L, V)``.

The output is already SUBS-parameterised: the mask token has probability 0 and unmasked
positions are a one-hot on their current token.
"""

# dtype of the sigma handed to the denoiser; the network's time embedding runs in float32.
SIGMA_DTYPE = torch.float32


@dataclass
class SampleOutput:
    """What a sampler returns."""

    tokens: Tensor  # (B, L) long
    nfe: int        # number of denoiser calls made, the noise-removal call included


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one index per row of ``probs`` (..., V), with probability ``probs / probs.sum(-1)``.

    Exponential race (equivalent to the Gumbel-max trick): with ``E_v ~ Exp(1)`` i.i.d.,
    ``argmax_v probs_v / E_v`` is distributed as the normalised ``probs``, so rows need not be
    normalised (any positive scale per row gives the same draw for the same noise).

    Everything runs in float64, whatever the input dtype. With float32 noise the smallest
    representable uniforms cap the Gumbel / exponential tail, so categories below roughly
    1e-8 relative probability can never win: sampling acts like a lowered temperature and
    makes generative perplexity look better than it is (Zheng et al. 2024, arXiv 2409.02908).
    float64 also keeps tiny unnormalised masses from underflowing to zero.

    Args:
        probs: (..., V) non-negative, unnormalised probabilities, any float dtype.
        generator: source of the exponential noise, for reproducible draws.

    Returns:
        (...,) long indices in ``[0, V)``.
    """
    probs = probs.to(torch.float64)
    noise = torch.empty_like(probs).exponential_(generator=generator)  # (..., V) float64
    # E = 0 has probability ~2^-53 per draw; 0 / 0 would be NaN, which argmax would pick.
    noise.clamp_min_(torch.finfo(torch.float64).tiny)
    return torch.div(probs, noise, out=noise).argmax(dim=-1)  # in place: V can be 50k


class Sampler(abc.ABC):
    """Interface and shared math of the ancestral samplers.

    Args:
        noise: the noise schedule the model was trained with; only ``move_chance(t)`` and
            ``total_noise(t)`` are used, so any schedule works.
        mask_index: id of the mask token.
        steps: number of reverse steps from ``t = 1`` to ``t = eps``.
        eps: final time; the grid is ``linspace(1, eps, steps + 1)``.
        noise_removal: after the last step, set positions still masked to the argmax of
            the denoiser at ``t = eps``.
    """

    name: ClassVar[str]

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        steps: int,
        eps: float = 1e-5,
        noise_removal: bool = True,
    ) -> None:
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"sampler steps must be an integer >= 1, got {steps!r}.")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 < eps < 1.0:
            raise ValueError(f"sampler eps must be a float in (0, 1), got {eps!r}.")
        if isinstance(mask_index, bool) or not isinstance(mask_index, numbers.Integral) or mask_index < 0:
            raise ValueError(f"mask_index must be an integer >= 0, got {mask_index!r}.")
        self.noise = noise
        self.mask_index = int(mask_index)
        self.steps = int(steps)
        self.eps = float(eps)
        self.noise_removal = noise_removal

    @abc.abstractmethod
    def sample(
        self,
        denoiser: Denoiser,
        x: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> SampleOutput:
        """Generate the masked positions of ``x`` (B, L); other tokens are kept as given."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, eps={self.eps}, "
            f"mask_index={self.mask_index}, noise_removal={self.noise_removal})"
        )

    # ---- shared pieces ------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> Tensor:
        """Validate the initial state and return a copy that sampling may overwrite."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
        if x.dim() != 2:
            raise ValueError(f"x must have shape (batch, length), got {tuple(x.shape)}.")
        if x.dtype != torch.long:
            raise TypeError(f"x must hold token ids as torch.long, got {x.dtype}.")
        return x.clone()

    def _time_grid(self, device: torch.device) -> Tensor:
        """(steps + 1,) float64 times ``t_i = 1 - i (1 - eps) / steps``."""
        return torch.linspace(1.0, self.eps, self.steps + 1, dtype=torch.float64, device=device)

    def _call(self, denoiser: Denoiser, x: Tensor, t: Tensor) -> Tensor:
        """Run the denoiser on x (B, L) at the scalar time t; returns log-probs (B, L, V)."""
        sigma = self.noise.total_noise(t).to(SIGMA_DTYPE).repeat(x.shape[0])  # (B,)
        log_p = denoiser(x, sigma)
        if log_p.dim() != 3 or log_p.shape[:2] != x.shape or log_p.shape[2] <= self.mask_index:
            raise ValueError(
                f"denoiser must return log-probs of shape (B, L, V) = ({x.shape[0]}, "
                f"{x.shape[1]}, V > mask_index={self.mask_index}), got {tuple(log_p.shape)}."
            )
        return log_p

    def _step(self, log_p: Tensor, x: Tensor, t: Tensor, s: Tensor,
              generator: torch.Generator | None) -> Tensor:
        """One ancestral step from time t to s < t.

        For a masked position the reverse step is ``q(v) ∝ p(v) (m_t - m_s)`` over real tokens
        and ``q(mask) ∝ m_s``, normalised by ``m_t`` (SUBS: p gives the mask probability 0).
        It is drawn in two stages with the same law: the position unmasks with probability
        ``(m_t - m_s) / m_t``, which does not depend on the model, and only the unmasking
        positions draw a token from ``p``. With ``steps >> L`` few positions unmask per
        step, so this avoids a float64 draw over (masked positions x V) on every step.
        Noise is drawn in row-major order, so two samplers on the same trajectory consume
        the same numbers.

        Args:
            log_p: (B, L, V) log p_theta(x_0 | x_t).
            x: (B, L) long, the state at time t.
            t, s: 0-dim float64 times.

        Returns:
            (B, L) long, the state at time s (``x`` itself when nothing changes).
        """
        masked = x == self.mask_index  # (B, L)
        if not masked.any():
            return x
        m_t = self.noise.move_chance(t).to(torch.float64)
        m_s = self.noise.move_chance(s).to(torch.float64)
        u = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)  # (B, L)
        unmask = masked & (u * m_t < m_t - m_s)  # P = (m_t - m_s) / m_t, without dividing
        if not unmask.any():
            return x
        probs = log_p[unmask].to(torch.float64).exp_()  # (N, V), N unmasking positions
        probs[:, self.mask_index] = 0.0
        x_s = x.clone()
        x_s[unmask] = sample_categorical(probs, generator)
        return x_s

    def _remove_noise(self, log_p: Tensor, x: Tensor) -> Tensor:
        """Set masked positions of x (B, L) to ``argmax_v log_p[..., v]``, v != mask."""
        masked = x == self.mask_index  # (B, L)
        log_p = log_p[masked]  # (N, V), a copy
        log_p[:, self.mask_index] = -torch.inf
        x = x.clone()
        x[masked] = log_p.argmax(dim=-1)
        return x

    def _progress(self, progress: bool) -> tqdm:
        """Iterator over the step indices, with a progress bar if asked for."""
        return tqdm(range(self.steps), desc=f"sampling ({self.name})", disable=not progress)


class DDPMSampler(Sampler):
    """Ancestral sampling with one denoiser call per step (plus one for noise removal)."""

    name = "ddpm"

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        x: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> SampleOutput:
        x = self._check_input(x)  # (B, L)
        times = self._time_grid(x.device)
        nfe = 0
        for i in self._progress(progress):
            log_p = self._call(denoiser, x, times[i])  # (B, L, V)
            nfe += 1
            x = self._step(log_p, x, times[i], times[i + 1], generator)
        if self.noise_removal and (x == self.mask_index).any():
            x = self._remove_noise(self._call(denoiser, x, times[-1]), x)
            nfe += 1
        return SampleOutput(tokens=x, nfe=nfe)


class DDPMCacheSampler(Sampler):
    """Ancestral sampling that skips the network while the sequence does not change.

    Without time conditioning the denoiser depends on ``x_t`` only, so when a step leaves
    the whole batch unchanged (``x_s == x_t``) the previous output is still exact and is
    reused. The network is called only when some position is masked and the state differs
    from the one of the last call; with ``steps >> L`` most steps change nothing.
    Draws the same random numbers as :class:`DDPMSampler`, so with the same generator seed
    both return identical tokens.

    Args:
        time_conditioning: the denoiser depends on sigma; then nothing is reused and the
            sampler calls the network once per step, like ``ddpm``.
    """

    name = "ddpm_cache"

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        steps: int,
        eps: float = 1e-5,
        noise_removal: bool = True,
        time_conditioning: bool = False,
    ) -> None:
        super().__init__(noise, mask_index, steps, eps=eps, noise_removal=noise_removal)
        self.time_conditioning = time_conditioning

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        x: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> SampleOutput:
        x = self._check_input(x)  # (B, L)
        times = self._time_grid(x.device)
        nfe = 0
        cache: Tensor | None = None  # (B, L, V) denoiser output, valid for x unless stale
        # A stale cache is overwritten rather than freed first: on CPU, freeing the large
        # output before the next call makes that call markedly slower (page faults).
        stale = True
        with self._progress(progress) as bar:
            for i in bar:
                if not (x == self.mask_index).any():
                    break  # nothing left to generate; masks never reappear
                if stale or self.time_conditioning:
                    cache = self._call(denoiser, x, times[i])
                    nfe += 1
                x_s = self._step(cache, x, times[i], times[i + 1], generator)
                stale = not torch.equal(x_s, x)
                x = x_s
        if self.noise_removal and (x == self.mask_index).any():
            if stale or self.time_conditioning:
                cache = self._call(denoiser, x, times[-1])
                nfe += 1
            x = self._remove_noise(cache, x)
        return SampleOutput(tokens=x, nfe=nfe)


SAMPLERS: dict[str, type[Sampler]] = {
    DDPMSampler.name: DDPMSampler,
    DDPMCacheSampler.name: DDPMCacheSampler,
}


def build_sampler(predictor: str, **kwargs: Any) -> Sampler:
    """Instantiate the sampler registered as ``predictor`` with keyword arguments ``kwargs``."""
    if predictor not in SAMPLERS:
        raise ValueError(
            f"Unknown sampler {predictor!r}; valid names: {', '.join(sorted(SAMPLERS))}."
        )
    return SAMPLERS[predictor](**kwargs)
