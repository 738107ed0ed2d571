"""ReMDM (Wang et al. 2025, arXiv 2503.00307): ancestral sampling that may remask generated tokens.

With ``alpha_t = 1 - m_t`` the probability that a token is still clean at time t, one step from t
to s < t draws, per generated position, from the remasking posterior

    unmasked z_t = x:  x with probability 1 - sigma_t, the mask with probability sigma_t;
    masked z_t:        a token from p_theta(x_0 | z_t) with probability
                       (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t), the mask otherwise.

For every ``0 <= sigma_t <= sigma_max = min(1, (1 - alpha_s) / alpha_t)`` its marginals given x_0
are those of the forward process (Theorem 3.1), so a model trained as MDLM samples with it
unchanged; ``sigma_t = 0`` is MDLM's ancestral step. ``sigma_t`` comes from a schedule:

- ``cap``: ``min(eta, (1 - alpha_s) / alpha_t)``;
- ``rescale``: ``eta * sigma_max``;
- ``conf``: per position ``softmax_l(-psi_l) * sigma_max`` over the generated tokens, psi_l the
  probability token l had when it was drawn (the least confident are remasked most). As in the
  reference code, a masked position then has sigma = 0, so its unmask rate does not make up for
  the remasking: the clean fraction drifts below alpha_t (measured: 0.066 instead of 0.101 at the
  third of 20 steps on a 16-token toy; tests/test_remdm.py). It is a heuristic, not marginal-preserving.

The forward-backward corrector is the special case ``sigma = (alpha_s - alpha_t) / alpha_t`` and
the DFM corrector ``sigma = beta_t (alpha_s - alpha_t) / alpha_t``. They are valid only while
``sigma <= sigma_max`` (for forward-backward: ``2 alpha_s - alpha_t <= 1``), which fails near the
end of every grid (alpha_s -> 1); the reference code then draws from negative "probabilities".
Here any sigma above sigma_max is an error (:func:`check_sigma`), never a silent clip, so they are
not offered as schedules.

and a strategy that says when it applies:

- ``all``: at every step;
- ``switch``: only for ``t < t_switch``;
- ``loop``: three phases on the uniform grid, with ``alpha(t) = (1 - t) alpha_on / (1 - t_on)`` for
  t > t_on (MDLM steps up to alpha_on), ``alpha_on`` for t_off < t <= t_on (remasking with the
  schedule: a stationary loop that revisits tokens), ``1 - t (1 - alpha_on) / t_off`` for t <= t_off
  (MDLM steps). Both ends of a step use this one function; the reference code evaluated a step's
  end with its start's phase, so its last ramp step overshot alpha_on (0.95 instead of 0.9 with
  40 steps), which the loop then had to relax.

Given tokens (a prefix or infilling template) are never remasked. With the exact denoiser the
``cap`` / ``rescale`` steps keep the forward marginals and their output law is the one the test
computes over a whole toy joint (like MDLM's ancestral steps, exact as the steps get small). Temperature < 1 and the
nucleus (the paper's evaluation uses p = 0.9) are not exact in law.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from noise_schedule import NoiseSchedule
from samplers import Denoiser, DiffusionSampler, SampleOutput, reads_time, sample_categorical

SCHEDULES = ("cap", "rescale", "conf")
STRATEGIES = ("all", "switch", "loop")
TOLERANCE = 1e-12  # sigma may exceed sigma_max by rounding only


def sigma_max(alpha_t: float, alpha_s: float) -> float:
    """The largest valid remasking probability of a step from alpha_t to alpha_s >= alpha_t."""
    return 1.0 if alpha_t <= 0.0 else min(1.0, (1.0 - alpha_s) / alpha_t)


def check_sigma(sigma: float, alpha_t: float, alpha_s: float) -> None:
    """``ValueError`` unless ``0 <= sigma <= sigma_max(alpha_t, alpha_s)`` (up to rounding)."""
    if not -TOLERANCE <= sigma <= sigma_max(alpha_t, alpha_s) + TOLERANCE:
        raise ValueError(f"remasking probability sigma={sigma:.4g} is outside [0, sigma_max] = [0, "
                         f"{sigma_max(alpha_t, alpha_s):.4g}] for alpha_t={alpha_t:.4g}, alpha_s={alpha_s:.4g}: "
                         "not a valid step (sigma_max = min(1, (1 - alpha_s) / alpha_t)).")


def unmask_probability(alpha_t: float, alpha_s: float, sigma: Tensor | float) -> Tensor | float:
    """P(a masked position takes a token) in a step from alpha_t to alpha_s with remasking sigma."""
    return (alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t)


@dataclass(frozen=True)
class Step:
    """One step of the plan: the clean probabilities at both ends, and the remasking probability
    (None: the per-position ``conf`` rule; 0: an MDLM step)."""

    alpha_t: float
    alpha_s: float
    sigma: float | None


class ReMDMSampler(DiffusionSampler):
    """Remasking sampler of ReMDM on the time grid ``linspace(1, eps, steps + 1)``.

    Args:
        noise, mask_index, steps, eps, noise_removal, dtype, temperature, top_p, top_p_rule: as
            for :class:`samplers.DiffusionSampler`.
        schedule: how sigma_t is set, one of :data:`SCHEDULES`.
        eta: the schedule's parameter (cap, rescale), in [0, 1].
        strategy: when remasking applies, one of :data:`STRATEGIES`.
        t_switch: ``switch`` remasks for t < t_switch (no default: the paper tunes it).
        t_on, t_off, alpha_on: ``loop``'s phases (paper defaults 0.55, 0.05, 0.9).
        time_conditioning: the denoiser reads sigma (then nothing is reused between steps); None:
            the denoiser's ``time_conditioned`` attribute says, else False.
    """

    name = "remdm"

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        steps: int,
        eps: float = 1e-5,
        noise_removal: bool | str | None = True,
        dtype: torch.dtype | str = torch.float64,
        *,
        schedule: str = "cap",
        eta: float = 0.02,
        strategy: str = "loop",
        t_switch: float | None = None,
        t_on: float = 0.55,
        t_off: float = 0.05,
        alpha_on: float = 0.9,
        time_conditioning: bool | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_p_rule: str = "remdm",
    ) -> None:
        super().__init__(noise, mask_index, steps, eps=eps, noise_removal=noise_removal, dtype=dtype,
                         temperature=temperature, top_p=top_p, top_p_rule=top_p_rule)
        if schedule not in SCHEDULES:
            raise ValueError(f"sampler schedule={schedule!r}; valid choices: {list(SCHEDULES)}")
        if strategy not in STRATEGIES:
            raise ValueError(f"sampler strategy={strategy!r}; valid choices: {list(STRATEGIES)}")
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"sampler eta must be in [0, 1], got {eta!r}.")
        if strategy == "switch" and (t_switch is None or not 0.0 < t_switch <= 1.0):
            raise ValueError(f"strategy=switch needs sampler.t_switch in (0, 1] (remasking for t < t_switch), "
                             f"got {t_switch!r}.")
        if strategy == "loop" and not (0.0 < t_off < t_on < 1.0 and 0.0 < alpha_on < 1.0):
            raise ValueError(f"strategy=loop needs 0 < t_off < t_on < 1 and 0 < alpha_on < 1; got t_on={t_on}, "
                             f"t_off={t_off}, alpha_on={alpha_on} (the paper: 0.55, 0.05, 0.9).")
        self.schedule, self.eta, self.strategy = schedule, float(eta), strategy
        self.t_switch = None if t_switch is None else float(t_switch)
        self.t_on, self.t_off, self.alpha_on = float(t_on), float(t_off), float(alpha_on)
        self.time_conditioning = time_conditioning
        self._plan = self.plan()  # a sigma above sigma_max is an error now, before any network call

    def __repr__(self) -> str:
        strategy = self.strategy
        if strategy == "switch":
            strategy += f"(t_switch={self.t_switch})"
        elif strategy == "loop":
            strategy += f"(t_on={self.t_on}, t_off={self.t_off}, alpha_on={self.alpha_on})"
        return f"{super().__repr__()[:-1]}, schedule={self.schedule}, eta={self.eta}, strategy={strategy})"

    # ---- the plan: alpha_t, alpha_s and sigma of every step -------------------------------------

    def plan(self) -> list[Step]:
        """The steps of the grid; ``ValueError`` if a schedule's sigma exceeds sigma_max anywhere."""
        times = self._time_grid(torch.device("cpu")).tolist()
        steps = []
        for i, (t, s) in enumerate(zip(times[:-1], times[1:], strict=True)):
            alpha_t, alpha_s, remask = self._alphas(t, s)
            sigma = self._sigma(alpha_t, alpha_s) if remask else 0.0
            if sigma is not None:
                try:
                    check_sigma(sigma, alpha_t, alpha_s)
                except ValueError as error:
                    raise ValueError(f"schedule={self.schedule}, step {i} (t={t:.4g} -> {s:.4g}): {error}") from None
            steps.append(Step(alpha_t, alpha_s, sigma))
        return steps

    def _alphas(self, t: float, s: float) -> tuple[float, float, bool]:
        """(alpha_t, alpha_s, whether this step remasks) for the step t -> s."""
        if self.strategy == "loop":
            return self._loop_alpha(t), self._loop_alpha(s), self.t_off < t <= self.t_on
        m = self.noise.move_chance(torch.tensor([t, s], dtype=torch.float64)).tolist()
        remask = self.strategy == "all" or t < self.t_switch
        return 1.0 - m[0], 1.0 - m[1], remask

    def _loop_alpha(self, t: float) -> float:
        if t > self.t_on:
            return (1.0 - t) * self.alpha_on / (1.0 - self.t_on)
        if t > self.t_off:
            return self.alpha_on
        return 1.0 - t * (1.0 - self.alpha_on) / self.t_off

    def _sigma(self, alpha_t: float, alpha_s: float) -> float | None:
        if self.schedule == "cap":
            return self.eta if alpha_t <= 0.0 else min(self.eta, (1.0 - alpha_s) / alpha_t)
        if self.schedule == "rescale":
            return self.eta * sigma_max(alpha_t, alpha_s)
        return None  # conf: per position, at sampling time

    # ---- sampling -------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        x: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> SampleOutput:
        x = self._check_input(x)  # (B, L)
        free = x == self.mask_index  # (B, L) the positions to generate (given tokens are never remasked)
        confidence = torch.full(x.shape, -math.inf, dtype=self.dtype, device=x.device)  # -psi; -inf: none
        time_conditioned = reads_time(self.time_conditioning, denoiser)
        log_p, stale, nfe = None, True, 0
        plan = self._plan
        with self._progress(progress) as bar:
            for i in bar:
                step = plan[i]
                if stale or time_conditioned:
                    log_p = self._call_sigma(denoiser, x, self._noise_level(step.alpha_t, x.shape[0], x.device))
                    nfe += 1
                x_s = self._step_remdm(log_p, x, free, step, confidence, generator)
                stale = not torch.equal(x_s, x)
                x = x_s
        if self.noise_removal and (x == self.mask_index).any():
            if stale or time_conditioned:
                log_p = self._call_sigma(denoiser, x, self._noise_level(plan[-1].alpha_s, x.shape[0], x.device))
                nfe += 1
            x = self._remove_noise(log_p, x, generator)
        return SampleOutput(tokens=x, nfe=nfe)

    @staticmethod
    def _noise_level(alpha: float, batch: int, device: torch.device) -> Tensor:
        """The network's sigma for a state whose tokens are clean with probability alpha: -log(alpha)."""
        return torch.full((batch,), -math.log(max(alpha, 1e-300)), dtype=torch.float64, device=device)

    def _step_remdm(self, log_p: Tensor, x: Tensor, free: Tensor, step: Step, confidence: Tensor,
                    generator: torch.Generator | None) -> Tensor:
        """One step t -> s: remask generated tokens with sigma, unmask masked ones at the matching rate."""
        masked = x == self.mask_index  # (B, L)
        generated = free & ~masked
        if step.sigma is None:  # conf: sigma_l = softmax_l(-psi_l) * sigma_max over the generated tokens
            weights = confidence.softmax(-1).nan_to_num_(0.0)  # a row with no generated token: all -inf -> 0
            sigma = weights * sigma_max(step.alpha_t, step.alpha_s)  # (B, L)
        else:
            sigma = torch.full(x.shape, step.sigma, dtype=self.dtype, device=x.device)
        u = torch.rand(x.shape, dtype=self.dtype, device=x.device, generator=generator)  # (B, L)
        unmask = masked & (u < unmask_probability(step.alpha_t, step.alpha_s, sigma))
        remask = generated & (u < sigma)
        if not (unmask.any() or remask.any()):
            return x
        x_s = x.clone()
        if unmask.any():
            probs = self._token_probs(log_p[unmask])  # (N, V)
            tokens = sample_categorical(probs, generator, self.dtype)
            x_s[unmask] = tokens
            if self.schedule == "conf":
                chosen = probs.gather(-1, tokens[:, None])[:, 0] / probs.sum(-1)
                confidence[unmask] = -chosen
        x_s[remask] = self.mask_index
        confidence[remask] = -math.inf
        return x_s
