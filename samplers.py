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
(:mod:`conditioning` builds such templates from text.) :func:`semi_ar_sample` chains
windows to generate sequences longer than the model's length (semi-autoregressive sampling).

The ``analytic`` sampler (:class:`AnalyticSampler`, for SEDD) takes a score function
``x_t, sigma -> log p_t(y) / p_t(x_t)`` in place of the denoiser; with the exact score its
steps are the same exact reverse steps.

The categorical draws run in float64 by default; ``dtype=torch.float32`` reproduces float32
samplers, whose truncated tail lowers the effective temperature (:func:`sample_categorical`).

A new sampler is one class and one config file ``configs/sampler/<name>.yaml`` (``_target_``
the class, ``_partial_: true``: the algorithm supplies its run-time inputs, the noise schedule
and the mask index). It subclasses :class:`Sampler` (or :class:`DiffusionSampler` for the
shared time grid and ancestral step), implements ``sample``, and says in ``accepts`` which kind
of denoiser it needs; an algorithm states the kind it provides (``denoiser_kind``), and that is
the only place where what fits what is decided.
"""

from __future__ import annotations

import abc
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm import tqdm

from noise_schedule import NoiseSchedule

# The kinds of denoiser an algorithm provides (``Algorithm.denoiser_kind``) and a sampler accepts.
X0_LOG_PROBS = "x0_log_probs"        # (x_t, sigma) -> log p_theta(x_0 | x_t) in SUBS form (MDLM, D3PM)
LOG_SCORE = "log_score"              # (x_t, sigma) -> log p_t(y) / p_t(x_t) (SEDD)
NEXT_TOKEN_LOGITS = "next_token_logits"  # a causal model: (tokens, None) -> logits, with a KV cache (AR)
X0_LOG_PROBS_UNIFORM = "x0_log_probs_uniform"  # (x_t, sigma) -> log x_theta of uniform-state diffusion (UDLM, DUO)

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoiser(x_t: (B, L) long, sigma: (B,) float) -> log p_theta(x_0 | x_t): (B, L, V)``.

The output is already SUBS-parameterised: the mask token has probability 0 and unmasked
positions are a one-hot on their current token.

A denoiser whose attribute ``selects_rows`` is true also takes ``rows=`` (B, L) bool, True at
masked positions only, and then returns the (N, V) log-probs of those N positions alone, in
row-major order (``denoiser(x_t, sigma)[rows]``, without computing the others: the network's
output layer runs at N rows). Samplers that need a few positions per call use it
(:func:`call_rows`); the others see the (B, L, V) output.
"""

# dtype of the sigma handed to the denoiser; the network's time embedding runs in float32.
SIGMA_DTYPE = torch.float32


@dataclass
class SampleOutput:
    """What a sampler returns."""

    tokens: Tensor  # (B, L) long
    nfe: int        # number of denoiser calls made, the noise-removal call included
    lengths: Tensor | None = None  # (B,) long: tokens of each sample (variable length), None: all of L


# Precisions the categorical draws may run in; float64 is the default (see sample_categorical).
SAMPLING_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def check_sampling_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` or ``torch.float64`` (also given by name, as in a config); ``ValueError`` otherwise."""
    resolved = SAMPLING_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in SAMPLING_DTYPES.values():
        raise ValueError(
            f"sampling dtype must be torch.float32 or torch.float64 (or 'float32' / 'float64'), got {dtype!r}."
        )
    return resolved


def sample_categorical(
    probs: Tensor, generator: torch.Generator | None = None, dtype: torch.dtype | str = torch.float64
) -> Tensor:
    """Draw one index per row of ``probs`` (..., V), with probability ``probs / probs.sum(-1)``.

    Exponential race (equivalent to the Gumbel-max trick): with ``E_v ~ Exp(1)`` i.i.d.,
    ``argmax_v probs_v / E_v`` is distributed as the normalised ``probs``, so rows need not be
    normalised (any positive scale per row gives the same draw for the same noise). The
    arithmetic runs in ``dtype``, whatever the input dtype:

    * float64 (default): ``E`` from ``Tensor.exponential_`` in float64 (53-bit uniforms).
    * float32: ``E = -log U`` with ``U`` a float32 uniform (24 random bits), i.e. float32
      Gumbel-max (``G = -log E``), the noise of the original MDLM code up to its 1e-10
      offsets (``1e-10 - log(U + 1e-10)``). Then
      ``E in [-log(1 - 2^-24), -log(tiny)] = [6e-8, 87]``, and ``E <= 16.6`` unless ``U = 0``
      (probability 2^-24): a category below about ``6e-8 / 16.6 = 4e-9`` of the largest
      probability practically never wins, and the tail up to ~1e-7 is under-sampled. The
      truncated tail acts like a lowered temperature and makes generative perplexity look
      better than it is (Zheng et al. 2024, arXiv 2409.02908). float32 also underflows
      unnormalised masses below ~1e-38 to zero. Use it only to reproduce float32 samplers.

    Args:
        probs: (..., V) non-negative, unnormalised probabilities, any float dtype.
        generator: source of the noise, for reproducible draws.
        dtype: ``torch.float64`` or ``torch.float32`` (or their names).

    Returns:
        (...,) long indices in ``[0, V)``.
    """
    dtype = check_sampling_dtype(dtype)
    probs = probs.to(dtype)
    tiny = torch.finfo(dtype).tiny
    if dtype == torch.float64:
        noise = torch.empty_like(probs).exponential_(generator=generator)  # (..., V)
        # E = 0 has probability ~2^-53 per draw; 0 / 0 would be NaN, which argmax would pick.
        noise.clamp_min_(tiny)
    else:  # float32 uniforms made explicit: on CPU, exponential_ computes in float64 and rounds
        noise = torch.rand(probs.shape, dtype=dtype, device=probs.device, generator=generator)
        noise = noise.clamp_min_(tiny).log_().neg_()  # (..., V), -log U >= 6e-8 > 0
    return torch.div(probs, noise, out=noise).argmax(dim=-1)  # in place: V can be 50k


# Nucleus (top-p) rules. "remdm": keep the tokens whose cumulative probability, in decreasing
# order, is <= p, plus the most likely one (ReMDM's code and paper; the token that crosses p is
# dropped). "hf": keep the smallest set whose probability reaches p (Hugging Face, Holtzman et al.;
# the crossing token is kept). With p = 0.9 and probabilities (0.5, 0.3, 0.15, 0.05): "remdm"
# keeps 2 tokens (0.8), "hf" keeps 3 (0.95).
TOP_P_RULES = ("remdm", "hf")
# What a diffusion sampler does with positions still masked after its last step.
NOISE_REMOVAL = ("argmax", "sample", "none")


def nucleus(probs: Tensor, top_p: float, rule: str = "remdm") -> Tensor:
    """Zero the tokens outside the top-p nucleus of each row of ``probs`` (..., V).

    Rows need not be normalised (the comparison is with ``top_p`` times the row's total); the
    result is not renormalised (:func:`sample_categorical` does not need it). ``rule`` is one of
    :data:`TOP_P_RULES`. ``top_p >= 1`` returns ``probs`` unchanged.
    """
    if rule not in TOP_P_RULES:
        raise ValueError(f"top_p_rule={rule!r}; valid choices: {list(TOP_P_RULES)}")
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(-1, descending=True)
    cumulative = sorted_probs.cumsum(-1)
    limit = top_p * cumulative[..., -1:]
    if rule == "remdm":
        keep = cumulative <= limit
        keep[..., 0] = True
    else:
        keep = cumulative - sorted_probs < limit  # the mass of strictly more likely tokens is below p
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)


def ranks(scores: Tensor) -> Tensor:
    """(..., L) the rank of each entry in its row by decreasing score: 0 = the highest (ties: leftmost)."""
    return scores.argsort(dim=-1, descending=True, stable=True).argsort(-1)


def reads_time(time_conditioning: bool | None, denoiser: Any) -> bool:
    """Whether the denoiser's output depends on sigma, so a cached output cannot be reused: the sampler's
    ``time_conditioning`` setting, or for None the denoiser's ``time_conditioned`` attribute (algorithms
    set it), else False."""
    if time_conditioning is None:
        return bool(getattr(denoiser, "time_conditioned", False))
    return bool(time_conditioning)


def takes_rows(denoiser: Any) -> bool:
    """Whether ``denoiser`` takes ``rows=`` (its ``selects_rows`` attribute; see :data:`Denoiser`)."""
    return bool(getattr(denoiser, "selects_rows", False))


class Sampler(abc.ABC):
    """The interface every sampler has.

    Class attributes:
        name: the config name (``sampler=<name>``).
        accepts: the kind of denoiser ``sample`` needs (:data:`X0_LOG_PROBS`, :data:`LOG_SCORE`,
            :data:`NEXT_TOKEN_LOGITS`); it fits the algorithms whose ``denoiser_kind`` it is.
        left_to_right: generates a masked suffix after a given prefix, one token at a time (a
            template then starts with BOS; infilling and semi-AR windows do not apply).
    """

    name: ClassVar[str]
    accepts: ClassVar[str]
    left_to_right: ClassVar[bool] = False

    @abc.abstractmethod
    def sample(
        self,
        denoiser: Any,
        x: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> SampleOutput:
        """Generate the masked positions of ``x`` (B, L); other tokens are kept as given."""


def check_fits(sampler: Sampler | type[Sampler], algorithm: Any, fitting: Callable[[], Sequence[str]]) -> None:
    """Raise a ValueError unless ``sampler`` accepts the denoiser that ``algorithm`` provides.

    Args:
        sampler: the sampler (or its class).
        algorithm: the algorithm (or its class): ``denoiser_kind``, ``name``, ``parameterization``,
            ``default_sampler``.
        fitting: returns the names of the samplers that fit, for the message (called only on a mismatch).
    """
    if sampler.accepts != algorithm.denoiser_kind:
        raise ValueError(
            f"sampler={sampler.name} does not apply to algorithm={algorithm.name} (parameterization="
            f"{algorithm.parameterization}); valid choices: {list(fitting())} (sampler=NAME, or the original's "
            f"sampling.predictor=NAME). Leave it out for the default, {algorithm.default_sampler}."
        )


class DiffusionSampler(Sampler):
    """Shared math of the samplers for masked diffusion: the time grid, the reverse step, the
    token distribution (temperature, nucleus) and noise removal.

    Args:
        noise: the noise schedule the model was trained with; only ``move_chance(t)`` and
            ``total_noise(t)`` are used, so any schedule works.
        mask_index: id of the mask token.
        steps: number of reverse steps from ``t = 1`` to ``t = eps`` (None for samplers
            without a time grid, e.g. first-hitting).
        eps: final time; the grid is ``linspace(1, eps, steps + 1)``.
        noise_removal: what happens to positions still masked after the last step:
            ``"argmax"`` (or true, the original's) sets them to the denoiser's most likely token
            at ``t = eps``; ``"sample"`` draws them from it (temperature and nucleus applied);
            ``"none"`` (or false) leaves them masked.
        dtype: precision of the categorical draws (the uniform / exponential noise and the
            step's probabilities): ``torch.float64`` (default) or ``torch.float32``, which
            truncates the tail (see :func:`sample_categorical`). The time grid is float64.
        temperature: > 0; tokens are drawn from ``p^(1/temperature)`` (renormalised). 1 samples
            the model's distribution; below 1 is not exact in law.
        top_p: in (0, 1]; tokens are drawn from the nucleus of ``p`` (after temperature). 1
            disables it; below 1 is not exact in law.
        top_p_rule: ``"remdm"`` (default: cumulative probability <= p plus the top token, as
            ReMDM) or ``"hf"`` (the smallest set reaching p, as Hugging Face); see :func:`nucleus`.
    """

    accepts = X0_LOG_PROBS

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        steps: int | None,
        eps: float = 1e-5,
        noise_removal: bool | str | None = True,
        dtype: torch.dtype | str = torch.float64,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_p_rule: str = "remdm",
    ) -> None:
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1):
            raise ValueError(f"sampler steps must be an integer >= 1, got {steps!r}.")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 < eps < 1.0:
            raise ValueError(f"sampler eps must be a float in (0, 1), got {eps!r}.")
        if isinstance(mask_index, bool) or not isinstance(mask_index, numbers.Integral) or mask_index < 0:
            raise ValueError(f"mask_index must be an integer >= 0, got {mask_index!r}.")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"sampler temperature must be a number > 0, got {temperature!r}.")
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"sampler top_p must be in (0, 1], got {top_p!r}.")
        if top_p_rule not in TOP_P_RULES:
            raise ValueError(f"sampler top_p_rule={top_p_rule!r}; valid choices: {list(TOP_P_RULES)}")
        self.noise = noise
        self.mask_index = int(mask_index)
        self.steps = None if steps is None else int(steps)
        self.eps = float(eps)
        self.noise_removal = self._check_noise_removal(noise_removal)
        self.dtype = check_sampling_dtype(dtype)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_p_rule = top_p_rule

    @staticmethod
    def _check_noise_removal(value: bool | str | None) -> str | None:
        """true / "argmax" -> "argmax", "sample" -> "sample", false / None / "none" -> None."""
        if value is True or value == "argmax":
            return "argmax"
        if value is False or value is None or value == "none":
            return None
        if value == "sample":
            return "sample"
        raise ValueError(f"sampler noise_removal={value!r}; valid choices: {list(NOISE_REMOVAL)} (or true / false)")

    @property
    def exact(self) -> bool:
        """Whether the token draws are the model's distribution (temperature 1, no nucleus)."""
        return self.temperature == 1.0 and self.top_p >= 1.0

    def __repr__(self) -> str:
        extra = "" if self.exact else f", temperature={self.temperature}, top_p={self.top_p} ({self.top_p_rule})"
        return (
            f"{type(self).__name__}(steps={self.steps}, eps={self.eps}, "
            f"mask_index={self.mask_index}, noise_removal={self.noise_removal}, dtype={self.dtype}{extra})"
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
        if self.steps is None:
            raise TypeError(f"{type(self).__name__} has no time grid (steps=None).")
        return torch.linspace(1.0, self.eps, self.steps + 1, dtype=torch.float64, device=device)

    def _call(self, denoiser: Denoiser, x: Tensor, t: Tensor) -> Tensor:
        """Run the denoiser on x (B, L) at the scalar time t; returns log-probs (B, L, V)."""
        return self._call_sigma(denoiser, x, self.noise.total_noise(t).to(SIGMA_DTYPE).repeat(x.shape[0]))

    def _call_sigma(self, denoiser: Denoiser, x: Tensor, sigma: Tensor) -> Tensor:
        """Run the denoiser on x (B, L) at noise levels sigma (B,); returns log-probs (B, L, V)."""
        log_p = denoiser(x, sigma.to(SIGMA_DTYPE))
        if log_p.dim() != 3 or log_p.shape[:2] != x.shape or log_p.shape[2] <= self.mask_index:
            raise ValueError(
                f"denoiser must return log-probs of shape (B, L, V) = ({x.shape[0]}, "
                f"{x.shape[1]}, V > mask_index={self.mask_index}), got {tuple(log_p.shape)}."
            )
        return log_p

    def _call_rows(self, denoiser: Denoiser, x: Tensor, sigma: Tensor, rows: Tensor) -> Tensor:
        """The denoiser's log-probs (N, V) at the N masked positions where ``rows`` (B, L) is True, in
        row-major order, for x (B, L) at noise levels sigma (B,). A denoiser that selects rows computes
        only those; for another this is its whole output, indexed."""
        if not takes_rows(denoiser):
            return self._call_sigma(denoiser, x, sigma)[rows]
        log_p = denoiser(x, sigma.to(SIGMA_DTYPE), rows=rows)
        if log_p.dim() != 2 or log_p.shape[1] <= self.mask_index:
            raise ValueError(f"denoiser(..., rows=) must return log-probs of shape (N, V > mask_index="
                             f"{self.mask_index}), got {tuple(log_p.shape)}.")
        return log_p

    def _unmasking(self, x: Tensor, t: Tensor, s: Tensor, generator: torch.Generator | None) -> Tensor | None:
        """The positions (B, L) bool that unmask in the ancestral step from t to s < t, or None when none
        does: each masked position independently, with probability ``(m_t - m_s) / m_t``, a law that does
        not involve the model. Draws the same uniforms as :meth:`_step`."""
        masked = x == self.mask_index  # (B, L)
        if not masked.any():
            return None
        m_t = self.noise.move_chance(t).to(self.dtype)
        m_s = self.noise.move_chance(s).to(self.dtype)
        u = torch.rand(x.shape, dtype=self.dtype, device=x.device, generator=generator)  # (B, L)
        unmask = masked & (u * m_t < m_t - m_s)  # P = (m_t - m_s) / m_t, without dividing
        return unmask if unmask.any() else None

    def _step(self, log_p: Tensor, x: Tensor, t: Tensor, s: Tensor,
              generator: torch.Generator | None) -> Tensor:
        """One ancestral step from time t to s < t.

        For a masked position the reverse step is ``q(v) ∝ p(v) (m_t - m_s)`` over real tokens
        and ``q(mask) ∝ m_s``, normalised by ``m_t`` (SUBS: p gives the mask probability 0).
        It is drawn in two stages with the same law: the position unmasks with probability
        ``(m_t - m_s) / m_t``, which does not depend on the model, and only the unmasking
        positions draw a token from ``p``. With ``steps >> L`` few positions unmask per
        step, so this avoids a draw over (masked positions x V) on every step. All of it runs
        in ``self.dtype`` (float64 by default).
        Noise is drawn in row-major order, so two samplers on the same trajectory consume
        the same numbers.

        Args:
            log_p: (B, L, V) log p_theta(x_0 | x_t).
            x: (B, L) long, the state at time t.
            t, s: 0-dim float64 times.

        Returns:
            (B, L) long, the state at time s (``x`` itself when nothing changes).
        """
        unmask = self._unmasking(x, t, s, generator)
        if unmask is None:
            return x
        x_s = x.clone()
        x_s[unmask] = self._draw(log_p[unmask], generator)  # N unmasking positions
        return x_s

    def _token_probs(self, log_p: Tensor) -> Tensor:
        """(N, V) log p_theta rows (a fresh tensor: it is modified) -> (N, V) unnormalised probabilities
        in ``self.dtype``: the mask token removed, temperature and nucleus applied."""
        log_p = log_p.to(self.dtype)
        if self.temperature != 1.0:  # p^(1/T), from the row maximum so that small T cannot underflow a row
            log_p = (log_p - log_p.amax(-1, keepdim=True)).div_(self.temperature)
        probs = log_p.exp_()
        probs[:, self.mask_index] = 0.0
        return nucleus(probs, self.top_p, self.top_p_rule)

    def _draw(self, log_p: Tensor, generator: torch.Generator | None) -> Tensor:
        """(N, V) log p_theta rows (a fresh tensor) -> (N,) tokens drawn from :meth:`_token_probs`."""
        return sample_categorical(self._token_probs(log_p), generator, self.dtype)

    def _remove_noise(self, log_p: Tensor, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Fill the masked positions of x (B, L): ``argmax_v log_p[..., v]`` (v != mask), or a draw
        from the token distribution when ``noise_removal == "sample"``."""
        masked = x == self.mask_index  # (B, L)
        return self._removed(log_p[masked], x, masked, generator)  # (N, V) rows, a copy

    def _removed(self, log_p: Tensor, x: Tensor, masked: Tensor, generator: torch.Generator | None) -> Tensor:
        """:meth:`_remove_noise` from the log-probs (N, V) of the N positions where ``masked`` (B, L) is True."""
        x = x.clone()
        x[masked] = self._draw(log_p, generator) if self.noise_removal == "sample" else self._greedy(log_p)
        return x

    def _greedy(self, log_p: Tensor) -> Tensor:
        """(N, V) log p_theta rows (a fresh tensor: it is modified) -> (N,) their most likely real tokens."""
        log_p[:, self.mask_index] = -torch.inf
        return log_p.argmax(dim=-1)

    def _progress(self, progress: bool) -> tqdm:
        """Iterator over the step indices, with a progress bar if asked for."""
        return tqdm(range(self.steps), desc=f"sampling ({self.name})", disable=not progress)


class DDPMSampler(DiffusionSampler):
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
            x = self._remove_noise(self._call(denoiser, x, times[-1]), x, generator)
            nfe += 1
        return SampleOutput(tokens=x, nfe=nfe)


class DDPMCacheSampler(DiffusionSampler):
    """Ancestral sampling that skips the network while the sequence does not change.

    Without time conditioning the denoiser depends on ``x_t`` only, so when a step leaves
    the whole batch unchanged (``x_s == x_t``) the previous output is still exact and is
    reused. The network is called only when some position is masked and the state differs
    from the one of the last call; with ``steps >> L`` most steps change nothing.

    With a denoiser that selects rows (:func:`takes_rows`, the DiT's), the step's unmasking
    positions are drawn first (their law does not involve the model, see :meth:`_step`) and
    the network is called only when some position unmasks, for those positions' log-probs
    alone. Every call then sees a new state, so there is nothing to cache, the NFE is the
    number of steps that change the state (plus noise removal), and time conditioning costs
    no extra call. The law is the same.

    Draws the same random numbers as :class:`DDPMSampler`, so with the same generator seed
    both return identical tokens (with a row-selecting denoiser, up to the rounding of the
    output layer over fewer rows).

    Args:
        time_conditioning: the denoiser depends on sigma; then nothing is reused and the
            sampler calls the network once per step, like ``ddpm``. None (the default): the
            denoiser's own ``time_conditioned`` attribute says (algorithms set it), else False.
    """

    name = "ddpm_cache"

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        steps: int,
        eps: float = 1e-5,
        noise_removal: bool | str | None = True,
        time_conditioning: bool | None = None,
        dtype: torch.dtype | str = torch.float64,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_p_rule: str = "remdm",
    ) -> None:
        super().__init__(noise, mask_index, steps, eps=eps, noise_removal=noise_removal, dtype=dtype,
                         temperature=temperature, top_p=top_p, top_p_rule=top_p_rule)
        self.time_conditioning = time_conditioning

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        x: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> SampleOutput:
        if takes_rows(denoiser):
            return self._sample_rows(denoiser, x, generator, progress)
        x = self._check_input(x)  # (B, L)
        times = self._time_grid(x.device)
        nfe = 0
        time_conditioned = reads_time(self.time_conditioning, denoiser)
        cache: Tensor | None = None  # (B, L, V) denoiser output, valid for x unless stale
        # A stale cache is overwritten rather than freed first: on CPU, freeing the large
        # output before the next call makes that call markedly slower (page faults).
        stale = True
        with self._progress(progress) as bar:
            for i in bar:
                if stale and not (x == self.mask_index).any():  # checked only after a change (a host sync)
                    break  # nothing left to generate; masks never reappear
                if stale or time_conditioned:
                    cache = self._call(denoiser, x, times[i])
                    nfe += 1
                x_s = self._step(cache, x, times[i], times[i + 1], generator)
                # _step returns x itself when no position unmasks, and a changed copy otherwise (an
                # unmasked position always gets a real token): no comparison, no host sync.
                stale = x_s is not x
                x = x_s
        if self.noise_removal and (x == self.mask_index).any():
            if stale or time_conditioned:
                cache = self._call(denoiser, x, times[-1])
                nfe += 1
            x = self._remove_noise(cache, x, generator)
        return SampleOutput(tokens=x, nfe=nfe)

    def _sample_rows(self, denoiser: Denoiser, x: Tensor, generator: torch.Generator | None,
                     progress: bool) -> SampleOutput:
        """:meth:`sample` with a row-selecting denoiser: a call only at a step where some position
        unmasks, for the log-probs of those positions only."""
        x = self._check_input(x)  # (B, L)
        times = self._time_grid(x.device)
        sigmas = self.noise.total_noise(times).to(SIGMA_DTYPE)  # (steps + 1,)
        batch, nfe = x.shape[0], 0
        with self._progress(progress) as bar:
            for i in bar:
                unmask = self._unmasking(x, times[i], times[i + 1], generator)  # (B, L) or None
                if unmask is None:
                    continue
                log_p = self._call_rows(denoiser, x, sigmas[i].repeat(batch), unmask)  # (N, V)
                nfe += 1
                x = x.clone()
                x[unmask] = self._draw(log_p, generator)
        masked = x == self.mask_index  # (B, L)
        if self.noise_removal and masked.any():
            log_p = self._call_rows(denoiser, x, sigmas[-1].repeat(batch), masked)
            nfe += 1
            x = self._removed(log_p, x, masked, generator)
        return SampleOutput(tokens=x, nfe=nfe)


def staggered_score(score: Tensor, dsigma: Tensor, mask_index: int) -> Tensor:
    """SEDD's staggered score for the absorbing process. (N, V) -> (N, V).

    ``exp(-dsigma Q)`` applied to the score, for the absorbing generator Q (every real token
    moves to the mask at rate 1): ``s'_v = e^{dsigma} s_v`` for every v, then
    ``s'_mask += (1 - e^{dsigma}) sum_v s_v``.

    Args:
        score: (N, V) ratios p_t(y) / p_t(x), in the sampling dtype (float64 for accuracy).
        dsigma: 0-dim, the noise removed by the step.
    """
    out = score * dsigma.exp()
    out[:, mask_index] -= torch.expm1(dsigma) * score.sum(-1)
    return out


def transposed_transition(x: Tensor, dsigma: Tensor, vocab_size: int, mask_index: int) -> Tensor:
    """Forward transition probabilities *into* x over ``dsigma``: ``P(y -> x)`` for every y. (N,) -> (N, V).

    ``P = exp(dsigma Q)``: a real token stays with probability ``e^{-dsigma}`` and becomes the
    mask otherwise; the mask stays. So ``P(y -> x) = e^{-dsigma} [y = x] + (1 - e^{-dsigma}) [x = mask]``
    (for x = mask the second term is added to every y, giving P(mask -> mask) = 1).
    """
    edge = torch.nn.functional.one_hot(x, vocab_size).to(dsigma.dtype) * torch.exp(-dsigma)  # (N, V)
    return edge - torch.expm1(-dsigma) * (x == mask_index).to(dsigma.dtype)[:, None]


class AnalyticSampler(DiffusionSampler):
    """SEDD's "analytic" sampler (Tweedie tau-leaping, Lou et al. 2024) for the absorbing process.

    It takes a score function ``score_fn(x_t (B, L), sigma (B,)) -> log p_t(y) / p_t(x_t)``
    (B, L, V) (:meth:`algorithms.SEDD.denoiser`) instead of a denoiser. One step from t to
    s < t with ``dsigma = sigma(t) - sigma(s)`` draws each position from

        probs = staggered_score(s, dsigma) * transposed_transition(x_t, dsigma),

    which for a masked position and a score with ``s_mask = 1`` is
    ``probs_v = expm1(dsigma) s_v`` (real v) and ``probs_mask = 1 - expm1(dsigma) sum_v s_v``. With
    the exact score ``s_v = p(x_0 = v | x_t) / expm1(sigma_t)`` this is the exact reverse step
    ``(alpha_s - alpha_t) / (1 - alpha_t) p(v | x_t)``, the ancestral step of the other samplers.
    Unmasked positions have ``probs = [y = x_t]`` whatever the score, so they are copied and only
    masked positions are computed (in ``self.dtype``, float64 by default). A negative stay-masked
    mass, possible with an inexact score, is clipped to 0.

    After the last step, noise removal (if on) is the same update at ``t = eps`` with
    ``dsigma = sigma(eps)``, i.e. down to sigma = 0, with the mask excluded: masked positions
    are *sampled* from ``s_v expm1(sigma_eps)`` (= p(x_0 = v | x_t) for the exact score), not
    set to the argmax. Stops early once nothing is masked.
    """

    name = "analytic"
    accepts = LOG_SCORE

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        steps: int,
        eps: float = 1e-5,
        noise_removal: bool | str | None = True,
        dtype: torch.dtype | str = torch.float64,
    ) -> None:
        # No temperature / nucleus: its step mixes the score with the transition, not p(x_0 | x_t).
        super().__init__(noise, mask_index, steps, eps=eps, noise_removal=noise_removal, dtype=dtype)

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        x: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> SampleOutput:
        """Generate the masked positions of ``x`` (B, L); ``denoiser`` returns log scores."""
        x = self._check_input(x)  # (B, L)
        times = self._time_grid(x.device)
        sigmas = self.noise.total_noise(times).to(torch.float64)  # (steps + 1,)
        nfe = 0
        with self._progress(progress) as bar:
            for i in bar:
                if not (x == self.mask_index).any():
                    break  # nothing left to generate; masks never reappear
                log_score = self._call(denoiser, x, times[i])  # (B, L, V)
                nfe += 1
                x = self._analytic_step(log_score, x, sigmas[i] - sigmas[i + 1], generator, final=False)
        if self.noise_removal and (x == self.mask_index).any():
            log_score = self._call(denoiser, x, times[-1])
            nfe += 1
            x = self._analytic_step(log_score, x, sigmas[-1], generator, final=True)
        return SampleOutput(tokens=x, nfe=nfe)

    def _analytic_step(self, log_score: Tensor, x: Tensor, dsigma: Tensor,
                       generator: torch.Generator | None, final: bool) -> Tensor:
        """One tau-leaping step of the masked positions of x (B, L); ``final`` excludes the mask."""
        masked = x == self.mask_index  # (B, L)
        if not masked.any():
            return x
        score = log_score[masked].to(self.dtype).exp()  # (N, V)
        dsigma = dsigma.to(self.dtype)  # the difference itself is taken in float64
        transition = transposed_transition(x[masked], dsigma, score.shape[-1], self.mask_index)
        probs = staggered_score(score, dsigma, self.mask_index) * transition  # (N, V)
        if final:
            probs[:, self.mask_index] = 0.0
        x = x.clone()
        x[masked] = sample_categorical(probs.clamp_min_(0.0), generator, self.dtype)
        return x


def _check_semi_ar(sampler: Sampler, x: Tensor, stride_length: int, num_strides: int) -> None:
    """Raise a clear error unless the arguments of :func:`semi_ar_sample` make sense."""
    if not isinstance(sampler, DiffusionSampler) or sampler.left_to_right:
        raise TypeError(f"semi-AR sampling needs a diffusion sampler (ddpm, ddpm_cache, analytic), got "
                        f"{type(sampler).__name__}: a left-to-right sampler generates any length token by token.")
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a (batch, length) tensor, got {getattr(x, 'shape', type(x).__name__)}.")
    length = x.shape[1]

    def is_int(value: object) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not is_int(stride_length) or not 1 <= stride_length < length:
        raise ValueError(
            f"stride_length must be an integer in [1, L - 1] = [1, {length - 1}] for windows of "
            f"length L = {length}, got {stride_length!r}."
        )
    if not is_int(num_strides) or num_strides < 0:
        raise ValueError(f"num_strides must be an integer >= 0, got {num_strides!r}.")


@torch.no_grad()
def semi_ar_sample(
    sampler: DiffusionSampler,
    denoiser: Denoiser,
    x: Tensor,
    stride_length: int,
    num_strides: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> SampleOutput:
    """Semi-autoregressive generation (MDLM paper): sequences longer than the model's window.

    The first window is ``x`` (B, L) itself, generated by ``sampler`` (given tokens kept).
    Then ``num_strides`` times: the last ``L - S`` tokens of the previous window (S =
    ``stride_length``) become the fixed prefix of the next one, followed by S masks, and the
    sampler generates them. Window ``k`` covers output positions ``[k S, k S + L)``:

        window_0 = sample(x),   window_k = sample(window_{k-1}[:, S:] ++ [mask] * S),
        output   = window_0[:, :S] ++ ... ++ window_{K-1}[:, :S] ++ window_K,

    of shape (B, L + K S) for K = ``num_strides``: each position holds its value when it
    leaves the window, so every window's input prefix is exactly the output there. With
    ``noise_removal`` on no mask is left; without, masks left in a kept prefix are generated
    by the next window (any mask is), and masks that leave the window stay in the output.
    The same ``generator`` is used by all windows in turn, so ``num_strides = 0`` is
    ``sampler.sample(denoiser, x, generator)``.

    Args:
        sampler: any diffusion :class:`Sampler` (ddpm, ddpm_cache, analytic).
        denoiser: the callable ``sampler`` takes, for windows of length L.
        x: (B, L) long, the first window: mask ids where tokens are to be generated.
        stride_length: S in [1, L - 1], the number of new tokens per further window.
        num_strides: K >= 0, the number of further windows.
        generator, progress: passed to every window's ``sampler.sample``.

    Returns:
        tokens (B, L + K S) and nfe, the denoiser calls summed over all K + 1 windows.
    """
    _check_semi_ar(sampler, x, stride_length, num_strides)
    out = sampler.sample(denoiser, x, generator=generator, progress=progress)
    window, nfe, pieces = out.tokens, out.nfe, []  # window: (B, L)
    for _ in range(num_strides):
        pieces.append(window[:, :stride_length])  # (B, S) leaving the window: final
        masks = torch.full_like(window[:, :stride_length], sampler.mask_index)  # (B, S)
        out = sampler.sample(denoiser, torch.cat([window[:, stride_length:], masks], 1), generator, progress)
        window, nfe = out.tokens, nfe + out.nfe
    return SampleOutput(tokens=torch.cat([*pieces, window], 1), nfe=nfe)


class ARSampler(Sampler):
    """Left-to-right sampling for the AR baseline, with or without a KV cache.

    Positions of ``x`` equal to the mask index must form a suffix of every row (a shared
    prefix length); they are generated one token at a time. The next-token distribution is
    ``softmax(logits / temperature)`` restricted to its top-p nucleus (the smallest set of
    tokens whose probability reaches ``top_p``), computed and drawn in ``dtype`` with
    :func:`sample_categorical`. With ``kv_cache`` the model runs on the new token only
    (``model.new_cache`` / ``model.forward_step``); without, it reruns the whole prefix. The
    "denoiser" it takes is the causal model itself (:meth:`algorithms.AR.denoiser`). Both
    consume the same random numbers, so with the same generator they give the same tokens.

    Args:
        mask_index: id marking the positions to generate; it is never sampled.
        temperature: > 0; 1 samples the model's distribution.
        top_p: in (0, 1]; 1 disables nucleus truncation.
        top_p_rule: ``"remdm"`` (default, as the diffusion samplers) or ``"hf"``; see :func:`nucleus`.
        kv_cache: reuse keys/values of the prefix (one token of compute per step).
        dtype: ``torch.float64`` (default) or ``torch.float32``, which truncates the tail
            of the next-token distribution (see :func:`sample_categorical`).
    """

    name = "ar"
    accepts = NEXT_TOKEN_LOGITS
    left_to_right = True

    def __init__(
        self,
        mask_index: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        kv_cache: bool = True,
        dtype: torch.dtype | str = torch.float64,
        top_p_rule: str = "remdm",
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"sampler.temperature must be > 0, got {temperature}.")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"sampler.top_p must be in (0, 1], got {top_p}.")
        if top_p_rule not in TOP_P_RULES:
            raise ValueError(f"sampler.top_p_rule={top_p_rule!r}; valid choices: {list(TOP_P_RULES)}")
        self.mask_index = int(mask_index)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_p_rule = top_p_rule
        self.kv_cache = bool(kv_cache)
        self.dtype = check_sampling_dtype(dtype)

    def next_token_probs(self, logits: Tensor) -> Tensor:
        """(B, V) logits -> (B, V) probabilities in ``self.dtype`` after mask removal, temperature, top-p."""
        logits = logits.to(self.dtype) / self.temperature
        logits[:, self.mask_index] = -torch.inf
        return nucleus(logits.softmax(-1), self.top_p, self.top_p_rule)

    @torch.no_grad()
    def sample(
        self, model: Any, x: Tensor, generator: torch.Generator | None = None, progress: bool = False
    ) -> SampleOutput:
        """Generate the masked suffix of ``x`` (B, L); ``model(tokens, None) -> logits``."""
        if x.dim() != 2 or x.dtype != torch.long:
            raise ValueError(f"x must be a (batch, length) long tensor, got {tuple(x.shape)} {x.dtype}.")
        masked = x == self.mask_index
        start = int((~masked).sum(-1).min())
        if start == 0 or bool(masked[:, :start].any()) or not bool(masked[:, start:].all()):
            raise ValueError(
                "AR sampling needs a non-empty prefix of given tokens (e.g. BOS) followed only by "
                "masked positions, with the same prefix length in every row."
            )
        x = x.clone()
        length = x.shape[1]
        cache = model.new_cache(x.shape[0], length, device=x.device) if self.kv_cache else None
        nfe = 0
        for i in tqdm(range(start, length), desc="sampling (ar)", disable=not progress):
            if cache is None:
                logits = model(x[:, :i], None)[:, -1]                       # (B, V)
            else:
                logits = model.forward_step(x[:, cache.length : i], cache)[:, -1]
            nfe += 1
            x[:, i] = sample_categorical(self.next_token_probs(logits), generator, self.dtype)
        return SampleOutput(tokens=x, nfe=nfe)
