"""Confidence-ordered parallel decoding (confidence.py): the commit rule on a fixed table, and the toy oracle.

The table denoiser returns the same probabilities at every call (SUBS form: a one-hot on visible
positions), with a clearly ordered confidence per position, and records its inputs, so the order
in which positions are committed is read off the calls.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import test_samplers as toy
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from scipy import stats
from torch import Tensor

import registry
from confidence import ConfidenceSampler
from config_aliases import translate
from noise_schedule import Cosine, LogLinear

V = 4          # real tokens 0..3
MASK = 4       # mask token id
L = 6          # sequence length
P_MIN = 1e-3   # chi-square p-value threshold; seeds are fixed, so tests never flake

TOP = torch.tensor([0.5, 0.9, 0.3, 0.7, 0.6, 0.8], dtype=torch.float64)  # probability of each position's argmax
ARGMAX = torch.tensor([0, 1, 2, 3, 0, 1])
BY_CONFIDENCE = [1, 5, 3, 4, 0, 2]  # positions by decreasing TOP
ALL_MASK = (MASK,) * L


def table(top: Tensor, argmax: Tensor) -> Tensor:
    """(L', V + 1) probabilities: ``top`` on ``argmax``, the rest evenly on the other real tokens, 0 on the mask."""
    probs = ((1 - top) / (V - 1))[:, None].repeat(1, V + 1)
    probs[:, MASK] = 0.0
    probs[torch.arange(len(top)), argmax] = top
    return probs


class TableDenoiser:
    """Fixed log-probs (L, V + 1) at every call, one-hot on visible positions; records inputs and sigmas."""

    def __init__(self, probs: Tensor) -> None:
        self.log_probs = probs.log()
        self.inputs: list[Tensor] = []
        self.sigmas: list[Tensor] = []

    @property
    def calls(self) -> int:
        return len(self.inputs)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.inputs.append(x.clone())
        self.sigmas.append(sigma.clone())
        log_p = self.log_probs.expand(*x.shape, V + 1).clone()  # (B, L, V + 1)
        visible = x != MASK
        log_p[visible] = torch.nn.functional.one_hot(x[visible], V + 1).double().log()
        return log_p


def make(steps: int = L, **kwargs: object) -> ConfidenceSampler:
    return ConfidenceSampler(LogLinear(), MASK, steps, **kwargs)


def run(sampler: ConfidenceSampler, x: Tensor | tuple[int, ...], probs: Tensor | None = None,
        seed: int = 0) -> tuple[Tensor, TableDenoiser, int]:
    """Tokens, the denoiser (with its record) and NFE of one call of ``sampler`` on ``x`` (B, L) or one row."""
    denoiser = TableDenoiser(table(TOP, ARGMAX) if probs is None else probs)
    x = torch.tensor(x)[None] if isinstance(x, tuple) else x
    out = sampler.sample(denoiser, x, generator=torch.Generator().manual_seed(seed))
    assert out.nfe == denoiser.calls
    return out.tokens, denoiser, out.nfe


def commits(denoiser: TableDenoiser, tokens: Tensor, row: int = 0) -> list[set[int]]:
    """The positions of ``row`` first unmasked by each call, from the recorded inputs and the output."""
    states = [*(x[row] for x in denoiser.inputs), tokens[row]]
    return [set(((a == MASK) & (b != MASK)).nonzero().flatten().tolist()) for a, b in itertools.pairwise(states)]


# ---- the rule: the most confident masked positions first, k per step -----------------------

def test_one_per_step_in_decreasing_confidence() -> None:
    tokens, denoiser, nfe = run(make(steps=L), ALL_MASK)
    assert nfe == L
    assert commits(denoiser, tokens) == [{i} for i in BY_CONFIDENCE]
    assert torch.equal(tokens[0], ARGMAX)


def test_two_per_step_with_half_the_steps() -> None:
    tokens, denoiser, nfe = run(make(steps=L // 2), ALL_MASK)
    assert nfe == L // 2
    assert commits(denoiser, tokens) == [set(BY_CONFIDENCE[i : i + 2]) for i in range(0, L, 2)]
    assert torch.equal(tokens[0], ARGMAX)


def test_the_remainder_goes_to_the_first_steps() -> None:
    """6 masks over 4 steps: 2, 2, 1, 1 (LLaDA's split)."""
    tokens, denoiser, _ = run(make(steps=4), ALL_MASK)
    assert commits(denoiser, tokens) == [{1, 5}, {3, 4}, {0}, {2}]


def test_more_steps_than_masks_calls_only_when_committing() -> None:
    """3 masks over 6 steps: 1, 1, 1, 0, 0, 0: the steps without a commit make no call."""
    tokens, denoiser, nfe = run(make(steps=L), (0, MASK, MASK, 3, MASK, 1))
    assert nfe == 3 and commits(denoiser, tokens) == [{1}, {4}, {2}]


def test_denoiser_times_follow_the_grid() -> None:
    noise, eps = Cosine(), 0.01
    _, denoiser, _ = run(ConfidenceSampler(noise, MASK, 4, eps=eps), ALL_MASK)
    grid = torch.linspace(1.0, eps, 5, dtype=torch.float64)[:4]
    assert [s.tolist() for s in denoiser.sigmas] == [[v] for v in noise.total_noise(grid).float().tolist()]


# ---- blocks -------------------------------------------------------------------------------

def test_blocks_left_to_right() -> None:
    tokens, denoiser, nfe = run(make(steps=L, block_length=L // 2), ALL_MASK)
    assert nfe == L
    assert commits(denoiser, tokens) == [{1}, {0}, {2}, {5}, {3}, {4}]  # each block by its own confidence order
    for x in [*denoiser.inputs, tokens]:
        if (x[0, : L // 2] == MASK).any():
            assert (x[0, L // 2 :] == MASK).all(), "block 2 started before block 1 was full"


def test_a_shorter_last_block_and_steps_split_over_blocks() -> None:
    """block_length 4 in L = 6: blocks [0, 4) and [4, 6); 5 steps: 3 for the first block, 2 for the last."""
    tokens, denoiser, _ = run(make(steps=5, block_length=4), ALL_MASK)
    assert commits(denoiser, tokens) == [{1, 3}, {0}, {2}, {5}, {4}]
    assert torch.equal(tokens[0], ARGMAX)


def test_fewer_steps_than_blocks_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"steps=2 is fewer than the 3 blocks .* set sampling.steps >= 3"):
        run(make(steps=2, block_length=2), ALL_MASK)
    run(make(steps=1, block_length=2, threshold=0.9), ALL_MASK)  # a threshold does not use steps


# ---- threshold (Fast-dLLM) ------------------------------------------------------------------

def test_threshold_commits_top1_and_all_above() -> None:
    tokens, denoiser, nfe = run(make(threshold=0.65), ALL_MASK)
    # {0.9, 0.8, 0.7} >= 0.65 at once; then 0.6, 0.5, 0.3 are below it: the top one per step.
    assert commits(denoiser, tokens) == [{1, 5, 3}, {4}, {0}, {2}]
    assert nfe == 4 and torch.equal(tokens[0], ARGMAX)


@pytest.mark.parametrize(("threshold", "nfe"), [(0.0, 1), (0.25, 1), (1.0, L)])
def test_threshold_extremes(threshold: float, nfe: int) -> None:
    tokens, _, calls = run(make(steps=1, threshold=threshold), ALL_MASK)
    assert calls == nfe and torch.equal(tokens[0], ARGMAX)


def test_threshold_within_blocks() -> None:
    tokens, denoiser, nfe = run(make(threshold=0.45, block_length=3), ALL_MASK)
    assert commits(denoiser, tokens) == [{0, 1}, {2}, {3, 4, 5}]
    assert nfe == 3


def test_threshold_rows_keep_their_own_block() -> None:
    """Row 0 has finished its first block, row 1 has not: each commits in its own current block."""
    x = torch.tensor([[0, 1, 2, MASK, MASK, MASK], [MASK, MASK, MASK, MASK, MASK, MASK]])
    tokens, denoiser, nfe = run(make(threshold=0.95, block_length=3), x)
    assert commits(denoiser, tokens, 0) == [{5}, {3}, {4}, set(), set(), set()]
    assert commits(denoiser, tokens, 1) == [{1}, {0}, {2}, {5}, {3}, {4}]
    assert nfe == L


def test_threshold_time_is_the_fraction_left() -> None:
    """Log-linear schedule: t = the fraction of the positions to generate still masked (over the batch)."""
    noise = LogLinear()
    x = torch.tensor([[MASK, MASK, MASK, 0, 0, 0], [MASK] * L])  # 9 positions to generate
    _, denoiser, nfe = run(ConfidenceSampler(noise, MASK, 1, threshold=1.0), x)
    assert nfe == L
    left = torch.tensor([9, 7, 5, 3, 2, 1], dtype=torch.float64)  # one per unfinished row per step
    expected = noise.total_noise(left / 9).float()
    torch.testing.assert_close(torch.stack([s[0] for s in denoiser.sigmas]), expected, rtol=1e-6, atol=0)
    assert all(torch.all(s == s[0]) for s in denoiser.sigmas)


# ---- random remasking ----------------------------------------------------------------------

def test_random_remasking_is_reproducible_and_not_the_confidence_order() -> None:
    batch = 3000
    x = torch.full((batch, L), MASK)
    sampler = make(steps=L, remasking="random")
    tokens, denoiser, _ = run(sampler, x, seed=5)
    assert torch.equal(tokens, run(sampler, x, seed=5)[0])
    assert (tokens != MASK).all() and torch.equal(tokens, ARGMAX.expand(batch, L))
    first = ((denoiser.inputs[0] == MASK) & (denoiser.inputs[1] != MASK)).nonzero()[:, 1]  # (B,)
    assert len(first) == batch  # one per row per step
    counts = np.bincount(first.numpy(), minlength=L)
    assert stats.chisquare(counts).pvalue > P_MIN  # uniform over positions, not always position 1
    low = run(make(steps=L), x[:8])[1]
    assert (((low.inputs[0] == MASK) & (low.inputs[1] != MASK)).nonzero()[:, 1] == BY_CONFIDENCE[0]).all()


# ---- temperature and nucleus ---------------------------------------------------------------

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)


def drawn(temperature: float, **kwargs: object) -> np.ndarray:
    """Token counts of 20 000 one-position rows drawn in one step from PROBS."""
    probs = torch.cat([PROBS, torch.zeros(1, dtype=torch.float64)])[None]  # (1, V + 1)
    denoiser = TableDenoiser(probs)
    sampler = ConfidenceSampler(LogLinear(), MASK, 1, temperature=temperature, **kwargs)
    out = sampler.sample(denoiser, torch.full((20_000, 1), MASK), generator=torch.Generator().manual_seed(1))
    assert (out.tokens != MASK).all() and out.nfe == 1
    return np.bincount(out.tokens[:, 0].numpy(), minlength=V)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_positive_temperature_draws_from_p_to_the_one_over_t(temperature: float) -> None:
    counts = drawn(temperature)
    expected = PROBS ** (1 / temperature)
    assert counts[1:].sum() > 0  # non-argmax tokens appear
    assert stats.chisquare(counts, (expected / expected.sum() * counts.sum()).numpy()).pvalue > P_MIN


def test_zero_temperature_is_the_argmax() -> None:
    assert drawn(0.0, top_p=0.5).tolist() == [20_000, 0, 0, 0]


@pytest.mark.parametrize(("rule", "kept"), [("remdm", 2), ("hf", 3)])
def test_nucleus_excludes_the_tail(rule: str, kept: int) -> None:
    counts = drawn(1.0, top_p=0.85, top_p_rule=rule)  # remdm keeps 0.5, 0.3; hf also 0.15
    assert counts[kept:].sum() == 0
    expected = PROBS[:kept] / PROBS[:kept].sum() * counts.sum()
    assert stats.chisquare(counts[:kept], expected.numpy()).pvalue > P_MIN


def test_confidence_is_the_model_probability_of_the_draw() -> None:
    """At temperature > 0 the confidence is p_theta of the drawn token: argmax draws still go first."""
    probs = table(torch.tensor([0.97, 0.4], dtype=torch.float64), torch.tensor([0, 0]))  # (2, V + 1)
    sampler = ConfidenceSampler(LogLinear(), MASK, 2, temperature=1.0)
    denoiser = TableDenoiser(probs)
    out = sampler.sample(denoiser, torch.full((4000, 2), MASK), generator=torch.Generator().manual_seed(2))
    first_is_0 = denoiser.inputs[1][:, 0] != MASK
    # Position 0 goes first when it drew its argmax (p 0.97 > 0.4); after a 0.01 token, position 1
    # (0.4 or 0.2) goes first. The most likely token's probability (always 0.97) would always put 0 first.
    assert stats.binomtest(int(first_is_0.sum()), len(first_is_0), 0.97).pvalue > P_MIN
    assert (out.tokens != MASK).all()


# ---- given tokens, batches, arguments -------------------------------------------------------

@pytest.mark.parametrize("threshold", [None, 0.65])
def test_given_tokens_are_kept_and_rows_are_independent(threshold: float | None) -> None:
    x = torch.tensor([
        [2, 2, MASK, MASK, MASK, MASK],          # prefix
        [MASK, 3, 3, MASK, 2, MASK],             # infill template
        [MASK] * L,
        [1, 0, 3, 2, 1, 0],                      # nothing to generate
    ])
    tokens, denoiser, nfe = run(make(steps=L, threshold=threshold), x)
    given = x != MASK
    assert torch.equal(tokens[given], x[given]) and (tokens != MASK).all()
    assert torch.equal(tokens[~given], ARGMAX.expand_as(x)[~given])
    for row in range(len(x)):
        masked = [i for i in BY_CONFIDENCE if x[row, i] == MASK]
        order = [c for c in commits(denoiser, tokens, row) if c]
        if threshold is None:  # k = 1 per step for every row (<= 6 masks over 6 steps)
            assert order == [{i} for i in masked]
        elif masked:
            assert set().union(*order) == set(masked)
            assert order[0] == {masked[0], *(i for i in masked if TOP[i] >= threshold)}
    assert nfe == (L if threshold is None else 4)


def test_rows_with_different_counts_get_their_own_k() -> None:
    """Two steps: a row with 6 masks commits 3 per step, a row with 2 masks 1 per step."""
    x = torch.tensor([[MASK] * L, [0, MASK, 2, 3, MASK, 1]])
    tokens, denoiser, _ = run(make(steps=2), x)
    assert commits(denoiser, tokens, 0) == [{1, 5, 3}, {4, 0, 2}]
    assert commits(denoiser, tokens, 1) == [{1}, {4}]


def test_input_is_not_modified_and_all_given_makes_no_call() -> None:
    x = ARGMAX[None].clone()
    tokens, _, nfe = run(make(threshold=0.5), x)
    assert nfe == 0 and torch.equal(tokens, x)
    x = torch.full((2, L), MASK)
    run(make(), x)
    assert (x == MASK).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"remasking": "lowest"}, r"remasking='lowest'; valid choices: \['low_confidence', 'random'\]"),
        ({"top_p_rule": "x"}, r"top_p_rule='x'; valid choices: \['remdm', 'hf'\]"),
        ({"noise_removal": "x"}, r"noise_removal='x'; valid choices: \['argmax', 'sample', 'none'\]"),
        ({"temperature": -0.1}, r"temperature must be a number >= 0 \(0: greedy argmax\)"),
        ({"temperature": True}, r"temperature must be a number >= 0"),
        ({"block_length": 0}, r"block_length must be an integer >= 1, or null"),
        ({"block_length": 2.5}, r"block_length must be an integer >= 1, or null"),
        ({"threshold": 1.5}, r"threshold must be a number in \[0, 1\], or null"),
        ({"threshold": -0.1}, r"threshold must be a number in \[0, 1\], or null"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"steps": 0}, r"steps must be an integer >= 1"),
        ({"dtype": "float16"}, r"float32 or torch.float64"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(**({"steps": 4} | kwargs))


def test_never_exact_and_repr() -> None:
    sampler = make(temperature=1.0, threshold=0.9, block_length=32)
    assert not sampler.exact
    assert "threshold=0.9" in repr(sampler) and "block_length=32" in repr(sampler)


@pytest.mark.parametrize("threshold", [None, 0.9])
def test_progress_bar(threshold: float | None, capsys: pytest.CaptureFixture[str]) -> None:
    out = make(threshold=threshold).sample(TableDenoiser(table(TOP, ARGMAX)), torch.full((2, L), MASK), progress=True)
    assert (out.tokens != MASK).all() and "sampling (confidence)" in capsys.readouterr().err


# ---- the toy oracle of test_samplers.py -----------------------------------------------------

def greedy_path() -> list[int]:
    """Positions of the toy problem in the order greedy low-confidence decoding commits them, by enumeration."""
    state, order = list(toy.ALL_MASK), []
    for _ in range(toy.L):
        probs = toy.TABLE[toy.state_index(torch.tensor(state)).item()]  # (L, V + 1)
        masked = [i for i in range(toy.L) if state[i] == toy.MASK]
        i = max(masked, key=lambda j: probs[j, : toy.V].max())
        state[i] = int(probs[i, : toy.V].argmax())
        order.append(i)
    return order


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"steps": 2}, {"block_length": 2, "steps": 2}, {"threshold": 0.5}, {"remasking": "random"},
     {"temperature": 1.0, "top_p": 0.9}, {"temperature": 0.7, "block_length": 1, "threshold": 0.0}],
)
def test_runs_on_the_toy_oracle(kwargs: dict[str, object]) -> None:
    oracle = toy.Oracle()
    oracle.record_inputs = True
    sampler = toy.make("confidence", **({"steps": toy.L} | kwargs))
    out = toy.run(sampler, toy.ALL_MASK, batch=64, seed=0, oracle=oracle)
    assert (out.tokens != toy.MASK).all() and out.nfe == oracle.calls <= toy.L
    if not kwargs:  # greedy, one per step: the enumerated path
        order = greedy_path()
        for before, after, i in zip(oracle.inputs, [*oracle.inputs[1:], out.tokens], order, strict=True):
            assert ((before == toy.MASK) & (after != toy.MASK)).nonzero()[:, 1].unique().tolist() == [i]


# ---- configuration ---------------------------------------------------------------------------

def test_config_composes_and_instantiates(tmp_path: Path) -> None:
    assert registry.target_class("sampler", "confidence") is ConfidenceSampler
    # tests/test_configs.make_cfg does the same, but importing that module imports main (Lightning): ~9 s.
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=translate([f"checkpointing.save_dir={tmp_path}", "sampler=confidence",
                                                     "sampler.block_length=2", "sampler.threshold=0.9"]))
    sampler = instantiate(cfg.sampler)(**instantiate(cfg.algorithm)(mask_index=MASK).sampler_inputs())
    assert isinstance(sampler, ConfidenceSampler) and sampler.name == "confidence"
    assert (sampler.block_length, sampler.threshold, sampler.temperature) == (2, 0.9, 0.0)
    assert (sampler.steps, sampler.remasking) == (cfg.sampling.steps, "low_confidence")
