"""Semi-autoregressive sampling: window bookkeeping, NFE, and the exact law on a Markov chain.

Exact law. The window model is the exact SUBS denoiser of a stationary Markov chain over
V = 3 tokens seen through windows of L = 3 positions (the toy problem of test_samplers.py,
with this joint). For a sampler with a finite number of steps, the law of one window's
output given its input is a 64 x 64 matrix M computed by dynamic programming, so the law of
the semi-AR output (length n = L + K S) is exactly

    P(y) = M[all masks, y[0:L]] * prod_{k=1..K} M[y[kS : kS+L-S] ++ masks, y[kS : kS+L]].

With many steps M tends to the chain's window law, and because the chain is Markov, p(new
tokens | last L - S tokens) is the chain's own continuation: the semi-AR output is then the
chain of length n, its pairs across window boundaries included.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import build_sampler, diffusion_samplers
from scipy import stats
from test_samplers import DIGITS, MASK, NUM_STATES, STAY, L, V, _conditionals, state_index
from torch import Tensor

from noise_schedule import Cosine, LogLinear, NoiseSchedule
from samplers import ARSampler, DDPMSampler, SampleOutput, Sampler, semi_ar_sample

# MDLM's and SEDD's samplers, whose window law is the DP below; every sampler's semi-AR windows
# also run in test_sampler_interface.py.
SAMPLERS = {name: cls for name, cls in diffusion_samplers().items() if name in ("ddpm", "ddpm_cache", "analytic")}

P_MIN = 1e-3  # chi-square p-value threshold; seeds are fixed, so tests never flake
ALL_MASK = torch.full((L,), MASK)


def _markov_chain() -> tuple[np.ndarray, np.ndarray]:
    """(V,) stationary law pi and (V, V) transition matrix T of a seeded chain."""
    transition = np.random.default_rng(1).dirichlet(np.full(V, 1.0), size=V)  # (V, V)
    eigenvalues, eigenvectors = np.linalg.eig(transition.T)
    pi = np.real(eigenvectors[:, np.argmin(np.abs(eigenvalues - 1.0))])
    return pi / pi.sum(), transition


PI, T = _markov_chain()


def chain_law(n: int) -> np.ndarray:
    """(V,) * n law of n consecutive tokens of the stationary chain."""
    law = PI
    for _ in range(n - 1):
        law = law[..., None] * T  # law[..., a, b] = law[..., a] T[a, b]
    return law


TABLE = _conditionals(chain_law(L))  # (64, L, V + 1) exact p(x_0^i | visible tokens of x_t)
with np.errstate(divide="ignore"):
    LOG_TABLE = torch.tensor(np.log(TABLE), dtype=torch.float32)  # -inf where p = 0


class Exact:
    """Exact window model: the SUBS denoiser, or the log score for ``analytic``; counts calls."""

    def __init__(self, score: bool = False) -> None:
        self.score, self.calls = score, 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        log_p = LOG_TABLE[state_index(x)]  # (B, L, V + 1)
        if not self.score:
            return log_p
        log_score = log_p.double() - torch.log(torch.expm1(sigma.double()))[:, None, None]
        return log_score.scatter(-1, x[..., None], 0.0).float()  # ratio 1 at the current token


def window_matrix(noise: NoiseSchedule, steps: int, eps: float, final: str) -> np.ndarray:
    """(64, 64) exact law of one window's output state given its input state.

    Per step t -> s, independently per masked position: stay masked w.p. m_s / m_t, else
    draw from TABLE. ``final``: "argmax" (ddpm noise removal) or "sample" (analytic).
    """
    m = noise.move_chance(torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)).numpy()
    matrix = np.eye(NUM_STATES)
    for i in range(steps):
        r = m[i + 1] / m[i]
        matrix = matrix @ _product_transition(r * STAY + (1 - r) * TABLE)
    if final == "sample":
        return matrix @ _product_transition(TABLE)
    greedy = np.where(DIGITS == MASK, LOG_TABLE[..., :V].argmax(-1).numpy(), DIGITS)  # (64, L)
    removal = np.zeros((NUM_STATES, NUM_STATES))
    removal[np.arange(NUM_STATES), state_index(torch.from_numpy(greedy)).numpy()] = 1.0
    return matrix @ removal


def _product_transition(per_position: np.ndarray) -> np.ndarray:
    """(64, L, V + 1) independent per-position laws -> (64, 64) transition matrix."""
    transition = np.ones((NUM_STATES, NUM_STATES))
    for j in range(L):
        transition *= per_position[:, j, DIGITS[:, j]]
    return transition


def semi_ar_law(matrix: np.ndarray, stride: int, num_strides: int) -> np.ndarray:
    """(V ** n,) exact law of the semi-AR output, sequences in base-V order (first most significant)."""
    n = L + stride * num_strides
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))  # (V^n, n)
    law = matrix[state_index(ALL_MASK).item(), state_index(seqs[:, :L]).numpy()]
    for k in range(1, num_strides + 1):
        window = seqs[:, k * stride : k * stride + L]  # (V^n, L)
        start = torch.cat([window[:, : L - stride], window.new_full((len(seqs), stride), MASK)], 1)
        law = law * matrix[state_index(start).numpy(), state_index(window).numpy()]
    return law


def assert_law(tokens: Tensor, law: np.ndarray) -> None:
    """Chi-square test of the sequences tokens (B, n) against law (V ** n,)."""
    assert not (tokens == MASK).any()
    powers = V ** torch.arange(tokens.shape[1] - 1, -1, -1)
    counts = np.bincount((tokens * powers).sum(-1).numpy(), minlength=len(law))
    possible = law >= 1e-12
    assert counts[~possible].sum() == 0, "sampled a sequence of probability 0"
    expected, observed = law[possible] * counts.sum(), counts[possible]
    small = expected < 5.0  # merge rare sequences into one category
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        observed = np.append(observed[~small], observed[small].sum())
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > P_MIN


def make(name: str, noise: NoiseSchedule | None = None, **kwargs: object) -> Sampler:
    return build_sampler(name, noise=noise or LogLinear(), mask_index=MASK, **kwargs)


def uniform_denoiser(vocab: int, score: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """A model for windows of any length, uniform over the real tokens 0..vocab-2 (mask = vocab-1).

    SUBS log-probs (one-hot on given tokens), or with ``score`` the matching log score
    ``log p_v - log expm1(sigma)`` at masked positions and 0 at the current token.
    """

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        log_p = torch.full((*x.shape, vocab), -np.log(vocab - 1.0))  # (B, L, vocab)
        log_p[..., vocab - 1] = -torch.inf
        carry = torch.nn.functional.one_hot(x, vocab).log()  # one-hot on given tokens
        log_p = torch.where((x == vocab - 1)[..., None], log_p, carry)
        if not score:
            return log_p
        log_score = log_p - torch.log(torch.expm1(sigma))[:, None, None]
        return log_score.scatter(-1, x[..., None], 0.0)

    return denoiser


class Recording(DDPMSampler):
    """A ddpm sampler that records the input and output of every window."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.windows: list[tuple[Tensor, SampleOutput]] = []

    def sample(self, denoiser: Callable[[Tensor, Tensor], Tensor], x: Tensor,
               generator: torch.Generator | None = None, progress: bool = False) -> SampleOutput:
        out = super().sample(denoiser, x, generator, progress)
        self.windows.append((x.clone(), out))
        return out


# ---- the exact law ------------------------------------------------------------------------

def test_markov_window_tends_to_the_chain() -> None:
    """The premise: with many steps the semi-AR law of the exact window model is the chain,
    pairs across window boundaries included (the continuation only needs the last token)."""
    matrix = window_matrix(LogLinear(), 1000, 1e-5, "argmax")
    for stride, num_strides in [(1, 2), (2, 2)]:
        n = L + stride * num_strides
        law = semi_ar_law(matrix, stride, num_strides)
        target = chain_law(n).reshape(-1)
        assert 0.5 * np.abs(law - target).sum() < 3e-3
        pairs = law.reshape((V,) * n).sum(axis=tuple(range(L - 1)) + tuple(range(L + 1, n)))
        np.testing.assert_allclose(pairs, PI[:, None] * T, atol=2e-3)  # (y_{L-1}, y_L): across the boundary
    # Few steps: far from the chain, so the sampling tests below pin the composition itself.
    law = semi_ar_law(window_matrix(LogLinear(), 2, 1e-5, "argmax"), 1, 2)
    assert 0.5 * np.abs(law - chain_law(L + 2).reshape(-1)).sum() > 0.05


@pytest.mark.parametrize("stride,num_strides", [(1, 1), (1, 2), (2, 1)])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_exact_law_of_the_semi_ar_output(name: str, stride: int, num_strides: int) -> None:
    noise, steps, eps = Cosine(), 2, 1e-5
    sampler = make(name, noise, steps=steps, eps=eps)
    x = ALL_MASK.expand(30_000, L)
    seed = 100 * stride + 10 * num_strides + sorted(SAMPLERS).index(name)
    out = semi_ar_sample(sampler, Exact(score=name == "analytic"), x, stride, num_strides,
                         generator=torch.Generator().manual_seed(seed))
    final = "sample" if name == "analytic" else "argmax"
    assert_law(out.tokens, semi_ar_law(window_matrix(noise, steps, eps, final), stride, num_strides))


# ---- windows, shapes and NFE ---------------------------------------------------------------

@pytest.mark.parametrize("length,stride,num_strides", [(2, 1, 3), (4, 1, 0), (4, 3, 2), (6, 2, 4), (8, 5, 1)])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_shape_and_nfe(name: str, length: int, stride: int, num_strides: int) -> None:
    vocab = 6
    calls = {"n": 0}
    base = uniform_denoiser(vocab, score=name == "analytic")

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        calls["n"] += 1
        return base(x, sigma)

    sampler = build_sampler(name, noise=LogLinear(), mask_index=vocab - 1, steps=5)
    x = torch.full((3, length), vocab - 1)
    out = semi_ar_sample(sampler, denoiser, x, stride, num_strides, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (3, length + stride * num_strides)
    assert out.tokens.dtype == torch.long and not (out.tokens == vocab - 1).any()
    assert out.nfe == calls["n"] >= num_strides + 1


@pytest.mark.parametrize("noise_removal", [True, False])
def test_every_window_starts_from_the_previous_one(noise_removal: bool) -> None:
    """Window k's input: the last L - S tokens of window k-1's output, then S masks; the
    output is each window's first S tokens as it leaves, then the last window; NFE adds up."""
    length, stride, num_strides = 6, 2, 4
    sampler = Recording(LogLinear(), MASK, steps=3, eps=0.2, noise_removal=noise_removal)
    denoiser = uniform_denoiser(MASK + 1)
    x = torch.full((16, length), MASK)
    x[:, 0] = 0  # a given first token, kept by the first window
    out = semi_ar_sample(sampler, denoiser, x, stride, num_strides, generator=torch.Generator().manual_seed(1))
    assert len(sampler.windows) == num_strides + 1
    assert torch.equal(sampler.windows[0][0], x)
    for (_, before), (start, _) in itertools.pairwise(sampler.windows):
        assert torch.equal(start[:, : length - stride], before.tokens[:, stride:])
        assert (start[:, length - stride :] == MASK).all()
    for k, (_, window) in enumerate(sampler.windows[:-1]):
        assert torch.equal(out.tokens[:, k * stride : (k + 1) * stride], window.tokens[:, :stride])
    assert torch.equal(out.tokens[:, -length:], sampler.windows[-1][1].tokens)
    assert (out.tokens[:, 0] == 0).all()
    assert out.nfe == sum(window.nfe for _, window in sampler.windows)
    assert (out.tokens == MASK).any() != noise_removal  # eps = 0.2 leaves masks without removal


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_no_strides_is_a_plain_sample(name: str) -> None:
    sampler = make(name, steps=4, eps=0.05)
    x = ALL_MASK.expand(64, L).clone()
    x[::2, 1] = 2  # some given tokens
    denoiser = Exact(score=name == "analytic")
    plain = sampler.sample(denoiser, x, generator=torch.Generator().manual_seed(7))
    semi = semi_ar_sample(sampler, denoiser, x, 1, 0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(semi.tokens, plain.tokens) and semi.nfe == plain.nfe


# ---- argument errors -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "stride,num_strides,match",
    [(0, 1, "stride_length"), (L, 1, "stride_length"), (L + 1, 1, "stride_length"), (-1, 1, "stride_length"),
     (1.5, 1, "stride_length"), (True, 1, "stride_length"), (1, -1, "num_strides"), (1, 2.0, "num_strides"),
     (1, False, "num_strides")],
)
def test_bad_arguments(stride: object, num_strides: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        semi_ar_sample(make("ddpm", steps=2), Exact(), ALL_MASK.expand(2, L), stride, num_strides)


def test_bad_sampler_or_input() -> None:
    with pytest.raises(TypeError, match="needs a diffusion sampler"):
        semi_ar_sample(ARSampler(MASK), Exact(), ALL_MASK.expand(2, L), 1, 1)
    with pytest.raises(ValueError, match="batch, length"):
        semi_ar_sample(make("ddpm", steps=2), Exact(), ALL_MASK, 1, 1)
    with pytest.raises(ValueError, match=r"\[1, 0\]"):
        semi_ar_sample(make("ddpm", steps=2), Exact(), torch.full((2, 1), MASK), 1, 1)
