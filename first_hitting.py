"""The first-hitting sampler (Zheng et al. 2024, arXiv 2409.02908): exact, one token per call.

In the reverse process of masked diffusion the masked positions of a sequence unmask one at a
time, at random times. With ``n`` positions masked at time ``tau_n`` (move chance
``m_n = 1 - alpha(tau_n)``), each is still masked at an earlier time ``s`` with probability
``m(s) / m_n``, independently, so the next unmasking time has ``P(tau_{n-1} < s) = (m(s) / m_n)^n``
and is drawn in closed form:

    m_{n-1} = m_n * u^(1/n),   u ~ U(0, 1),   tau_{n-1} = m^{-1}(m_{n-1})

(for ``alpha_t = 1 - t``: ``tau_{n-1} = tau_n u^(1/n)``). At that time one of the ``n``
positions, chosen uniformly, takes a token from ``p_theta(x_0 | x_t)`` evaluated at
``tau_{n-1}``; the others stay masked. This is the continuous-time reverse process itself, not a
discretisation: with the exact denoiser the output follows the data distribution exactly, and
the number of network calls (NFE) is the number of masked positions. With a network that does
not read the time (MDLM's default), it is token-by-token decoding in a uniformly random order.
The positions are chosen before the call, so a denoiser that selects rows (the DiT's) runs its
output layer at those positions only.

``tokens_per_step = k > 1`` unmasks k positions per call, all drawn from the same call's
``p_theta`` (independently given the state), and moves the clock past k unmasking times:
NFE = ceil(n / k), but *not exact in law* for k > 1 (the k tokens ignore each other).

Each sequence of a batch keeps its own clock (its own time and masked count); one call serves
the whole batch with a sigma per row. Rows with nothing left to unmask are passed unchanged.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from tqdm import tqdm

from noise_schedule import NoiseSchedule
from samplers import Denoiser, DiffusionSampler, SampleOutput, ranks


class FirstHittingSampler(DiffusionSampler):
    """Exact masked-diffusion sampling by first-hitting times (one token per call for k = 1).

    Args:
        noise: the schedule the model was trained with: ``move_chance`` and its inverse give the
            time (and sigma) at which the network is called.
        mask_index: id of the mask token.
        tokens_per_step: k >= 1 positions unmasked per network call; exact in law only for 1.
        dtype: precision of the categorical draws and of the clock (float64 by default).
        temperature, top_p, top_p_rule: the token distribution (see :class:`DiffusionSampler`);
            exact in law only at temperature 1 without a nucleus.
    """

    name = "first_hitting"

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        tokens_per_step: int = 1,
        dtype: torch.dtype | str = torch.float64,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_p_rule: str = "remdm",
    ) -> None:
        # Every masked position is unmasked by the process itself: no final noise-removal step.
        super().__init__(noise, mask_index, steps=None, noise_removal=None, dtype=dtype,
                         temperature=temperature, top_p=top_p, top_p_rule=top_p_rule)
        if isinstance(tokens_per_step, bool) or not isinstance(tokens_per_step, numbers.Integral) \
                or tokens_per_step < 1:
            raise ValueError(f"sampler tokens_per_step must be an integer >= 1, got {tokens_per_step!r}.")
        self.tokens_per_step = int(tokens_per_step)

    def __repr__(self) -> str:
        extra = "" if self.exact else f", temperature={self.temperature}, top_p={self.top_p} ({self.top_p_rule})"
        return (f"{type(self).__name__}(tokens_per_step={self.tokens_per_step}, mask_index={self.mask_index}, "
                f"dtype={self.dtype}{extra})")

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        x: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> SampleOutput:
        x = self._check_input(x)  # (B, L)
        batch, device = x.shape[0], x.device
        masked = x == self.mask_index  # (B, L)
        left = masked.sum(-1)  # (B,) masked positions per row
        # Move chance of each row's clock; every row starts at t = 1.
        m = self.noise.move_chance(torch.ones((), dtype=torch.float64, device=device)).to(self.dtype).repeat(batch)
        nfe = 0
        bar = tqdm(total=int(left.max()) if batch else 0, desc=f"sampling ({self.name})", disable=not progress)
        while bool((left > 0).any()):
            active = left > 0  # (B,)
            n = left.clamp_min(1).to(self.dtype)
            u = torch.rand(batch, dtype=self.dtype, device=device, generator=generator)
            m = torch.where(active, m * u.pow(1.0 / n), m)  # the next unmasking time of each active row
            k = torch.minimum(left, torch.full_like(left, self.tokens_per_step))  # (B,) positions this call
            chosen = self._choose(masked, k, generator)  # (B, L) bool, k per active row, uniformly
            # The network's output only at the chosen positions (when the denoiser selects rows).
            log_p = self._call_rows(denoiser, x, self._sigma(m), chosen)  # (N, V)
            nfe += 1
            x = x.clone()
            x[chosen] = self._draw(log_p, generator)
            masked &= ~chosen
            left = left - k
            # k > 1: the clock moves past the other k - 1 unmasking times of this call.
            for j in range(1, self.tokens_per_step):
                more = k > j
                if not bool(more.any()):
                    break
                n_j = (left + k - j).clamp_min(1).to(self.dtype)
                u = torch.rand(batch, dtype=self.dtype, device=device, generator=generator)
                m = torch.where(more, m * u.pow(1.0 / n_j), m)
            bar.update(int(k.max()))
        bar.close()
        return SampleOutput(tokens=x, nfe=nfe)

    def _sigma(self, m: Tensor) -> Tensor:
        """(B,) move chances -> the network's noise levels there, through the schedule's inverse."""
        t = self.noise.inverse_move_chance(m.to(torch.float64))
        return self.noise.total_noise(t)

    @staticmethod
    def _choose(masked: Tensor, k: Tensor, generator: torch.Generator | None) -> Tensor:
        """(B, L) bool: ``k[b]`` of the masked positions of each row, uniformly without replacement."""
        scores = torch.rand(masked.shape, dtype=torch.float64, device=masked.device, generator=generator)
        scores = scores.masked_fill(~masked, -1.0)
        return masked & (ranks(scores) < k[:, None])
