"""The Gaussian duality of uniform-state diffusion (DUO; Sahoo et al., ICML 2025).

Let ``x`` be one of K categories and ``w = ã e_x + sqrt(1 - ã²) ε`` with ``ε ~ N(0, I_K)``, a
Gaussian diffusion latent at signal level ``ã`` in [0, 1]. Then ``argmax(w)`` is ``x`` with
probability ``T(ã) + (1 - T(ã)) / K`` and each other category with ``(1 - T(ã)) / K``: it is a
uniform-state diffusion latent with ``alpha = T(ã)``, where, with ``μ = ã / sqrt(1 - ã²)``,

    T(ã) = K / (K - 1) [ ∫ φ(z - μ) Φ(z)^{K-1} dz - 1/K ]

(φ, Φ the standard normal density and distribution function; the integral is the probability
that ``μ + ε_x`` beats the largest of the other K - 1 coordinates). ``T(0) = 0``, ``T(1) = 1``
and T increases.

**Quadrature.** The integrals run on fixed composite Gauss-Legendre nodes over z in
[``Z_MIN``, ``MU_MAX + 12``], in float64 and in log space (``log Φ`` from ``log_ndtr``), so
that ``Φ(z)^{K-1}`` stays accurate for K = 50k. T and 1 - T are integrated separately, each in
a form without cancellation where it is small:

    T     = K/(K-1) ∫ φ(z) expm1(μ z - μ²/2) Φ(z)^{K-1} dz        (φ(z - μ) - φ(z) = φ(z) expm1(...))
    1 - T = K/(K-1) ∫ φ(z - μ) (1 - Φ(z)^{K-1}) dz
    dT/dμ   = K ∫ φ(z - μ) φ(z) Φ(z)^{K-2} dz                      (by parts; a positive integrand)
    d²T/dμ² = K ∫ (z - μ) φ(z - μ) φ(z) Φ(z)^{K-2} dz

and ``dμ/dã = (1 - ã²)^{-3/2}``, ``d²μ/dã² = 3 ã (1 - ã²)^{-5/2}``. For ``μ > MU_MAX``
(ã > 0.99875) 1 - T is below 1e-38 (K <= 1e6) and the values at ``MU_MAX`` are used.

**Table.** :func:`duality_table` integrates once per K (and process) on ``GRID_POINTS`` points
of ã in [0, 1] and interpolates with cubic Hermite splines: T with dT/dã, dT/dã with d²T/dã², and
log(1 - T) with its derivative (so that 1 - T keeps its relative accuracy near T = 1). Measured
against the quadrature at the midpoints of the grid and 20,000 random ã (``tests/test_duality.py``)
for K = 2, 5, 100, 30522 and 50258: absolute error of T at most 2e-10; relative error of 1 - T at
most 3e-7 where 1 - T > 1e-6 (1.5e-6 where 1 - T > 1e-10); absolute error of dT/dã at most 2.2e-7
(its maximum is 39 at K = 50258), relative 2.2e-5 where dT/dã exceeds 1e-4 of its maximum. The
quadrature itself agrees with ``scipy.integrate.quad`` to a relative 3e-10. Building a table
takes about 0.1 s on one CPU core.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Z_MIN = -12.0        # below it φ(z - μ) (μ >= 0) and the rest of the integrands are < 1e-31
MU_MAX = 20.0        # beyond it T is 1 to all precision used (see the module docstring)
PANEL_WIDTH = 0.5    # 12-node Gauss-Legendre panels: relative error ~1e-10 (vs scipy.integrate.quad)
PANEL_NODES = 12
GRID_POINTS = 8193   # ã grid of the table (step 1/8192)
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@functools.lru_cache(maxsize=1)
def _nodes() -> tuple[Tensor, Tensor]:
    """Composite Gauss-Legendre nodes and weights (M,) float64 on [Z_MIN, MU_MAX + 12]."""
    x, w = np.polynomial.legendre.leggauss(PANEL_NODES)
    starts = np.arange(Z_MIN, MU_MAX + 12.0, PANEL_WIDTH)
    z = (starts[:, None] + (x[None, :] + 1) * PANEL_WIDTH / 2).reshape(-1)
    weights = np.tile(w * PANEL_WIDTH / 2, len(starts))
    return torch.from_numpy(z), torch.from_numpy(weights)


def _log_normal_pdf(z: Tensor) -> Tensor:
    return -0.5 * z * z - LOG_SQRT_2PI


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - e^x)`` for x <= 0 (Mächler's split at -log 2)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def duality_quadrature(mu: Tensor, num_categories: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(T, 1 - T, dT/dμ, d²T/dμ²)`` at ``μ = ã / sqrt(1 - ã²)`` (N,) >= 0, by quadrature. Each (N,) float64.

    ``μ`` above ``MU_MAX`` is evaluated at ``MU_MAX`` (1 - T < 1e-38 there for K <= 1e6).
    """
    k = int(num_categories)
    if k < 2:
        raise ValueError(f"the duality needs K >= 2 categories, got {num_categories}.")
    mu = mu.detach().to(torch.float64).cpu().clamp(0.0, MU_MAX)[:, None]          # (N, 1)
    z, weights = _nodes()
    keep = z <= float(mu.max()) + 12.0  # beyond, φ(z - μ) < 1e-31 for every μ here
    z, weights = z[keep], weights[keep]                                           # (M,)
    log_cdf = torch.special.log_ndtr(z)                                           # (M,)
    c = k / (k - 1)
    # Factors of z alone (M,), then one exp and one expm1 over (N, M). No overflow: z <= MU_MAX + 12 and
    # μ <= MU_MAX keep μ z - μ²/2 below 709, and φ(z) Φ^{K-1} >= e^{-(MU_MAX + 12)² / 2 - 1} has no underflow
    # where expm1 is large.
    pdf_cdf = torch.exp(_log_normal_pdf(z) + (k - 1) * log_cdf)                   # φ(z) Φ(z)^{K-1}
    tail = torch.exp(_log1mexp((k - 1) * log_cdf))                               # 1 - Φ(z)^{K-1}
    pdf_cdf_2 = torch.exp(_log_normal_pdf(z) + (k - 2) * log_cdf)                 # φ(z) Φ(z)^{K-2}
    pdf_shift = torch.exp(_log_normal_pdf(z - mu))                                # (N, M) φ(z - μ)
    small = torch.expm1(mu * z - 0.5 * mu * mu) * pdf_cdf                         # (N, M)
    joint = pdf_shift * pdf_cdf_2
    t_small, t_one_minus = c * (small @ weights), c * ((pdf_shift * tail) @ weights)  # (N,)
    use_small = t_small < 0.5
    value = torch.where(use_small, t_small, 1 - t_one_minus)
    complement = torch.where(use_small, 1 - t_small, t_one_minus)
    slope = k * (joint @ weights)
    curvature = k * ((joint * (z - mu)) @ weights)
    return value, complement, slope, curvature


@dataclass(frozen=True)
class DualityValue:
    """T and what the losses need of it at a batch of ã, all of the shape of ã, float64."""

    alpha: Tensor      # T(ã)
    one_minus: Tensor  # 1 - T(ã), with relative accuracy near T = 1
    slope: Tensor      # dT/dã


@dataclass(frozen=True)
class DualityTable:
    """T on the grid ``ã_j = j / (N - 1)`` for K categories, with what cubic Hermite interpolation needs."""

    num_categories: int
    alpha: Tensor          # (N,) T(ã_j)
    slope: Tensor          # (N,) dT/dã
    curvature: Tensor      # (N,) d²T/dã²
    log_one_minus: Tensor  # (N,) log(1 - T)
    log_one_minus_slope: Tensor  # (N,) d log(1 - T) / dã = -T' / (1 - T)

    def to(self, device: torch.device | str) -> DualityTable:
        fields = {name: getattr(self, name).to(device) for name in
                  ("alpha", "slope", "curvature", "log_one_minus", "log_one_minus_slope")}
        return DualityTable(self.num_categories, **fields)

    def __call__(self, a_tilde: Tensor) -> DualityValue:
        """T, 1 - T and dT/dã at ``a_tilde`` (any shape, values in [0, 1]), float64 on the table's device."""
        a = a_tilde.to(torch.float64).clamp(0.0, 1.0)
        n = self.alpha.shape[0] - 1
        index = (a * n).floor().clamp(0, n - 1).long()
        s = a * n - index                                   # position in the interval, [0, 1]
        h = 1.0 / n
        s2, s3 = s * s, s * s * s
        h00, h10, h01, h11 = 2 * s3 - 3 * s2 + 1, s3 - 2 * s2 + s, -2 * s3 + 3 * s2, s3 - s2

        def hermite(values: Tensor, slopes: Tensor) -> Tensor:
            return (h00 * values[index] + h10 * h * slopes[index]
                    + h01 * values[index + 1] + h11 * h * slopes[index + 1])

        alpha = hermite(self.alpha, self.slope)
        one_minus = torch.exp(hermite(self.log_one_minus, self.log_one_minus_slope))
        small = alpha < 0.5  # each from the form that is accurate where it is small
        return DualityValue(
            alpha=torch.where(small, alpha, 1 - one_minus).clamp(0.0, 1.0),
            one_minus=torch.where(small, 1 - alpha, one_minus).clamp(0.0, 1.0),
            slope=hermite(self.slope, self.curvature).clamp_min(0.0),
        )


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Intra-op threads off for the duration: the table's many small (512, M) operations run ~10x slower with
    two threads on a loaded 2-core machine (measured 0.07 s vs 0.3-1.6 s) and gain nothing on an idle one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=8)
def _build_table(num_categories: int) -> DualityTable:
    with _one_thread():
        return _integrate_table(num_categories)


def _integrate_table(num_categories: int) -> DualityTable:
    a = torch.linspace(0.0, 1.0, GRID_POINTS, dtype=torch.float64)
    one_minus_a2 = (1 - a) * (1 + a)
    inside = a < 1.0
    mu = torch.where(inside, a / one_minus_a2.clamp_min(1e-300).sqrt(), torch.full_like(a, MU_MAX))
    rows = [duality_quadrature(chunk, num_categories) for chunk in mu.split(512)]
    value, complement, d_mu, d2_mu = (torch.cat(parts) for parts in zip(*rows, strict=True))
    live = inside & (mu < MU_MAX)  # μ(ã) and its derivatives are finite and not clamped
    safe = one_minus_a2.where(live, torch.ones_like(a))
    mu_1 = safe.pow(-1.5)                    # dμ/dã
    mu_2 = 3 * a * safe.pow(-2.5)            # d²μ/dã²
    slope = torch.where(live, d_mu * mu_1, 0.0)
    curvature = torch.where(live, d2_mu * mu_1 * mu_1 + d_mu * mu_2, 0.0)
    log_one_minus = complement.log()
    return DualityTable(num_categories, value, slope, curvature, log_one_minus, -slope / complement)


@functools.lru_cache(maxsize=32)
def duality_table(num_categories: int, device: torch.device | str = "cpu") -> DualityTable:
    """The table of T for K = ``num_categories`` on ``device``: integrated once per K and process, then cached."""
    if isinstance(num_categories, bool) or not isinstance(num_categories, int) or num_categories < 2:
        raise ValueError(f"num_categories must be an integer >= 2, got {num_categories!r}.")
    return _build_table(num_categories).to(device)


def duality(a_tilde: Tensor, num_categories: int) -> DualityValue:
    """``T(ã)``, ``1 - T(ã)`` and ``dT/dã`` for K = ``num_categories`` (cached table, interpolated), float64."""
    return duality_table(num_categories, str(a_tilde.device))(a_tilde)


def gaussian_latent(x0: Tensor, a_tilde: Tensor, vocab_size: int, mask_index: int,
                    generator: torch.Generator | None = None) -> Tensor:
    """The Gaussian latent ``w = ã e_x0 + sqrt(1 - ã²) ε`` over the K = V - 1 real tokens. (B, L) -> (B, L, V).

    ``a_tilde`` (B,) per sequence; the mask column is ``-inf`` (never the argmax, never a state), so
    ``argmax(w)`` is a uniform-state latent with ``alpha = T(ã)`` over the real tokens. This is what
    DUO's curriculum feeds through a tempered softmax (``softmax(w / τ)``) and what its consistency
    distillation shares between two times. float32, or float64 when ``a_tilde`` is float64.
    """
    dtype = torch.float64 if a_tilde.dtype == torch.float64 else torch.float32
    a = a_tilde.to(dtype)[:, None, None]                                          # (B, 1, 1)
    noise = torch.randn((*x0.shape, vocab_size), dtype=dtype, device=x0.device, generator=generator)
    w = noise.mul_(torch.sqrt((1 - a) * (1 + a)))                                  # (B, L, V)
    w.scatter_add_(-1, x0[..., None], a.expand(*x0.shape, 1))
    w[..., mask_index] = -torch.inf
    return w
