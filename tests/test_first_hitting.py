"""The first-hitting sampler on the toy problem of test_samplers.py (exact denoiser, 27 sequences).

k = 1 is the exact reverse process: the output follows the joint (or its conditional given the
template's tokens) exactly, whatever the number of positions; NFE is the number of masked
positions; the unmasking times have the closed-form law ``P(m_{n-1} <= a m_n) = a^n``; the
position is uniform. k > 1 is not exact, and the test shows it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from test_samplers import (
    DIGITS,
    JOINT,
    LOG_TABLE,
    MASK,
    NUM_STATES,
    L,
    V,
    assert_matches,
    state_index,
    target_law,
)
from torch import Tensor

from first_hitting import FirstHittingSampler
from noise_schedule import Cosine, LogLinear

N = 40_000


class ExactDenoiser:
    """The toy's exact p(x_0 | x_t) (it does not read sigma); records every call's x_t and sigma."""

    time_conditioned = True

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []
        self.sigmas: list[Tensor] = []

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        assert sigma.shape == (x.shape[0],) and sigma.dtype == torch.float32
        self.inputs.append(x.clone())
        self.sigmas.append(sigma.clone())
        return LOG_TABLE[state_index(x)]


class RowDenoiser(ExactDenoiser):
    """:class:`ExactDenoiser` that selects rows, like the DiT's: ``rows=`` gives the chosen positions'
    log-probs only (N, V); records how many rows each call asked for."""

    selects_rows = True

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Tensor] = []

    def __call__(self, x: Tensor, sigma: Tensor, rows: Tensor | None = None) -> Tensor:
        log_p = super().__call__(x, sigma)
        assert rows is not None and (x[rows] == MASK).all()
        self.rows.append(rows.sum(-1))
        return log_p[rows]


def conditional_law(start: tuple[int, ...]) -> np.ndarray:
    """(64,) the joint conditioned on the given tokens of ``start`` (masks elsewhere)."""
    law = target_law()
    given = np.array(start) != MASK
    keep = (DIGITS[:, given] == np.array(start)[given]).all(axis=1)
    law = law * keep
    return law / law.sum()


def run(start: tuple[int, ...], k: int = 1, schedule=None, seed: int = 0, n: int = N,
        denoiser: ExactDenoiser | None = None):
    sampler = FirstHittingSampler(schedule or LogLinear(), MASK, tokens_per_step=k)
    x = torch.tensor(start).expand(n, L).clone()
    return sampler.sample(denoiser or ExactDenoiser(), x, generator=torch.Generator().manual_seed(seed))


def shifted(law: np.ndarray, amount: float = 0.01) -> np.ndarray:
    """``law`` with ``amount`` of probability moved from its most likely state to its second."""
    order = np.argsort(law)[::-1]
    law = law.copy()
    law[order[0]] -= amount
    law[order[1]] += amount
    return law


@pytest.mark.parametrize("schedule", [LogLinear, Cosine])
@pytest.mark.parametrize("start", [(MASK,) * L, (1, MASK, MASK), (MASK, 2, MASK)], ids=["all", "prefix", "infill"])
def test_k1_follows_the_exact_joint(start: tuple[int, ...], schedule: type) -> None:
    out = run(start, schedule=schedule())
    law = conditional_law(start)
    assert_matches(out.tokens, law)
    assert out.nfe == sum(t == MASK for t in start)  # one call per masked position
    # The test has the power the issue asks for: a 1-point bias in one probability is rejected.
    with pytest.raises(AssertionError, match="p-value"):
        assert_matches(out.tokens, shifted(law))


@pytest.mark.parametrize("k", [1, 2])
def test_row_selecting_denoiser_gives_the_same_samples_and_law(k: int) -> None:
    """The positions are chosen before the call, and a denoiser that selects rows computes only those:
    the same tokens for the same seed, each call asking for the k chosen positions of each active row."""
    start = (MASK, 2, MASK)
    rows = RowDenoiser()
    out = run(start, k=k, seed=3, n=20_000, denoiser=rows)
    assert torch.equal(out.tokens, run(start, k=k, seed=3, n=20_000).tokens)
    assert [r.tolist() for r in rows.rows] == [[k] * 20_000] if k == 2 else [[1] * 20_000] * 2
    if k == 1:
        assert_matches(out.tokens, conditional_law(start))


def test_k_above_1_is_not_exact() -> None:
    """k = 3 draws the three tokens from one call, i.e. from the product of the marginals."""
    out = run((MASK,) * L, k=3)
    assert out.nfe == 1
    with pytest.raises(AssertionError, match="p-value"):
        assert_matches(out.tokens, target_law())
    marginals = [JOINT.sum(axis=tuple(j for j in range(L) if j != i)) for i in range(L)]
    product = np.zeros(NUM_STATES)
    clean = (DIGITS != MASK).all(axis=1)
    product[clean] = np.einsum("a,b,c->abc", *marginals).reshape(-1)
    assert_matches(out.tokens, product)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_nfe_is_the_number_of_masked_positions_over_k(k: int) -> None:
    sampler = FirstHittingSampler(LogLinear(), mask_index=9, tokens_per_step=k)
    x = torch.full((4, 7), 9)
    x[:, 0] = 1  # 6 masked positions per row
    out = sampler.sample(lambda x, s: torch.log_softmax(torch.zeros(*x.shape, 10), -1), x,
                         generator=torch.Generator().manual_seed(0))
    assert out.nfe == -(-6 // k) and not (out.tokens == 9).any() and (out.tokens[:, 0] == 1).all()


def test_hitting_times_have_the_closed_form_law() -> None:
    """With n masked at move chance m_n, the next call happens at m_{n-1} = m_n u^(1/n): its ratio
    to m_n has CDF a^n. Checked for every n along the way (Kolmogorov-Smirnov), per row."""
    noise = LogLinear()
    denoiser = ExactDenoiser()
    run((MASK,) * L, n=5000, denoiser=denoiser)
    move = [noise.move_chance(noise_time(noise, s)).double() for s in denoiser.sigmas]  # (calls, B)
    previous = noise.move_chance(torch.tensor(1.0, dtype=torch.float64)).expand_as(move[0])
    for n, m in zip(range(L, 0, -1), move, strict=True):
        ratio = (m / previous).numpy()
        assert stats.kstest(ratio ** n, "uniform").pvalue > 1e-3, n  # ratio^n ~ U(0, 1)
        previous = m
    # each row keeps its own clock: the times differ across rows
    assert move[0].unique().numel() > 4000


def noise_time(noise: LogLinear, sigma: Tensor) -> Tensor:
    """The time whose total noise is sigma (LogLinear)."""
    return noise.inverse_move_chance(-torch.expm1(-sigma.double()))


def test_the_position_is_uniform() -> None:
    """The first position unmasked is uniform over the masked ones (a left-to-right choice would
    still give the exact joint with this exact denoiser, so the law test cannot see it)."""
    denoiser = ExactDenoiser()
    run((MASK,) * L, n=6000, denoiser=denoiser)
    first = (denoiser.inputs[1] != MASK).int().argmax(-1)  # the position set by the first call
    counts = np.bincount(first.numpy(), minlength=L)
    assert stats.chisquare(counts).pvalue > 1e-3, counts


def test_batch_rows_with_different_templates() -> None:
    x = torch.tensor([[MASK, MASK, MASK], [0, MASK, 1], [2, 2, 2]])
    out = FirstHittingSampler(LogLinear(), MASK).sample(ExactDenoiser(), x, generator=torch.Generator().manual_seed(1))
    assert out.nfe == 3 and not (out.tokens == MASK).any()
    assert out.tokens[1, 0] == 0 and out.tokens[1, 2] == 1 and out.tokens[2].tolist() == [2, 2, 2]


def test_temperature_and_nucleus_apply_to_the_draws() -> None:
    """Greedy limit: temperature -> 0 gives the argmax of each conditional (not exact in law)."""
    out = FirstHittingSampler(LogLinear(), MASK, temperature=1e-4).sample(
        ExactDenoiser(), torch.full((200, L), MASK), generator=torch.Generator().manual_seed(2))
    first = out.tokens[:, 0]
    assert first.unique().numel() <= V  # sanity
    top = LOG_TABLE[state_index(torch.full((1, L), MASK))][0, :, :V].argmax(-1)  # unconditional argmax
    # a row whose first call chose position j wrote the unconditional argmax there
    assert (out.tokens == top).any(-1).all()
    with pytest.raises(ValueError, match="tokens_per_step"):
        FirstHittingSampler(LogLinear(), MASK, tokens_per_step=0)
