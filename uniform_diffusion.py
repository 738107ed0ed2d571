"""Uniform-state discrete diffusion: UDLM (Schiff et al. 2024) and DUO (Sahoo et al., ICML 2025).

**States.** The K = V - 1 real tokens. The tokenizer's mask token is in the vocabulary (V ids)
but is never a state: it is never drawn, and the network's probability on it is 0 (its logit is
set to ``NEG_INF``, as SUBS does).

**Forward process.** A token stays with probability ``alpha_t = exp(-sigma(t))`` and is
otherwise replaced by a uniform draw from the K real tokens (possibly itself):

    q(x_t | x_0) = alpha_t e_{x_0} + (1 - alpha_t) / K.

**Parameterization** (the reference's ``mean``). ``x_theta`` = the network's softmax over the
real tokens, at time conditioning ``sigma``. The model's reverse step is the forward posterior
with ``x_theta`` in place of ``e_{x_0}``:

    p_theta(x_s | x_t) = q(x_t | x_s) q(x_s | x_theta) / q(x_t | x_theta),
    q(x_s | x_theta) = alpha_s x_theta + (1 - alpha_s) / K,

which by Bayes is the mixture ``sum_v w_v q(x_s | x_t, x_0 = v)`` with ``w_v ∝ x_theta(v) q(x_t | v)``
(:mod:`uniform_samplers`).

**NELBO** (continuous time, per token). With ``xbar = K alpha e_{x_0} + (1 - alpha)`` and
``xbar_theta = K alpha x_theta + (1 - alpha)`` (vectors over the real tokens), the reverse jump
rates ``x_t -> y`` are ``(dsigma/dt / K) r_y`` given x_0 and ``(dsigma/dt / K) s_y`` under the
model, with ``r_y = xbar_y / xbar_{x_t}`` and ``s_y = xbar_theta_y / xbar_theta_{x_t}``, and

    L_t(x_0, x_t) = (dsigma/dt / K) sum_{y != x_t} [ s_y - r_y - r_y log(s_y / r_y) ]  >= 0,

the generalized KL between the two rate vectors (dsigma/dt = -alpha'/alpha). The NELBO is
``E_{t ~ U[eps, 1]} E_{x_t} sum_i L_t`` plus the prior term ``KL(q(x_1 | x_0) || uniform)`` per
token (a constant of the schedule; the reference leaves it out, it is below 0.004 nats at
alpha_1 = 1e-3 and K = 50k). :func:`udlm_nelbo` evaluates the sum over y in closed form (xbar
takes two values) in float64 per token, from one pass over the vocabulary.

**What the network learns.** The NELBO is minimised, and is exactly ``-log p + KL(p_1 || uniform)``
in expectation, by ``x_theta^i(v) ∝ p(x_0^i = v | x_t) / q(x_t^i | v)``: the posterior of x_0^i
given the *other* positions of x_t. Then ``s`` is the true ratio ``p_t(y) / p_t(x_t)`` and the
reverse step above is the exact mixture over ``p(x_0^i | x_t)``. (Plugging ``p(x_0^i | x_t)``
itself into ``x_theta`` is not optimal: tests/test_uniform_diffusion.py shows the gap on a toy.)

**DUO.** ``argmax`` of the Gaussian latent ``ã x_0 + sqrt(1 - ã²) ε`` is a uniform-state latent
with ``alpha = T(ã)`` (:mod:`duality`). DUO's training objective during its curriculum is the NELBO
integrand above on a band of Gaussian noise levels: ``t ~ U[eps, 1]``, ``gamma_t = gamma_min + t
(gamma_max - gamma_min)``, ``ã_t² = sigmoid(-gamma_t)``, ``alpha_t = T(ã_t)`` and ``dsigma/dt =
-T'(ã_t) ã'_t / T(ã_t)`` with ``ã'_t = -ã_t (1 - ã_t²) (gamma_max - gamma_min) / 2``, at ``x_t =
argmax(w_t)``, the network fed ``softmax(w_t / τ)``. After the curriculum, and in evaluation
(validation, ``ppl_eval``), it is UDLM's NELBO with the noise schedule, like the reference.
Consistency distillation of a DUO model: :mod:`distillation`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from algorithms import Algorithm, Backbone, Draws, LossOutput, sample_times, zero_mask_logit
from duality import DualityValue, duality, gaussian_latent
from noise_schedule import NoiseSchedule
from samplers import X0_LOG_PROBS_UNIFORM


# --------------------------------------------------------------------------- states and forward process
def backbone_vocab_size(backbone: Any) -> int:
    """V, the number of ids the backbone scores (its ``vocab_size``; through a ``functools.partial`` too)."""
    size = getattr(getattr(backbone, "func", backbone), "vocab_size", None)
    if size is None:
        raise TypeError(f"uniform-state diffusion needs the backbone's vocab_size attribute (the DiT and DiMamba "
                        f"have one); {type(backbone).__name__} has none.")
    return int(size)


def uniform_tokens(shape: tuple[int, ...], vocab_size: int, mask_index: int, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> Tensor:
    """Uniform draws from the K = V - 1 real tokens (every id but ``mask_index``). Long, of ``shape``."""
    r = torch.randint(vocab_size - 1, shape, device=device, generator=generator)
    return r + (r >= mask_index).long()


def tokens_from_uniforms(u: Tensor, vocab_size: int, mask_index: int) -> Tensor:
    """Uniform real tokens (B, L), each row a function of that row of the given uniforms ``u`` (B, L) alone.

    For given draws (:class:`algorithms.Draws`, which hold one uniform per position): the row's
    uniforms seed a generator, so the tokens depend only on the sequence's own draws (the same for
    any batching) and are independent of the ``u < 1 - alpha`` test in law.
    """
    rows = []
    for row in (u.detach().double().cpu() * 2.0**32).long().tolist():
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(row).generate_state(1, np.uint64)[0] >> 1))
        rows.append(uniform_tokens((len(row),), vocab_size, mask_index, generator=generator))
    out = torch.stack(rows) if rows else torch.zeros(u.shape, dtype=torch.long)
    return out.to(u.device)


def q_xt_uniform(x0: Tensor, move_chance: Tensor, vocab_size: int, mask_index: int,
                 generator: torch.Generator | None = None, u: Tensor | None = None) -> Tensor:
    """Forward process: each token is replaced, with probability ``move_chance``, by a uniform real token.

    x0: (B, L) long; move_chance: ``1 - alpha_t``, (B, 1) or broadcastable to (B, L); ``u`` (B, L):
    given uniforms instead of fresh draws (:func:`tokens_from_uniforms`). Returns x_t (B, L), never the mask.
    """
    if u is None:
        u = torch.rand(x0.shape, device=x0.device, generator=generator)
        tokens = uniform_tokens(tuple(x0.shape), vocab_size, mask_index, x0.device, generator)
    else:
        tokens = tokens_from_uniforms(u, vocab_size, mask_index)
    return torch.where(u < move_chance, tokens, x0)


def uniform_prior_kl(sigma_1: Tensor, num_real: int) -> Tensor:
    """``KL(q(x_1 | x_0) || uniform)`` per token, float64, at ``sigma_1 = sigma(1)``.

    With ``a = alpha_1``: ``(a + (1 - a)/K) log(K a + 1 - a) + (K - 1)/K (1 - a) log(1 - a)``.
    """
    sigma_1 = sigma_1.double()
    a, one_minus = torch.exp(-sigma_1), -torch.expm1(-sigma_1)
    k = num_real
    return (a + one_minus / k) * torch.log1p((k - 1) * a) + (k - 1) / k * one_minus * torch.log(one_minus)


# --------------------------------------------------------------------------- the NELBO
def udlm_log_probs(logits: Tensor, mask_index: int) -> Tensor:
    """log x_theta (B, L, V) float32: the softmax over the real tokens (the mask at ``NEG_INF``)."""
    return zero_mask_logit(logits, mask_index).log_softmax(dim=-1)


def udlm_nelbo(logits: Tensor, x0: Tensor, xt: Tensor, sigma: Tensor, dsigma: Tensor, mask_index: int) -> Tensor:
    """Per-token continuous-time NELBO integrand of uniform-state diffusion (UDLM). (B, L) float32.

    ``L_t = (dsigma / K) sum_{y != x_t} [s_y - r_y - r_y log(s_y / r_y)]`` (module docstring), with
    ``rho = K alpha / (1 - alpha) = K / expm1(sigma)``, ``l_y = log(1 + rho x_theta(y))``, ``p = x_theta`` and
    ``Lambda = sum_y l_y`` (real tokens), in the closed form

    * x_t = x_0:  ``(K + rho) rho (1 - p_xt) / ((1 + rho p_xt)(1 + rho))
      - [(Lambda - l_xt) - (K - 1) log((1 + rho p_xt) / (1 + rho))] / (1 + rho)``
    * x_t != x_0: ``(1 + rho) log((1 + rho) / (1 + rho p_x0)) - (Lambda - l_xt - l_x0)
      + (K + rho) (l_xt - rho p_xt / (1 + rho p_xt)) - l_xt``

    times ``dsigma / K``. Each piece is formed without cancellation (float64 per token; the one pass
    over the vocabulary, ``Lambda``, in float32 with a float64 sum).

    Args:
        logits: (B, L, V) network output (the mask column is ignored).
        x0, xt: (B, L) long, real tokens.
        sigma: (B,) total noise ``-log alpha_t`` > 0; dsigma: (B,) its time derivative ``-alpha'_t / alpha_t``.
        mask_index: the mask id (not a state).
    """
    k = logits.shape[-1] - 1                                                      # K real tokens
    log_p = udlm_log_probs(logits, mask_index)                                    # (B, L, V)
    rho = k / torch.expm1(sigma.double())                                         # (B,)
    ell = F.softplus(log_p + rho.log().float()[:, None, None])                    # (B, L, V) log(1 + rho p)
    total = ell.sum(-1, dtype=torch.float64)                                      # (B, L) Lambda
    rest_t = total - ell.gather(-1, xt[..., None]).squeeze(-1).double()           # Lambda - l_xt
    rest_t0 = rest_t - ell.gather(-1, x0[..., None]).squeeze(-1).double()         # Lambda - l_xt - l_x0
    log_p_t = log_p.gather(-1, xt[..., None]).squeeze(-1).double()                # (B, L)
    log_p_0 = log_p.gather(-1, x0[..., None]).squeeze(-1).double()
    rho = rho[:, None]                                                            # (B, 1)
    p_t, q_t, q_0 = log_p_t.exp(), -torch.expm1(log_p_t), -torch.expm1(log_p_0)  # p_xt, 1 - p_xt, 1 - p_x0
    ell_t = torch.logaddexp(torch.zeros_like(log_p_t), rho.log() + log_p_t)       # l_xt in float64
    same = (k + rho) * rho * q_t / ((1 + rho * p_t) * (1 + rho)) - (
        rest_t - (k - 1) * torch.log1p(-rho * q_t / (1 + rho))) / (1 + rho)
    moved = ((1 + rho) * torch.log1p(rho * q_0 / (1 + rho * (1 - q_0))) - rest_t0
             + (k + rho) * (ell_t - rho * p_t / (1 + rho * p_t)) - ell_t)
    loss = torch.where(xt == x0, same, moved) * (dsigma.double()[:, None] / k)
    return loss.float()


# --------------------------------------------------------------------------- algorithms
class UniformDiffusion(Algorithm):
    """Shared parts of the uniform-state algorithms: forward process, NELBO, denoiser.

    The network is always told the noise level (``sigma = -log alpha_t``): a uniform-state
    model cannot read it off x_t as a masked one can (the reference requires time conditioning).

    Args:
        noise: the noise schedule ``alpha_t = exp(-sigma(t))`` of the NELBO and of sampling.
        mask_index: the tokenizer's mask id, which is not a state.
        sampling_eps: times are drawn in ``[sampling_eps, 1]``.
        antithetic_sampling: one time per stratum of the batch (:func:`algorithms.sample_times`).
    """

    denoiser_kind = X0_LOG_PROBS_UNIFORM
    default_sampler = "uniform_ancestral"

    def __init__(self, noise: NoiseSchedule, mask_index: int, sampling_eps: float = 1e-3,
                 antithetic_sampling: bool = True) -> None:
        super().__init__(mask_index)
        if not 0.0 < sampling_eps < 1.0:
            raise ValueError(f"sampling_eps (training.sampling_eps) must be in (0, 1) for uniform-state diffusion "
                             f"(the NELBO's weight is infinite at alpha = 1), got {sampling_eps}.")
        self.noise = noise
        self.sampling_eps = float(sampling_eps)
        self.antithetic_sampling = bool(antithetic_sampling)

    def sample_t(self, n: int, device: torch.device | str = "cpu", u: Tensor | None = None) -> Tensor:
        """Times (n,) in ``[sampling_eps, 1]`` (``u``: given uniforms)."""
        return sample_times(n, self.sampling_eps, self.antithetic_sampling, device, u=u)

    def nelbo(self, backbone: nn.Module, x0: Tensor, attention_mask: Tensor, padded: bool | None = None,
              draws: Draws | None = None) -> LossOutput:
        """Per-token NELBO (B, L): :func:`udlm_nelbo` at one time per sequence plus the prior term."""
        vocab_size = backbone_vocab_size(backbone)
        bound = self.with_padding_mask(backbone, attention_mask, padded)
        t = self.sample_t(x0.shape[0], x0.device, u=None if draws is None else draws.time)
        level = self.noise(t)
        xt = q_xt_uniform(x0, level.move_chance[:, None], vocab_size, self.mask_index,
                          u=None if draws is None else draws.mask)
        nll = udlm_nelbo(bound(xt, level.sigma), x0, xt, level.sigma, level.dsigma, self.mask_index)
        prior = uniform_prior_kl(self.noise.total_noise(torch.ones((), device=x0.device)), vocab_size - 1)
        return LossOutput(nll=(nll + prior.float()) * attention_mask, mask=attention_mask, tokens=x0)

    def loss(self, backbone: nn.Module, x0: Tensor, attention_mask: Tensor, padded: bool | None = None,
             draws: Draws | None = None) -> LossOutput:
        """The NELBO (:meth:`nelbo`); padding scores 0 and is not attended to."""
        return self.nelbo(backbone, x0, attention_mask, padded, draws)

    def denoiser(self, backbone: nn.Module) -> Any:
        """``(x_t (B, L), sigma (B,)) -> log x_theta (B, L, V)`` float32, the mask at ``NEG_INF``.

        Attributes for the samplers: ``time_conditioned`` (True) and ``vocab_size`` (V; the prior at
        t = 1 is uniform over its V - 1 real tokens).
        """

        def denoise(xt: Tensor, sigma: Tensor) -> Tensor:
            return udlm_log_probs(backbone(xt, sigma), self.mask_index)

        denoise.time_conditioned = True  # type: ignore[attr-defined]
        denoise.vocab_size = backbone_vocab_size(backbone)  # type: ignore[attr-defined]
        return denoise

    def sampler_inputs(self) -> dict[str, Any]:
        return {"noise": self.noise, "mask_index": self.mask_index}


class UDLM(UniformDiffusion):
    """Uniform-state diffusion with its continuous-time NELBO (Schiff et al. 2024), for training and evaluation."""

    name = "udlm"
    parameterization = "udlm"


class DUO(UniformDiffusion):
    """DUO (Sahoo et al. 2025): UDLM trained through the Gaussian duality, with its curriculum.

    **Curriculum** (training steps ``0 .. curriculum_end - 1``; :meth:`on_train_batch_start` tells the
    step): the NELBO integrand at ``alpha_t = T(ã_t)`` for ``gamma_t`` uniform in ``[gamma_min,
    gamma_max]`` (:meth:`band_noise`; module docstring), at ``x_t = argmax(w_t)`` of the Gaussian latent
    ``w_t = ã_t e_x0 + sqrt(1 - ã_t²) ε`` (:func:`duality.gaussian_latent`), while the network is fed the
    tempered softmax ``softmax(w_t / τ)`` instead of the one-hot x_t (:meth:`curriculum_nll`). τ is
    annealed on a log10 scale (:meth:`tau`): ``log10 τ = gumbel_tau_log10_start`` before
    ``curriculum_start``, then linear to ``gumbel_tau_log10_end`` at ``curriculum_end``.
    **After it**, and always in evaluation (validation, ``ppl_eval``): UDLM's NELBO with ``noise`` and
    discrete inputs. The reference's defaults (``configs/algorithm/duo.yaml``) are for 1M-step runs;
    its LM1B / OWT scripts use ``curriculum_start=0``, ``curriculum_end=500_000`` and τ = 1e-3 throughout.

    Args:
        noise, mask_index, sampling_eps, antithetic_sampling: as :class:`UniformDiffusion`.
        gamma_min, gamma_max: the curriculum's band of Gaussian log noise-to-signal ratios,
            ``ã² = sigmoid(-gamma)``, gamma_min < gamma_max.
        curriculum_start, curriculum_end: training steps, 0 <= start <= end; ``curriculum_end=0``: no curriculum.
        gumbel_tau_log10_start, gumbel_tau_log10_end: log10 of the softmax temperature at those steps.
    """

    name = "duo"
    parameterization = "duo"

    def __init__(self, noise: NoiseSchedule, mask_index: int, sampling_eps: float = 1e-3,
                 antithetic_sampling: bool = True, gamma_min: float = -3.5, gamma_max: float = -1.75,
                 curriculum_start: int = 100_000, curriculum_end: int = 200_000,
                 gumbel_tau_log10_start: float = -1.0, gumbel_tau_log10_end: float = -2.0) -> None:
        super().__init__(noise, mask_index, sampling_eps, antithetic_sampling)
        if not (math.isfinite(gamma_min) and math.isfinite(gamma_max) and gamma_min < gamma_max):
            raise ValueError(f"DUO needs finite gamma_min < gamma_max (algorithm.gamma_min / algorithm.gamma_max), "
                             f"got {gamma_min} and {gamma_max}.")
        for name, value in (("curriculum_start", curriculum_start), ("curriculum_end", curriculum_end)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"algorithm.{name} must be a step count >= 0, got {value!r}.")
        if curriculum_start > curriculum_end:
            raise ValueError(f"algorithm.curriculum_start={curriculum_start} is after algorithm.curriculum_end="
                             f"{curriculum_end}: the temperature is annealed from start to end (0 / 0: no curriculum).")
        if not (math.isfinite(gumbel_tau_log10_start) and math.isfinite(gumbel_tau_log10_end)):
            raise ValueError("algorithm.gumbel_tau_log10_start / _end must be finite (log10 of the temperature), "
                             f"got {gumbel_tau_log10_start} and {gumbel_tau_log10_end}.")
        self.gamma_min = float(gamma_min)
        self.gamma_max = float(gamma_max)
        self.curriculum_start = int(curriculum_start)
        self.curriculum_end = int(curriculum_end)
        self.gumbel_tau_log10_start = float(gumbel_tau_log10_start)
        self.gumbel_tau_log10_end = float(gumbel_tau_log10_end)
        self.step = 0  # optimizer steps taken (on_train_batch_start); 0 outside a trainer

    # ----------------------------------------------------------------- the curriculum's schedule
    def tau(self, step: int) -> float | None:
        """The softmax temperature at a training step, or None from ``curriculum_end`` on (discrete inputs).

        ``log10 τ = start`` for step < curriculum_start, ``start + (step - curriculum_start) / (curriculum_end -
        curriculum_start) (end - start)`` up to curriculum_end (the reference's ``_compute_gumbel_tau_inverse``).
        """
        if step >= self.curriculum_end:
            return None
        log10_tau = self.gumbel_tau_log10_start
        if step >= self.curriculum_start:
            fraction = (step - self.curriculum_start) / (self.curriculum_end - self.curriculum_start)
            log10_tau += fraction * (self.gumbel_tau_log10_end - self.gumbel_tau_log10_start)
        return 10.0**log10_tau

    def on_train_batch_start(self, step: int) -> dict[str, float]:
        """Record the step; log ``curriculum_on`` (1 / 0) and ``curriculum_tau`` (0 once the inputs are discrete)."""
        self.step = int(step)
        tau = self.tau(self.step)
        return {"curriculum_on": float(tau is not None), "curriculum_tau": 0.0 if tau is None else tau}

    # ----------------------------------------------------------------- losses
    def band_noise(self, t: Tensor, num_real: int) -> tuple[Tensor, Tensor, Tensor, DualityValue]:
        """``(sigma, dsigma/dt, ã)`` (B,) float64 at band times t (B,), and T's values there.

        ``gamma = gamma_min + t (gamma_max - gamma_min)``, ``ã = sqrt(sigmoid(-gamma))``,
        ``sigma = -log T(ã)``, ``dsigma/dt = -T'(ã) ã' / T(ã)``, ``ã' = -ã (1 - ã²) (gamma_max - gamma_min) / 2``.
        """
        span = self.gamma_max - self.gamma_min
        gamma = self.gamma_min + t.double() * span
        a_tilde = torch.sigmoid(-gamma).sqrt()
        value = duality(a_tilde, num_real)
        sigma = -torch.log1p(-value.one_minus)
        da_dt = -0.5 * a_tilde * torch.sigmoid(gamma) * span                      # 1 - ã² = sigmoid(gamma)
        dsigma = -value.slope * da_dt / value.alpha
        return sigma, dsigma, a_tilde, value

    def band_nll(self, backbone: Backbone, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """The band's loss per token (B, L) at times t (B,) with discrete inputs x_t, drawn at ``alpha = T(ã_t)``
        (the curriculum's loss as τ -> 0)."""
        sigma, dsigma, _, _ = self.band_noise(t, backbone_vocab_size(backbone) - 1)
        return udlm_nelbo(backbone(xt, sigma.float()), x0, xt, sigma, dsigma, self.mask_index)

    def curriculum_nll(self, backbone: Backbone, x0: Tensor, t: Tensor, tau: float,
                       generator: torch.Generator | None = None) -> Tensor:
        """The curriculum's loss per token (B, L) at band times t (B,) and temperature τ.

        ``w = gaussian_latent(x0, ã_t)`` (B, L, V) (ε from ``generator``), ``x_t = argmax(w)``, the network
        fed ``softmax(w / τ)`` (the mask's weight 0), and :func:`udlm_nelbo` at x_t with the band's sigma.
        """
        vocab_size = backbone_vocab_size(backbone)
        check_soft_inputs(backbone)
        sigma, dsigma, a_tilde, _ = self.band_noise(t, vocab_size - 1)
        w = gaussian_latent(x0, a_tilde.float(), vocab_size, self.mask_index, generator)   # (B, L, V)
        xt = w.argmax(-1)                                                                     # (B, L)
        weights = torch.softmax(w.div_(tau), dim=-1)                                          # (B, L, V)
        del w
        logits = backbone(xt, sigma.float(), soft_inputs=weights)
        return udlm_nelbo(logits, x0, xt, sigma, dsigma, self.mask_index)

    def loss(self, backbone: nn.Module, x0: Tensor, attention_mask: Tensor, padded: bool | None = None,
             draws: Draws | None = None) -> LossOutput:
        """Training during the curriculum: :meth:`curriculum_nll` (given ``draws`` fix the times only); after it
        and in evaluation (backbone in eval mode): the NELBO."""
        tau = self.tau(self.step)
        if not backbone.training or tau is None:
            return self.nelbo(backbone, x0, attention_mask, padded, draws)
        bound = self.with_padding_mask(backbone, attention_mask, padded)
        t = self.sample_t(x0.shape[0], x0.device, u=None if draws is None else draws.time)
        nll = self.curriculum_nll(bound, x0, t, tau)
        return LossOutput(nll=nll * attention_mask, mask=attention_mask, tokens=x0)


def check_soft_inputs(backbone: Any) -> None:
    """A ValueError unless ``backbone`` (or the function a ``functools.partial`` binds) takes ``soft_inputs=``."""
    forward = getattr(getattr(backbone, "func", backbone), "forward", backbone)
    parameters = inspect.signature(forward).parameters.values()
    if not any(p.name == "soft_inputs" or p.kind is p.VAR_KEYWORD for p in parameters):
        name = type(getattr(backbone, "func", backbone)).__name__
        raise ValueError(f"DUO's curriculum feeds the network soft inputs (soft_inputs=), which {name} does not take: "
                         "use backbone=dit, or train without the curriculum (algorithm.curriculum_end=0).")
