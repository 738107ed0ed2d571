"""The math of masked diffusion: forward process, SUBS parameterization, NELBO.

Plain functions and one small class per parameterization; no Lightning here. The
LightningModule in ``diffusion.py`` only wires these together.

Notation: ``x0`` clean tokens (B, L); ``xt`` noised tokens (B, L); ``V`` vocabulary size
including the mask token; ``m`` the mask index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from noise_schedule import NoiseSchedule

# Finite stand-in for log(0). -inf would turn 0 * log p into NaN and break softmax when a
# row is all -inf. -1e6 is exact in fp32 and bf16, but overflows fp16: train in bf16/fp32.
NEG_INF = -1e6

@dataclass
class LossOutput:
    """Per-token losses of a batch and the tokens they count (zeros elsewhere)."""

    nll: Tensor   # (B, L') nats per scored token (L' = L, or L - 1 for next-token prediction)
    mask: Tensor  # (B, L') 1 for scored tokens, 0 for padding / unscored


Denoiser = Callable[[Tensor, Tensor], Tensor]  # (xt (B, L), sigma (B,)) -> log p(x0 | xt) (B, L, V)


def sample_times(
    n: int,
    sampling_eps: float,
    antithetic: bool,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Diffusion times for a batch, in ``[sampling_eps, 1]``. Shape (n,).

    Antithetic (low-discrepancy) sampling draws one time per stratum:
    ``u_i ~ U[i/n, (i+1)/n)`` (as ``(u/n + i/n) mod 1``), which lowers the variance of the
    batch-averaged loss. Then ``t = (1 - sampling_eps) u + sampling_eps``.
    """
    u = torch.rand(n, device=device, generator=generator)
    if antithetic:
        offset = torch.arange(n, device=device) / n
        u = (u / n + offset) % 1
    return (1 - sampling_eps) * u + sampling_eps


def q_xt(x0: Tensor, move_chance: Tensor, mask_index: int, generator: torch.Generator | None = None) -> Tensor:
    """Forward process: each token is replaced by the mask with probability ``move_chance``.

    x0: (B, L) long; move_chance: (B, 1) or broadcastable to (B, L). Returns xt (B, L).
    """
    u = torch.rand(x0.shape, device=x0.device, generator=generator)
    return torch.where(u < move_chance, torch.full_like(x0, mask_index), x0)


def zero_mask_logit(logits: Tensor, mask_index: int) -> Tensor:
    """Float32 copy of ``logits`` (B, L, V) with the mask logit set to NEG_INF (never predicted)."""
    is_mask_column = torch.arange(logits.shape[-1], device=logits.device) == mask_index  # (V,)
    return logits.float().masked_fill(is_mask_column, NEG_INF)


def subs_log_probs(logits: Tensor, xt: Tensor, mask_index: int) -> Tensor:
    """SUBS parameterization of log p_theta(x0 | xt), in float32. (B, L, V) -> (B, L, V).

    1. Zero masking probability: the mask logit is set to NEG_INF before normalising.
    2. Carry-over unmasking: where xt is not the mask, the output is a one-hot on xt
       (log-prob 0 on xt, NEG_INF elsewhere).
    """
    log_probs = zero_mask_logit(logits, mask_index).log_softmax(dim=-1)         # (B, L, V)
    carry = torch.full_like(log_probs, NEG_INF).scatter_(-1, xt[..., None], 0.0)
    unmasked = (xt != mask_index)[..., None]                                     # (B, L, 1)
    return torch.where(unmasked, carry, log_probs)


def subs_nelbo(logits: Tensor, x0: Tensor, xt: Tensor, mask_index: int, weight: Tensor) -> Tensor:
    """Per-token continuous-time NELBO of MDLM with the SUBS parameterization. (B, L).

    loss_i = -log p_theta(x0_i | xt) * dsigma / expm1(sigma)   if xt_i is masked,
             0                                                 otherwise
    (carry-over makes log p = 0 on unmasked tokens). ``weight``: (B,) = dsigma / expm1(sigma).

    Only the log-probability of the true token is needed, so the full carry-over tensor
    of :func:`subs_log_probs` is never built here.
    """
    logits = zero_mask_logit(logits, mask_index)
    log_p_x0 = logits.gather(-1, x0[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (B, L)
    masked = (xt == mask_index).to(log_p_x0.dtype)
    return -log_p_x0 * masked * weight[:, None]


class MDLM(nn.Module):
    """Masked diffusion with the SUBS parameterization in continuous time (Sahoo et al. 2024).

    Holds the noise schedule and the training options; ``loss`` gives the per-token NELBO
    of a batch and ``denoiser`` turns a backbone into the callable samplers use.
    """

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        sampling_eps: float = 1e-3,
        antithetic_sampling: bool = True,
        time_conditioning: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= sampling_eps < 1.0:
            raise ValueError(f"training.sampling_eps must be in [0, 1), got {sampling_eps}.")
        self.noise = noise
        self.mask_index = mask_index
        self.sampling_eps = sampling_eps
        self.antithetic_sampling = antithetic_sampling
        self.time_conditioning = time_conditioning

    def conditioning(self, sigma: Tensor) -> Tensor:
        """What the backbone sees as its noise level: sigma, or 0 without time conditioning."""
        return sigma if self.time_conditioning else torch.zeros_like(sigma)

    def loss(self, backbone: nn.Module, x0: Tensor, attention_mask: Tensor) -> LossOutput:
        """Per-token NELBO (B, L) for one time sample per sequence; padding scores 0."""
        t = sample_times(x0.shape[0], self.sampling_eps, self.antithetic_sampling, x0.device)
        level = self.noise(t)                                                     # (B,)
        xt = q_xt(x0, level.move_chance[:, None], self.mask_index)
        logits = backbone(xt, self.conditioning(level.sigma))                    # (B, L, V)
        nll = subs_nelbo(logits, x0, xt, self.mask_index, level.nelbo_weight)
        return LossOutput(nll=nll * attention_mask, mask=attention_mask)

    def denoiser(self, backbone: nn.Module) -> Denoiser:
        """``(xt, sigma) -> log p_theta(x0 | xt)`` for the samplers."""

        def denoise(xt: Tensor, sigma: Tensor) -> Tensor:
            return subs_log_probs(backbone(xt, self.conditioning(sigma)), xt, self.mask_index)

        return denoise


ALGORITHMS: dict[str, type[nn.Module]] = {"subs": MDLM}


def build_algorithm(parameterization: str, **kwargs: object) -> nn.Module:
    """The algorithm for ``parameterization``; an unknown name lists the valid ones."""
    if parameterization not in ALGORITHMS:
        raise ValueError(
            f"Unknown parameterization={parameterization!r}. Valid choices: {sorted(ALGORITHMS)}."
        )
    return ALGORITHMS[parameterization](**kwargs)
