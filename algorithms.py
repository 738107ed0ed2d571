"""The math of masked diffusion: forward process, parameterizations and their losses.

Plain functions and one small class per algorithm; no Lightning here. The LightningModule
in ``diffusion.py`` only wires these together. Each class is one config file
``configs/algorithm/<name>.yaml`` whose keys are its constructor's arguments, and it rejects
option values it does not support with a ``ValueError`` that says what to do:

========  ==============  ===========================================================  ================
name      original name   loss                                                         default sampler
========  ==============  ===========================================================  ================
``mdlm``  ``subs``        SUBS NELBO, continuous time or discrete ``T``                ddpm_cache
``d3pm``  ``d3pm``        absorbing-state D3PM: ``T`` x per-step KL + reconstruction   ddpm_cache
``sedd``  ``sedd``        score entropy, continuous time                               analytic
``ar``    ``ar``          next-token cross-entropy                                     ar
========  ==============  ===========================================================  ================

Which samplers fit an algorithm is stated once, by its ``denoiser_kind`` (and each sampler's
``accepts``).

Notation: ``x0`` clean tokens (B, L); ``xt`` noised tokens (B, L); ``V`` vocabulary size
including the mask token; ``m`` the mask index; ``alpha_t = exp(-sigma(t))`` the probability
that a token is still clean and ``m_t = 1 - alpha_t`` its masking probability.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

import numpy as np
import torch
from torch import Tensor, nn

from noise_schedule import NoiseSchedule
from samplers import LOG_SCORE, NEXT_TOKEN_LOGITS, X0_LOG_PROBS

# Finite stand-in for log(0). -inf would turn 0 * log p into NaN and break softmax when a
# row is all -inf. -1e6 is exact in fp32 and bf16, but overflows fp16: train in bf16/fp32.
NEG_INF = -1e6


@dataclass
class LossOutput:
    """Per-token losses of a batch and the tokens they count (zeros elsewhere)."""

    nll: Tensor   # (B, L') nats per scored token (L' = L, or L - 1 for next-token prediction)
    mask: Tensor  # (B, L') 1 for scored tokens, 0 for padding / unscored
    tokens: Tensor  # (B, L') the token scored at each position (x0, or x0[:, 1:] for AR)


@dataclass
class Draws:
    """Given random numbers for a loss evaluation, in place of fresh draws.

    ``time`` (B,) uniforms in [0, 1) mapped to each parameterization's times; ``mask`` (B, L)
    uniforms for the forward process (:func:`q_xt`).
    """

    time: Tensor
    mask: Tensor


GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # Kronecker sequence step: frac(n * GOLDEN) fills [0, 1) evenly


def item_draws(indices: Tensor, length: int, seed: int, sample: int = 0, num_samples: int = 1) -> Draws:
    """Random numbers that depend only on each sequence's data-set index, not on the batch.

    Sequence ``g`` (``indices`` (B,)) in Monte-Carlo sample ``k`` of ``K = num_samples`` gets
    the time uniform ``frac(c + (g K + k) GOLDEN)``, ``c`` from the seed (a Kronecker sequence
    over the whole data set: as evenly spread as antithetic sampling within a batch), and mask
    uniforms from a generator seeded with ``(seed, g, k)``. Any split of the data over batches
    and processes then scores every sequence with the same noise: one process and several
    give the same numbers.
    """
    c = np.random.default_rng([seed, 2**31 - 1]).random()
    ranks = indices.detach().cpu().double() * num_samples + sample
    time = torch.frac(c + ranks * GOLDEN).float()
    rows = [torch.rand(length, generator=torch.Generator().manual_seed(_item_seed(seed, g, sample)))
            for g in indices.tolist()]
    mask = torch.stack(rows) if rows else torch.zeros(0, length)
    return Draws(time=time.to(indices.device), mask=mask.to(indices.device))


def _item_seed(seed: int, index: int, sample: int) -> int:
    return int(np.random.SeedSequence([seed, index, sample]).generate_state(1, np.uint64)[0] >> np.uint64(1))


Backbone = Callable[..., Tensor]
"""The network as the losses call it: ``(x (B, L), sigma (B,) or None) -> logits (B, L, V)``, an
``nn.Module`` or one with its padding mask bound (:meth:`Algorithm.with_padding_mask`)."""

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``(xt (B, L), sigma (B,)) -> (B, L, V)``: log p_theta(x0 | xt) for ``subs`` and ``d3pm``,
the log score log p_t(y) / p_t(xt) for ``sedd``."""


# --------------------------------------------------------------------------- times, forward process
def sample_times(
    n: int,
    sampling_eps: float,
    antithetic: bool,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    u: Tensor | None = None,
) -> Tensor:
    """Diffusion times for a batch, in ``[sampling_eps, 1]``. Shape (n,).

    Antithetic (low-discrepancy) sampling draws one time per stratum:
    ``u_i ~ U[i/n, (i+1)/n)`` (as ``(u/n + i/n) mod 1``), which lowers the variance of the
    batch-averaged loss. Then ``t = (1 - sampling_eps) u + sampling_eps``. Given uniforms
    ``u`` (n,) (:class:`Draws`) are used as they are, without the antithetic shift.
    """
    if u is not None:
        return (1 - sampling_eps) * u.to(device) + sampling_eps
    u = torch.rand(n, device=device, generator=generator)
    if antithetic:
        offset = torch.arange(n, device=device) / n
        u = (u / n + offset) % 1
    return (1 - sampling_eps) * u + sampling_eps


def discrete_times(u: Tensor, T: int) -> Tensor:
    """Snap ``u`` in [0, 1) to the grid {1/T, 2/T, ..., 1}: ``t = (floor(u T) + 1) / T``. (n,).

    The same snapping as the original, applied to ``u`` itself: every step k = 1..T then has
    probability exactly 1/T. (Snapping ``t = (1 - sampling_eps) u + sampling_eps`` instead
    would under-sample the last step, t = 1/T, and skip it entirely when
    ``sampling_eps >= 1/T``, e.g. with the defaults 1e-3 and T = 1000.)
    """
    k = (u * T).floor().clamp(0, T - 1)
    return (k + 1) / T


def q_xt(
    x0: Tensor, move_chance: Tensor, mask_index: int, generator: torch.Generator | None = None, u: Tensor | None = None
) -> Tensor:
    """Forward process: each token is replaced by the mask with probability ``move_chance``.

    x0: (B, L) long; move_chance: (B, 1) or broadcastable to (B, L); ``u`` (B, L): given
    uniforms instead of fresh ones. Returns xt (B, L): the mask where ``u < move_chance``.
    """
    if u is None:
        u = torch.rand(x0.shape, device=x0.device, generator=generator)
    return torch.where(u < move_chance, torch.full_like(x0, mask_index), x0)


def log_expm1(sigma: Tensor) -> Tensor:
    """``log(e^sigma - 1)`` for sigma > 0, accurate for small and large sigma (no overflow)."""
    return sigma + torch.log(-torch.expm1(-sigma))


# --------------------------------------------------------------------------- SUBS (MDLM)
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
    return carry_over_(log_probs, xt, mask_index)


def carry_over_(log_probs: Tensor, xt: Tensor, mask_index: int) -> Tensor:
    """SUBS's carry-over, in place on ``log_probs`` (B, L, V): rows where ``xt`` is not the mask become a
    one-hot on xt (0 there, NEG_INF elsewhere). Only those rows are written."""
    unmasked = xt != mask_index                                                  # (B, L)
    log_probs[unmasked] = NEG_INF
    log_probs[unmasked, xt[unmasked]] = 0.0
    return log_probs


def selects_outputs(backbone: Any) -> bool:
    """Whether ``backbone`` (or the function a ``functools.partial`` binds) takes ``output_mask``."""
    return bool(getattr(getattr(backbone, "func", backbone), "selects_outputs", False))


def subs_log_probs_at_masks(backbone: Any, xt: Tensor, sigma: Tensor, mask_index: int, **kwargs: Any) -> Tensor:
    """:func:`subs_log_probs` of ``backbone(xt, sigma)``, with the network's output layer run only where xt is
    masked when the backbone allows it (the other rows are SUBS's carry-over, whatever the logits).

    ``kwargs`` go to the backbone. Returns (B, L, V) float32, as :func:`subs_log_probs`.
    """
    if not selects_outputs(backbone):
        return subs_log_probs(backbone(xt, sigma, **kwargs), xt, mask_index)
    return subs_log_probs_of_rows(backbone(xt, sigma, output_mask=xt == mask_index, **kwargs), xt, mask_index)


def subs_log_probs_at_rows(backbone: Any, xt: Tensor, sigma: Tensor, rows: Tensor, mask_index: int,
                           **kwargs: Any) -> Tensor:
    """:func:`subs_log_probs` of ``backbone(xt, sigma)`` at the N positions where ``rows`` (B, L) is True, which
    must be masked in ``xt``: (N, V) float32, row-major order. The output layer runs at those rows only when the
    backbone allows it. ``kwargs`` go to the backbone."""
    if not selects_outputs(backbone):
        return subs_log_probs(backbone(xt, sigma, **kwargs), xt, mask_index)[rows]
    return zero_mask_logit(backbone(xt, sigma, output_mask=rows, **kwargs), mask_index).log_softmax(dim=-1)


def subs_nelbo_at_masks(backbone: Any, xt: Tensor, sigma: Tensor, x0: Tensor, mask_index: int, weight: Tensor,
                        **kwargs: Any) -> Tensor:
    """:func:`subs_nelbo` of ``backbone(xt, sigma)`` (B, L), with the output layer run only at masked positions
    when the backbone allows it (unmasked positions score 0 under carry-over either way)."""
    if not selects_outputs(backbone):
        return subs_nelbo(backbone(xt, sigma, **kwargs), x0, xt, mask_index, weight)
    masked = xt == mask_index                                                    # (B, L)
    return subs_nelbo_of_rows(backbone(xt, sigma, output_mask=masked, **kwargs), x0, masked, mask_index, weight)


def subs_nelbo_of_rows(rows: Tensor, x0: Tensor, masked: Tensor, mask_index: int, weight: Tensor) -> Tensor:
    """:func:`subs_nelbo` (B, L) from the logits ``rows`` (N, V) of the N masked positions (``masked`` (B, L)
    bool, row-major order); ``weight`` (B,) per sequence or (B, L) per token."""
    index = masked.nonzero(as_tuple=True)  # the N positions, in row-major order (one host sync)
    rows = zero_mask_logit(rows, mask_index)                                     # (N, V)
    log_p = rows.gather(-1, x0[index][:, None]).squeeze(-1) - rows.logsumexp(-1)  # (N,)
    weights = weight[index[0]] if weight.ndim == 1 else weight[index]            # (N,)
    return torch.zeros(masked.shape, dtype=log_p.dtype, device=x0.device).index_put(index, -log_p * weights)


def subs_log_probs_of_rows(rows: Tensor, xt: Tensor, mask_index: int) -> Tensor:
    """:func:`subs_log_probs` (B, L, V) from the logits ``rows`` (N, V) of the N masked positions of ``xt``."""
    masked = xt == mask_index                                                    # (B, L)
    log_probs = torch.full((*xt.shape, rows.shape[-1]), NEG_INF, device=rows.device)  # (B, L, V)
    log_probs[masked] = zero_mask_logit(rows, mask_index).log_softmax(dim=-1)
    unmasked = ~masked
    log_probs[unmasked, xt[unmasked]] = 0.0
    return log_probs


def subs_nelbo(logits: Tensor, x0: Tensor, xt: Tensor, mask_index: int, weight: Tensor) -> Tensor:
    """Per-token NELBO of MDLM with the SUBS parameterization. (B, L).

    loss_i = -log p_theta(x0_i | xt) * weight   if xt_i is masked,
             0                                  otherwise
    (carry-over makes log p = 0 on unmasked tokens). ``weight`` (B,) is
    ``dsigma / expm1(sigma) = -alpha'_t / (1 - alpha_t)`` in continuous time and
    :func:`subs_discrete_weight` in discrete time.

    Only the log-probability of the true token is needed, so the full carry-over tensor
    of :func:`subs_log_probs` is never built here.
    """
    logits = zero_mask_logit(logits, mask_index)
    log_p_x0 = logits.gather(-1, x0[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (B, L)
    masked = (xt == mask_index).to(log_p_x0.dtype)
    return -log_p_x0 * masked * weight[:, None]


def subs_discrete_weight(move_chance_t: Tensor, move_chance_s: Tensor, T: int) -> Tensor:
    """Discrete-time SUBS weight ``T (alpha_s - alpha_t) / (1 - alpha_t) = T (m_t - m_s) / m_t``. (B,).

    For a masked x_t the posterior is q(x_s = x0 | x_t, x0) = (alpha_s - alpha_t) / (1 - alpha_t),
    q(x_s = m | x_t, x0) = (1 - alpha_s) / (1 - alpha_t), and SUBS gives p_theta(x_s | x_t) the
    same form with x0 replaced by p_theta(x0 | x_t) (zero mass on the mask). The per-step KL
    is then (alpha_s - alpha_t) / (1 - alpha_t) * -log p_theta(x0 | x_t); unmasked tokens are
    copied by both and contribute 0. As T -> inf, T (m_t - m_s) -> m'_t and the weight tends to
    the continuous ``-alpha'_t / (1 - alpha_t)``.
    """
    return T * (move_chance_t - move_chance_s) / move_chance_t


# --------------------------------------------------------------------------- D3PM
def d3pm_log_probs(logits: Tensor, mask_index: int, subs_masking: bool) -> Tensor:
    """D3PM's log p_theta(x0 | xt): a log-softmax of the logits, in float32. (B, L, V).

    No carry-over. With ``subs_masking`` the mask logit is set to NEG_INF first; without it
    the model may put mass on the mask token.
    """
    logits = zero_mask_logit(logits, mask_index) if subs_masking else logits.float()
    return logits.log_softmax(dim=-1)


def d3pm_kl(log_p: Tensor, x0: Tensor, xt: Tensor, move_chance_t: Tensor, move_chance_s: Tensor,
            mask_index: int) -> Tensor:
    """Per-step KL(q(x_s | x_t, x0) || p_theta(x_s | x_t)) of absorbing-state D3PM, s < t. (B, L).

    The model's reverse step is D3PM's (Austin et al. 2021, eq. 4),
    ``p_theta(x_s | x_t) ∝ sum_x0 q(x_t | x_s) q(x_s | x0) p_theta(x0 | x_t)``, the same as the
    original's ``_d3pm_loss``. With ``a = alpha``, ``m = 1 - alpha``, ``p_m = p_theta(mask | x_t)``
    and ``p_0 = p_theta(x0 | x_t)``, for a masked x_t:

        p(x_s = v) = (a_s - a_t) p_v / (m_t + a_t p_m),   p(x_s = mask) = (m_s + a_s p_m) / (m_t + a_t p_m)
        q(x_s = x0) = (a_s - a_t) / m_t,                  q(x_s = mask) = m_s / m_t
        KL = log(1 + a_t p_m / m_t) - q(x_s = x0) log p_0 - (m_s / m_t) log(1 + a_s p_m / m_s).

    For an unmasked x_t, q(x_t | x_s) is zero unless x_s = x_t, so both distributions are a
    point mass on x_t and the KL is 0. When p_m = 0 (``subs_masking``) this is the SUBS loss of
    :func:`subs_discrete_weight` (divided by T) on masked tokens.

    Args:
        log_p: (B, L, V) log p_theta(x0 | x_t), e.g. from :func:`d3pm_log_probs`.
        x0, xt: (B, L) long.
        move_chance_t, move_chance_s: (B,) m_t > 0 and m_s >= 0, best in float64.
    """
    m_t, m_s = move_chance_t.double(), move_chance_s.double()
    a_t, a_s = 1 - m_t, 1 - m_s

    def coef(c: Tensor) -> Tensor:  # (B,) float64 -> (B, 1) in the dtype of log_p
        return c.to(log_p.dtype)[:, None]

    # a_s / m_s is only needed where m_s > 0 (at m_s = 0 its coefficient m_s / m_t is 0).
    big = torch.finfo(log_p.dtype).max
    a_s_over_m_s = torch.where(m_s > 0, a_s / m_s.clamp_min(torch.finfo(torch.float64).tiny), 0).clamp_max(big)
    p_mask = log_p[..., mask_index].exp()                                        # (B, L)
    log_p_x0 = log_p.gather(-1, x0[..., None]).squeeze(-1)                        # (B, L)
    kl = (
        torch.log1p(coef(a_t / m_t) * p_mask)
        - coef((m_t - m_s) / m_t) * log_p_x0
        - coef(m_s / m_t) * torch.log1p(coef(a_s_over_m_s) * p_mask)
    )
    return kl * (xt == mask_index).to(kl.dtype)


# --------------------------------------------------------------------------- SEDD
def sedd_log_score(logits: Tensor, xt: Tensor, sigma: Tensor) -> Tensor:
    """SEDD parameterization of the log score ``log p_t(y) / p_t(x_t)``, in float32. (B, L, V).

    ``y`` is x_t with position i changed to token v. With ``V`` the full vocabulary (mask
    included, as the original's ``logits.shape[-1]``):

        log s(x_t)_{i, v} = logits_{i, v} - log(e^sigma - 1) - log(V - 1),   log s_{i, xt_i} = 0.

    Why: for a masked x_t^i the true ratio is p(x0^i = v | visible tokens) * alpha / (1 - alpha)
    = p(v | ...) / (e^sigma - 1), so the logits play the role of log p(v | ...) up to a
    constant; ``-log(V - 1)`` (V - 1 = number of real tokens) makes zero logits a uniform
    guess. The current token's own entry is not a transition and is set to 0.

    Args:
        logits: (B, L, V) network output.
        xt: (B, L) long.
        sigma: (B,) total noise sigma(t) > 0 (the true one, whatever the network is fed).
    """
    offset = log_expm1(sigma.float())[:, None, None] + math.log(logits.shape[-1] - 1)  # (B, 1, 1)
    log_score = logits.float() - offset
    return log_score.scatter(-1, xt[..., None], 0.0)


def score_entropy(log_score: Tensor, x0: Tensor, xt: Tensor, sigma: Tensor, mask_index: int) -> Tensor:
    """SEDD's denoising score entropy per position, without the ``dsigma`` factor. (B, L).

    For a masked x_t^i the forward process gives the target ratios q_t(v | x0) / q_t(mask | x0)
    = r [v = x0^i] with ``r = alpha / (1 - alpha) = 1 / expm1(sigma)``, and

        SE = sum_{v != mask} s_v - r log s_{x0} + K(r),   K(a) = a (log a - 1),

    where ``s = exp(log_score)``. K makes SE >= 0, with equality exactly at the target
    (s_{x0} = r, s_v = 0 otherwise). It is computed in the equivalent form
    ``sum_{v not in {mask, x0}} s_v + r (e^d - d - 1)`` with ``d = log s_{x0} - log r``, which
    avoids the cancellation of terms of size r log r. Unmasked positions score 0.

    Args:
        log_score: (B, L, V), e.g. from :func:`sedd_log_score`.
        x0, xt: (B, L) long.
        sigma: (B,) total noise sigma(t) > 0.
    """
    masked = xt == mask_index                                                     # (B, L)
    log_r = -log_expm1(sigma.float())[:, None].expand_as(xt)[masked]              # (N,)
    ls = log_score[masked].float()                                                # (N, V)
    target = x0[masked][:, None]                                                  # (N, 1)
    d = ls.gather(-1, target).squeeze(-1) - log_r                                 # (N,)
    others = ls.scatter(-1, target, -torch.inf)
    others[:, mask_index] = -torch.inf
    entropy = others.logsumexp(-1).exp() + log_r.exp() * (torch.expm1(d) - d)   # (N,)
    out = torch.zeros(xt.shape, dtype=entropy.dtype, device=xt.device)
    return out.masked_scatter(masked, entropy)


# --------------------------------------------------------------------------- AR
def ar_nll(logits: Tensor, targets: Tensor, mask_index: int) -> Tensor:
    """Next-token NLL ``-log softmax(logits)[target]`` with the mask token never predicted. (B, L').

    logits: (B, L', V); targets: (B, L') long.
    """
    logits = zero_mask_logit(logits, mask_index)
    return logits.logsumexp(-1) - logits.gather(-1, targets[..., None]).squeeze(-1)


# --------------------------------------------------------------------------- algorithms
class Algorithm(nn.Module):
    """What every algorithm gives the LightningModule (a loss) and the samplers (a denoiser).

    Each subclass is one config file ``configs/algorithm/<name>.yaml`` whose keys are its
    constructor's arguments; ``mask_index`` comes at run time (``_partial_``). No caller asks
    which algorithm it holds: it asks these attributes and methods.

    Class attributes:
        name: the config name (``algorithm=<name>``).
        parameterization: the original MDLM's name for it (``parameterization=subs|d3pm|sedd|ar``),
            recorded in Hugging Face exports.
        causal: the backbone must be causal (``True``, next-token models) or bidirectional.
        denoiser_kind: what :meth:`denoiser` returns; a sampler fits when its ``accepts`` is this
            (:data:`samplers.X0_LOG_PROBS`, :data:`samplers.LOG_SCORE`, :data:`samplers.NEXT_TOKEN_LOGITS`).
        default_sampler: ``configs/sampler/<name>.yaml`` used when no sampler is chosen.
        exact_likelihood: the loss is the NLL itself (AR) rather than an upper bound on it.
        semi_ar: ``sampling.semi_ar`` windows apply to its samples.
        var_length: :meth:`sample` takes ``stop_token`` and can end samples early (``sampling.var_length``).
        needs_pretrained: training starts from a trained model (``training.from_pretrained``), e.g. a
            distillation, whose teacher it is.
        model_options: constructor options that change what the network computes or is fed.
            Evaluation takes every option from the checkpoint; a command line that contradicts
            one of these is an error, while the others (e.g. an evaluation-time ``T``) may be changed.
    """

    name: ClassVar[str]
    parameterization: ClassVar[str]
    causal: ClassVar[bool] = False
    denoiser_kind: ClassVar[str]
    default_sampler: ClassVar[str]
    model_options: ClassVar[tuple[str, ...]] = ()
    exact_likelihood: ClassVar[bool] = False  # the loss is the NLL itself (AR), not an upper bound on it
    semi_ar: ClassVar[bool] = True  # sampling.semi_ar windows apply (not to block diffusion, which extends by blocks)
    var_length: ClassVar[bool] = False  # sample() takes stop_token (sampling.var_length; block diffusion)
    needs_pretrained: ClassVar[bool] = False  # training needs training.from_pretrained (distillation)

    def __init__(self, mask_index: int) -> None:
        super().__init__()
        if isinstance(mask_index, bool) or not isinstance(mask_index, numbers.Integral) or mask_index < 0:
            raise ValueError(f"mask_index must be an integer >= 0, got {mask_index!r}.")
        self.mask_index = int(mask_index)

    def reject(self, option: str, fix: str) -> NoReturn:
        """Raise the ValueError of an unsupported option value, naming it, the algorithm and the fix."""
        value = getattr(self, option)
        raise ValueError(f"{option}={value!r} is not supported by algorithm={self.name!r} "
                         f"(parameterization={self.parameterization!r}): {fix}")

    @staticmethod
    def with_padding_mask(backbone: Backbone, attention_mask: Tensor, padded: bool | None = None) -> Backbone:
        """``backbone`` with ``attention_mask`` (B, L) bound, so that padding is hidden from its attention.

        Padding is already left out of the loss; this keeps it from changing the predictions at
        real tokens too. Without padding (all ones) the backbone itself is returned, so that
        unpadded batches run exactly as before (no mask is built, flash-attn stays usable).
        ``padded``: whether the mask has a zero, when the caller knows (checking a CUDA mask here
        would synchronise with the GPU every step).
        """
        if padded is None:
            padded = not bool(attention_mask.all())
        if not padded:
            return backbone
        return functools.partial(backbone, attention_mask=attention_mask)

    def loss(
        self, backbone: nn.Module, x0: Tensor, attention_mask: Tensor, padded: bool | None = None,
        draws: Draws | None = None,
    ) -> LossOutput:
        """Per-token loss of a batch x0 (B, L); padding scores 0 and is not attended to.

        ``padded``: whether ``attention_mask`` has a zero, when known; ``draws``: given random
        numbers (:func:`item_draws`) instead of fresh ones.
        """
        raise NotImplementedError

    def denoiser(self, backbone: nn.Module) -> Any:
        """What this algorithm's samplers call (see ``denoiser_kind``)."""
        raise NotImplementedError

    def on_train_batch_start(self, step: int) -> dict[str, float]:
        """Before each training batch, the optimizer steps taken so far (Lightning's ``global_step``, restored
        on resume); for schedules over training (DUO's curriculum). Returns what to log under ``train/``."""
        return {}

    def on_validation_batch(self, backbone: nn.Module, batch: dict[str, Any], batch_idx: int,
                            gather: Any) -> None:
        """Extra work on each validation batch during training (e.g. BD3-LM's clip search); none by default.

        ``gather``: all-gathers a tensor over the processes (``LightningModule.all_gather``).
        """

    def on_validation_end(self) -> dict[str, float]:
        """After validation during training: what to log under ``val/`` (and any state update)."""
        return {}

    def sample(self, sampler: Any, backbone: nn.Module, x: Tensor, generator: torch.Generator | None = None,
               progress: bool = False) -> Any:
        """Fill the masked positions of ``x`` (B, L): the sampler over the whole sequence with :meth:`denoiser`.

        Returns the sampler's :class:`samplers.SampleOutput`. Block diffusion overrides it (block by block).
        """
        return sampler.sample(self.denoiser(backbone), x, generator=generator, progress=progress)

    def sampler_inputs(self) -> dict[str, Any]:
        """The run-time arguments of a sampler's config (``instantiate(cfg.sampler)(**inputs)``)."""
        return {"mask_index": self.mask_index}


class MaskedDiffusion(Algorithm):
    """Shared parts of the absorbing-state algorithms: times, forward process, conditioning, loss.

    Args:
        noise: the noise schedule.
        mask_index: id of the mask token.
        time_conditioning: feed sigma (or, for MDLM's change of variables, its uniform variable)
            to the network; otherwise it sees 0.
        antithetic_sampling: one time per stratum of the batch (see :func:`sample_times`).
        sampling_eps: continuous times are drawn in ``[sampling_eps, 1]``.
        T: number of discrete diffusion steps; 0 = continuous time.
    """

    denoiser_kind = X0_LOG_PROBS
    default_sampler = "ddpm_cache"

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        time_conditioning: bool = False,
        antithetic_sampling: bool = True,
        sampling_eps: float = 1e-3,
        T: int = 0,
    ) -> None:
        super().__init__(mask_index)
        if not 0.0 <= sampling_eps < 1.0:
            raise ValueError(f"sampling_eps (training.sampling_eps) must be in [0, 1), got {sampling_eps}.")
        if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 0:
            raise ValueError(f"T must be an integer >= 0 (0 = continuous time), got {T!r}.")
        self.noise = noise
        self.time_conditioning = bool(time_conditioning)
        self.antithetic_sampling = bool(antithetic_sampling)
        self.sampling_eps = float(sampling_eps)
        self.T = int(T)

    def conditioning(self, sigma: Tensor) -> Tensor:
        """What the backbone sees as its noise level: sigma, or 0 without time conditioning."""
        return sigma if self.time_conditioning else torch.zeros_like(sigma)

    def sample_t(self, n: int, device: torch.device | str = "cpu", u: Tensor | None = None) -> Tensor:
        """Training times (n,): continuous in [sampling_eps, 1], or on the T grid (``u``: given uniforms)."""
        if self.T > 0:
            return discrete_times(sample_times(n, 0.0, self.antithetic_sampling, device, u=u), self.T)
        return sample_times(n, self.sampling_eps, self.antithetic_sampling, device, u=u)

    def diffusion_nll(self, backbone: Backbone, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Per-token loss (B, L) at times t (B,) for xt ~ q(xt | x0)."""
        raise NotImplementedError

    def reconstruction_nll(self, backbone: Backbone, x0: Tensor, u: Tensor | None = None) -> Tensor | None:
        """The reconstruction term per token (B, L) at t = 0, or None where it is 0 by construction."""
        return None

    def forward_process(self, x0: Tensor, draws: Draws | None = None) -> tuple[Tensor, Tensor]:
        """Times t (B,) from :meth:`sample_t` and xt (B, L) ~ q(xt | x0), from fresh or given draws."""
        t = self.sample_t(x0.shape[0], x0.device, u=None if draws is None else draws.time)
        xt = q_xt(x0, self.noise.move_chance(t)[:, None], self.mask_index, u=None if draws is None else draws.mask)
        return t, xt

    def loss(
        self, backbone: nn.Module, x0: Tensor, attention_mask: Tensor, padded: bool | None = None,
        draws: Draws | None = None,
    ) -> LossOutput:
        """Per-token NELBO (B, L): ``diffusion_nll`` at one time per sequence, plus the
        reconstruction term where the algorithm has one."""
        backbone = self.with_padding_mask(backbone, attention_mask, padded)
        t, xt = self.forward_process(x0, draws)
        nll = self.diffusion_nll(backbone, x0, xt, t)
        reconstruction = self.reconstruction_nll(backbone, x0, None if draws is None else draws.mask)
        if reconstruction is not None:
            nll = nll + reconstruction
        return LossOutput(nll=nll * attention_mask, mask=attention_mask, tokens=x0)

    def step_move_chances(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Masking probabilities (m_t, m_s), float64 (B,), at grid times t = k/T and s = t - 1/T."""
        k = torch.round(t.double() * self.T)  # exact integers: t came from discrete_times
        return self.noise.move_chance(k / self.T), self.noise.move_chance((k - 1) / self.T)

    def initial_state(self, x0: Tensor, u: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """z_0 (B, L) ~ q(. | x0) at t = 0 and the schedule's sigma(0) (B,)."""
        level = self.noise(torch.zeros(x0.shape[0], device=x0.device))
        return q_xt(x0, level.move_chance[:, None], self.mask_index, u=u), level.sigma

    def denoiser(self, backbone: nn.Module) -> Denoiser:
        """``(xt, sigma) -> log p_theta(x0 | xt)`` in SUBS form (zero mask probability, carry-over).

        Its attribute ``time_conditioned`` tells samplers whether the output depends on sigma
        (``ddpm_cache`` reuses it across steps only when it does not). It selects rows
        (``rows=``: the (N, V) log-probs of N masked positions only; see ``samplers.Denoiser``).
        """

        def denoise(xt: Tensor, sigma: Tensor, rows: Tensor | None = None) -> Tensor:
            if rows is not None:
                return subs_log_probs_at_rows(backbone, xt, self.conditioning(sigma), rows, self.mask_index)
            return subs_log_probs_at_masks(backbone, xt, self.conditioning(sigma), self.mask_index)

        denoise.time_conditioned = self.time_conditioning  # type: ignore[attr-defined]
        denoise.selects_rows = True  # type: ignore[attr-defined]
        return denoise

    def sampler_inputs(self) -> dict[str, Any]:
        return {"noise": self.noise, "mask_index": self.mask_index}


class MDLM(MaskedDiffusion):
    """Masked diffusion with the SUBS parameterization (Sahoo et al. 2024).

    Continuous time (``T = 0``): per masked token ``-log p_theta(x0 | xt) * dsigma / expm1(sigma)``.
    Discrete time (``T > 0``): t uniform on {1/T, ..., 1}, per masked token
    ``T (alpha_s - alpha_t) / (1 - alpha_t) * -log p_theta(x0 | xt)`` with s = t - 1/T
    (T times the per-step KL; see :func:`subs_discrete_weight`).

    Reconstruction: when the schedule masks tokens at t = 0 (``m(0) > 0``: linear, geometric),
    the NELBO has the term ``-log p_theta(x0 | z_0)``, z_0 ~ q(. | x0) at t = 0, which with
    carry-over is ``-log p_theta(x0^i | z_0)`` summed over the positions masked in z_0 (network
    conditioned on sigma(0)). It is added in continuous and discrete time; where m(0) = 0
    (loglinear, cosine, cosinesqr) it is exactly 0 and costs no network call.

    Importance sampling (``T = 0``): with ``f0 = log m(sampling_eps)`` and ``f1 = log m(1)``,
    draw ``u ~ U[0, 1)``, ``m = exp(f0 + u (f1 - f0))``, ``t = m^{-1}(m)``. The density of t is
    ``(d log m / dt) / (f1 - f0)`` and the continuous weight is
    ``-alpha' / (1 - alpha) = m' / m = d log m / dt``, so the per-masked-token weight becomes the
    constant ``f1 - f0``: an exact estimator of the integral over [sampling_eps, 1] (the
    original approximated f1 by 0). ``change_of_variables`` uses the same draw and feeds the
    network u instead of sigma.
    """

    name = "mdlm"
    parameterization = "subs"
    model_options = ("time_conditioning", "change_of_variables")

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        T: int = 0,
        time_conditioning: bool = False,
        sampling_eps: float = 1e-3,
        antithetic_sampling: bool = True,
        importance_sampling: bool = False,
        change_of_variables: bool = False,
    ) -> None:
        super().__init__(noise, mask_index, time_conditioning, antithetic_sampling, sampling_eps, T)
        self.importance_sampling = bool(importance_sampling)
        self.change_of_variables = bool(change_of_variables)
        for option in ("importance_sampling", "change_of_variables"):
            if getattr(self, option) and self.T > 0:
                self.reject(option, f"it is a continuous-time estimator; set T=0 or {option}=false.")
        if self.importance_sampling and self.change_of_variables:
            self.reject("change_of_variables", "it already implies the log-uniform draw of importance "
                        "sampling; set only one of importance_sampling / change_of_variables.")
        if self.change_of_variables and not self.time_conditioning:
            self.reject("change_of_variables", "it only changes what the network is conditioned on, and "
                        "without time conditioning the network sees 0; set time_conditioning=true, or use "
                        "importance_sampling=true instead.")
        if self.log_uniform and not self.log_move_chance_range()[0].isfinite():
            option = "importance_sampling" if self.importance_sampling else "change_of_variables"
            self.reject(option, f"log m(sampling_eps) must be finite; set sampling_eps > 0 "
                        f"(got {self.sampling_eps}, where this schedule's masking probability is 0).")
        self.masks_at_zero = bool(self.noise.move_chance(torch.zeros((), dtype=torch.float64)) > 0)

    @property
    def log_uniform(self) -> bool:
        """Whether times are drawn log-uniformly in the masking probability."""
        return self.importance_sampling or self.change_of_variables

    def log_move_chance_range(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(f0, f1) = (log m(sampling_eps), log m(1))``, 0-dim float64."""
        t = torch.tensor([self.sampling_eps, 1.0], dtype=torch.float64, device=device)
        f = self.noise.move_chance(t).log()
        return f[0], f[1]

    def conditioning(self, sigma: Tensor) -> Tensor:
        """sigma; 0 without time conditioning; ``u = (log m - f0) / (f1 - f0)`` with the change of variables."""
        if not self.time_conditioning:
            return torch.zeros_like(sigma)
        if self.change_of_variables:
            f0, f1 = self.log_move_chance_range(sigma.device)
            log_m = torch.log(-torch.expm1(-sigma.double()))
            return ((log_m - f0) / (f1 - f0)).to(sigma.dtype)
        return sigma

    def sample_t(self, n: int, device: torch.device | str = "cpu", u: Tensor | None = None) -> Tensor:
        """Times (n,) for a batch: continuous, snapped to the T grid, or log-uniform in m (``u``: given uniforms)."""
        if self.log_uniform:
            u = sample_times(n, 0.0, self.antithetic_sampling, device, u=u).double()
            f0, f1 = self.log_move_chance_range(device)
            t = self.noise.inverse_move_chance(torch.exp(f0 + u * (f1 - f0)))
            return t.clamp(self.sampling_eps, 1.0).float()
        return super().sample_t(n, device, u)

    def diffusion_nll(self, backbone: Backbone, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Per-token loss (B, L) at times t (B,) drawn by :meth:`sample_t`, for xt ~ q(xt | x0)."""
        sigma = self.noise.total_noise(t)                                         # (B,)
        if self.T > 0:
            weight = subs_discrete_weight(*self.step_move_chances(t), self.T).float()
        elif self.log_uniform:
            f0, f1 = self.log_move_chance_range(t.device)
            weight = (f1 - f0).float().expand(t.shape)
        else:
            weight = self.noise(t).nelbo_weight
        return subs_nelbo_at_masks(backbone, xt, self.conditioning(sigma), x0, self.mask_index, weight)

    def reconstruction_nll(self, backbone: Backbone, x0: Tensor, u: Tensor | None = None) -> Tensor | None:
        """``-log p_theta(x0 | z_0)`` per token (B, L), z_0 ~ q(. | x0) at t = 0; None when m(0) = 0."""
        if not self.masks_at_zero:
            return None
        z0, sigma0 = self.initial_state(x0, u)
        ones = torch.ones(x0.shape[0], device=x0.device)
        return subs_nelbo(backbone(z0, self.conditioning(sigma0)), x0, z0, self.mask_index, ones)


class D3PM(MaskedDiffusion):
    """Absorbing-state D3PM (Austin et al. 2021) in discrete time, as the paper's baseline.

    t uniform on {1/T, ..., 1}, s = t - 1/T, alpha from the schedule. Per token:
    ``T * KL(q(x_s | x_t, x0) || p_theta(x_s | x_t))`` (:func:`d3pm_kl`) plus the
    reconstruction term ``-log p_theta(x0 | z_0)``, with z_0 ~ q(. | x0) at t = 0 (x0 itself
    when m(0) = 0, as for loglinear) and the network conditioned on the schedule's sigma(0).
    The prior term KL(q(x_1 | x0) || all-mask) is a constant of the schedule and left out.

    ``denoiser`` gives the samplers p_theta(x0 | x_t, x0 != mask) with carry-over (their
    contract); it is the model's exact reverse step when the model puts no mass on the mask
    (``subs_masking=True``), an approximation otherwise.
    """

    name = "d3pm"
    parameterization = "d3pm"
    model_options = ("time_conditioning", "subs_masking")

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        T: int = 0,
        time_conditioning: bool = False,
        subs_masking: bool = False,
        antithetic_sampling: bool = True,
    ) -> None:
        super().__init__(noise, mask_index, time_conditioning, antithetic_sampling, 0.0, T)
        self.subs_masking = bool(subs_masking)
        if self.T == 0:
            self.reject("T", "D3PM is a discrete-time model; set T=1000 (the paper's setting).")

    def diffusion_nll(self, backbone: Backbone, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """``T * KL`` per token (B, L) at grid times t (B,), for xt ~ q(xt | x0)."""
        logits = backbone(xt, self.conditioning(self.noise.total_noise(t)))      # (B, L, V)
        log_p = d3pm_log_probs(logits, self.mask_index, self.subs_masking)
        move_chance_t, move_chance_s = self.step_move_chances(t)
        return self.T * d3pm_kl(log_p, x0, xt, move_chance_t, move_chance_s, self.mask_index)

    def reconstruction_nll(self, backbone: Backbone, x0: Tensor, u: Tensor | None = None) -> Tensor:
        """``-log p_theta(x0 | z_0)`` per token (B, L), z_0 ~ q(. | x0) at t = 0 (``u``: given uniforms)."""
        z0, sigma0 = self.initial_state(x0, u)
        log_p = d3pm_log_probs(backbone(z0, self.conditioning(sigma0)), self.mask_index, self.subs_masking)
        return -log_p.gather(-1, x0[..., None]).squeeze(-1)


class SEDD(MaskedDiffusion):
    """Score-entropy discrete diffusion (Lou et al. 2024) for the absorbing process.

    Continuous time only. Per masked token ``dsigma * SE`` with the score of
    :func:`sedd_log_score` and the score entropy of :func:`score_entropy`. The
    parameterization uses the true sigma even without time conditioning (the original fed it
    the zeroed sigma, which breaks log(e^sigma - 1)). ``denoiser`` returns log scores, for the
    ``analytic`` sampler.
    """

    name = "sedd"
    parameterization = "sedd"
    denoiser_kind = LOG_SCORE
    default_sampler = "analytic"
    model_options = ("time_conditioning",)

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        time_conditioning: bool = False,
        sampling_eps: float = 1e-3,
        antithetic_sampling: bool = True,
    ) -> None:
        super().__init__(noise, mask_index, time_conditioning, antithetic_sampling, sampling_eps, 0)

    def diffusion_nll(self, backbone: Backbone, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """``dsigma * score entropy`` per token (B, L) at times t (B,), for xt ~ q(xt | x0)."""
        level = self.noise(t)
        log_score = sedd_log_score(backbone(xt, self.conditioning(level.sigma)), xt, level.sigma)
        return level.dsigma.float()[:, None] * score_entropy(log_score, x0, xt, level.sigma, self.mask_index)

    def denoiser(self, backbone: nn.Module) -> Denoiser:
        """``(xt, sigma) -> log score (B, L, V)`` for the analytic sampler."""

        def score(xt: Tensor, sigma: Tensor) -> Tensor:
            return sedd_log_score(backbone(xt, self.conditioning(sigma)), xt, sigma)

        score.time_conditioned = True  # type: ignore[attr-defined]  # the score scales with sigma
        return score


class AR(Algorithm):
    """Autoregressive baseline: next-token cross-entropy of a causal backbone.

    ``logits = backbone(x0[:, :-1], None)`` (padding mask ``attention_mask[:, :-1]``) predict
    ``x0[:, 1:]``; the mask logit is set to NEG_INF (the vocabulary is shared with the diffusion
    models); scored tokens are ``attention_mask[:, 1:]``. Its "denoiser" is the causal backbone
    itself (``model(tokens, None)``, ``new_cache``, ``forward_step``), which the AR sampler drives.
    """

    name = "ar"
    parameterization = "ar"
    causal = True
    exact_likelihood = True
    denoiser_kind = NEXT_TOKEN_LOGITS
    default_sampler = "ar"

    def loss(
        self, backbone: nn.Module, x0: Tensor, attention_mask: Tensor, padded: bool | None = None,
        draws: Draws | None = None,
    ) -> LossOutput:
        """Per-token next-token NLL (B, L - 1); padding scores 0 and is not attended to."""
        backbone = self.with_padding_mask(backbone, attention_mask[:, :-1], padded)
        logits = backbone(x0[:, :-1], None)                                        # (B, L - 1, V)
        mask = attention_mask[:, 1:]
        return LossOutput(nll=ar_nll(logits, x0[:, 1:], self.mask_index) * mask, mask=mask, tokens=x0[:, 1:])

    def denoiser(self, backbone: nn.Module) -> nn.Module:
        """The causal backbone: ``(tokens (B, L), None) -> logits (B, L, V)`` plus its KV cache."""
        return backbone
