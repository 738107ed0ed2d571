"""Ancestral sampling of uniform-state diffusion (UDLM, DUO).

The denoiser is ``x_t, sigma -> log x_theta (B, L, V)`` (:meth:`uniform_diffusion.UniformDiffusion.denoiser`;
the mask token has probability 0 and is never a state). One reverse step from t to s < t draws
every generated position independently from the forward posterior with ``x_theta`` in place of
``x_0`` (Bayes, over the K = V - 1 real tokens; ``alpha_{t|s} = alpha_t / alpha_s``):

    q(x_s = v | x_t, x_theta) ∝ q(x_t | x_s = v) q(x_s = v | x_theta)
                             ∝ (K alpha_{t|s} [v = x_t] + 1 - alpha_{t|s}) (K alpha_s x_theta(v) + 1 - alpha_s),

computed and drawn in float64 (:func:`samplers.sample_categorical`). It is the reference's
``_posterior_from_x0`` with ``x_theta`` plugged in, and equals the mixture over
``w_v ∝ x_theta(v) q(x_t | v)`` of the exact posteriors ``q(x_s | x_t, x_0 = v)``.

The template's mask positions are the positions to generate: they start from the prior at t = 1,
uniform over the real tokens (drawn with the generator); every other token is given (a prefix,
an infilling template, a semi-AR window's kept part) and is kept at every step. Time grid
``linspace(1, eps, steps + 1)``; one network call per step. After the last step, at t = eps:

* ``noise_removal="argmax"`` (true): every generated position becomes ``argmax x_theta`` (DUO's
  greedy tail; it lowers the entropy, like nucleus sampling, and is not the model's law);
* ``"sample"``: the exact last step to alpha = 1, ``∝ (K alpha_eps [v = x_t] + 1 - alpha_eps) x_theta(v)``;
* ``"none"`` (false): the state at t = eps is returned.

Temperature and nucleus apply to ``x_theta`` before it enters the step (exact in law only at
temperature 1 without a nucleus).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from samplers import X0_LOG_PROBS_UNIFORM, DiffusionSampler, SampleOutput, sample_categorical


def uniform_posterior(probs: Tensor, xt: Tensor, alpha_t: Tensor, alpha_s: Tensor, mask_index: int) -> Tensor:
    """Unnormalised ``q(x_s | x_t, x_theta)`` (N, V) for x_theta ``probs`` (N, V) (rows summing to 1, 0 on the mask).

    ``(K alpha_{t|s} [v = x_t] + 1 - alpha_{t|s}) (K alpha_s x_theta(v) + 1 - alpha_s)``, 0 on the mask; xt (N,);
    alpha_t <= alpha_s 0-dim (alpha_s = 1: the last step to x_0). Computed in place in ``probs`` (V can be 50k).
    """
    k = probs.shape[-1] - 1
    ratio = alpha_t / alpha_s                                                  # alpha_{t|s}
    out = probs.mul_(k * alpha_s).add_(1 - alpha_s)                            # K q(x_s = v | x_theta)
    stay = out.gather(-1, xt[:, None])                                         # (N, 1)
    out.mul_(1 - ratio)
    out.scatter_add_(-1, xt[:, None], stay * (k * ratio))
    out[:, mask_index] = 0.0
    return out


class UniformAncestralSampler(DiffusionSampler):
    """Ancestral sampling of uniform-state diffusion, one network call per step (module docstring).

    Args:
        noise: the schedule the model was trained with (``alpha_t = exp(-sigma(t))``).
        mask_index: the id that marks the positions to generate (never a state, never drawn).
        steps: reverse steps from t = 1 to t = eps.
        eps: final time.
        noise_removal: ``"argmax"`` / true (greedy tail), ``"sample"`` (exact last step) or ``"none"`` / false.
        dtype: precision of the step and the draws, float64 by default.
        temperature, top_p, top_p_rule: applied to x_theta (see :class:`samplers.DiffusionSampler`).
    """

    name = "uniform_ancestral"
    accepts = X0_LOG_PROBS_UNIFORM

    @torch.no_grad()
    def sample(self, denoiser: Any, x: Tensor, generator: torch.Generator | None = None,
               progress: bool = False) -> SampleOutput:
        """Generate the masked positions of ``x`` (B, L); ``denoiser`` has the attribute ``vocab_size``."""
        x = self._check_input(x)                                                # (B, L)
        vocab_size = getattr(denoiser, "vocab_size", None)
        if vocab_size is None or vocab_size <= self.mask_index:
            raise ValueError(f"sampler={self.name} needs a uniform-state denoiser with a vocab_size attribute (V > "
                             f"mask_index={self.mask_index}), got {vocab_size!r}: use the algorithm's denoiser.")
        free = x == self.mask_index                                            # (B, L) positions to generate
        n_free = int(free.sum())
        if n_free == 0:
            return SampleOutput(tokens=x, nfe=0)
        r = torch.randint(vocab_size - 1, (n_free,), device=x.device, generator=generator)
        x[free] = r + (r >= self.mask_index).long()                             # the prior: uniform real tokens
        times = self._time_grid(x.device)
        alphas = torch.exp(-self.noise.total_noise(times)).to(self.dtype)      # (steps + 1,)
        nfe = 0
        with self._progress(progress) as bar:
            for i in bar:
                log_p = self._call(denoiser, x, times[i])                      # (B, L, V)
                nfe += 1
                x = self._uniform_step(log_p, x, free, alphas[i], alphas[i + 1], generator)
        if self.noise_removal:
            log_p = self._call(denoiser, x, times[-1])
            nfe += 1
            if self.noise_removal == "argmax":
                x = x.clone()
                x[free] = self._greedy(log_p[free])
            else:
                x = self._uniform_step(log_p, x, free, alphas[-1], torch.ones_like(alphas[-1]), generator)
        return SampleOutput(tokens=x, nfe=nfe)

    def _uniform_step(self, log_p: Tensor, x: Tensor, free: Tensor, alpha_t: Tensor, alpha_s: Tensor,
                      generator: torch.Generator | None) -> Tensor:
        """x (B, L) at t -> x at s: the generated positions (``free``, some) drawn from :func:`uniform_posterior`."""
        probs = self._token_probs(log_p[free])                                 # (N, V) mask 0, temperature, nucleus
        probs.div_(probs.sum(-1, keepdim=True))
        x = x.clone()
        x[free] = sample_categorical(uniform_posterior(probs, x[free], alpha_t, alpha_s, self.mask_index),
                                     generator, self.dtype)
        return x
