"""Samplers against an exact oracle on a toy problem with a known answer.

Toy problem: V = 3 real tokens plus the mask token (id 3), length L = 3, and a fixed,
correlated joint distribution p over the 27 sequences. The "model" is exact: for a state
x_t it returns log p(x_0^i = v | visible tokens of x_t), computed by enumeration. With it,

* the law of the sampler's output after a finite number of steps is computable exactly by
  dynamic programming over the 4^3 = 64 states of x_t, which pins the transition formula;
* with many steps the output must follow p itself.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import build_sampler, diffusion_samplers
from scipy import stats
from torch import Tensor

import registry
import samplers
from noise_schedule import Cosine, LogLinear, NoiseSchedule
from samplers import (
    ARSampler,
    DDPMCacheSampler,
    DDPMSampler,
    SampleOutput,
    Sampler,
    sample_categorical,
)

V = 3          # real tokens 0, 1, 2
MASK = 3       # mask token id
L = 3          # sequence length
NUM_STATES = (V + 1) ** L  # 64 states of x_t
P_MIN = 1e-3   # chi-square p-value threshold; seeds are fixed, so tests never flake

# State index: base-4 number with the first position most significant.
POWERS = torch.tensor([(V + 1) ** (L - 1 - i) for i in range(L)])  # (L,)
DIGITS = np.array(list(itertools.product(range(V + 1), repeat=L)))  # (64, L)
ALL_MASK = (MASK,) * L


def _joint() -> np.ndarray:
    """(V,) * L target distribution: a seeded Dirichlet draw, correlated across positions."""
    rng = np.random.default_rng(0)
    return rng.dirichlet(np.full(V**L, 2.0)).reshape((V,) * L)


JOINT = _joint()


def _conditionals(joint: np.ndarray) -> np.ndarray:
    """(64, L, V + 1) probabilities the exact SUBS denoiser assigns at every state x_t.

    Masked position i: p(x_0^i = v | visible tokens) for v < V and 0 for the mask token;
    visible position: a one-hot on its token.
    """
    table = np.zeros((NUM_STATES, L, V + 1))
    sequences = np.array(list(itertools.product(range(V), repeat=L)))  # (27, L)
    weights = joint.reshape(-1)  # (27,)
    for state, x in enumerate(DIGITS):
        visible = x != MASK
        consistent = (sequences[:, visible] == x[visible]).all(axis=1)  # (27,)
        w = weights * consistent
        for i in range(L):
            if visible[i]:
                table[state, i, x[i]] = 1.0
            else:
                table[state, i, :V] = np.bincount(sequences[:, i], weights=w, minlength=V)
                table[state, i] /= w.sum()
    return table


TABLE = _conditionals(JOINT)  # (64, L, V + 1)
with np.errstate(divide="ignore"):
    LOG_TABLE = torch.tensor(np.log(TABLE), dtype=torch.float32)  # -inf where p = 0


def state_index(x: Tensor) -> Tensor:
    """(..., L) tokens -> (...,) state index in [0, 64)."""
    return (x * POWERS).sum(-1)


class Oracle:
    """Exact SUBS denoiser of the toy problem; ignores sigma and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.sigmas: list[float] = []   # sigma of every call (the same for the whole batch)
        self.inputs: list[Tensor] = []  # x_t of every call, if record_inputs

    record_inputs = False

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        assert x.dtype == torch.long and x.shape[1] == L
        assert sigma.shape == (x.shape[0],) and sigma.dtype == torch.float32
        assert torch.all(sigma == sigma[0])
        self.calls += 1
        self.sigmas.append(sigma[0].item())
        if self.record_inputs:
            self.inputs.append(x.clone())
        return LOG_TABLE[state_index(x)]  # (B, L, V + 1)




class RowOracle(Oracle):
    """:class:`Oracle` that selects rows (``rows=``: the log-probs of masked positions only), like the DiT's
    denoiser; records how many rows each call asked for."""

    selects_rows = True

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def __call__(self, x: Tensor, sigma: Tensor, rows: Tensor | None = None) -> Tensor:
        log_p = super().__call__(x, sigma)  # (B, L, V + 1)
        if rows is None:
            return log_p
        assert rows.shape == x.shape and rows.dtype == torch.bool and rows.any()
        assert (x[rows] == MASK).all(), "rows asked at an unmasked position"
        self.rows.append(int(rows.sum()))
        return log_p[rows]  # (N, V + 1)


SCHEDULES = {"loglinear": LogLinear, "cosine": Cosine}
# MDLM's ancestral samplers, whose finite-step law is the DP below; "analytic" takes a score
# (tests/test_analytic_sampler.py). The later samplers have their own files (test_first_hitting.py,
# test_remdm.py, test_confidence_sampler.py) and test_sampler_interface.py runs every one.
SAMPLERS = {name: cls for name, cls in diffusion_samplers().items() if name in ("ddpm", "ddpm_cache", "analytic")}
DENOISER_SAMPLERS = [name for name in SAMPLERS if name != "analytic"]


# ---- the exact law of the sampler's output ----------------------------------------------

def _stay_table() -> np.ndarray:
    """(64, L, V + 1): one-hot on the mask token where masked, on the token where visible."""
    table = np.zeros((NUM_STATES, L, V + 1))
    for state, x in enumerate(DIGITS):
        table[state, np.arange(L), x] = 1.0
    return table


STAY = _stay_table()


def _removal_matrix() -> np.ndarray:
    """(64, 64) 0/1 map of noise removal: masked positions -> argmax of the oracle."""
    greedy = LOG_TABLE[..., :V].argmax(-1).numpy()  # (64, L)
    final = np.where(DIGITS == MASK, greedy, DIGITS)  # (64, L)
    matrix = np.zeros((NUM_STATES, NUM_STATES))
    matrix[np.arange(NUM_STATES), state_index(torch.from_numpy(final)).numpy()] = 1.0
    return matrix


REMOVAL = _removal_matrix()


def exact_law(
    noise: NoiseSchedule, steps: int, eps: float, start: tuple[int, ...], noise_removal: bool
) -> np.ndarray:
    """(64,) exact distribution of the output state, by dynamic programming over x_t.

    Per step t -> s, independently per masked position: stay masked with probability
    m_s / m_t, become v with probability p(v | x_t) (m_t - m_s) / m_t.
    """
    m = noise.move_chance(torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)).numpy()
    dist = np.zeros(NUM_STATES)
    dist[state_index(torch.tensor(start)).item()] = 1.0
    for i in range(steps):
        r = m[i + 1] / m[i]
        per_position = r * STAY + (1 - r) * TABLE  # (64, L, V + 1): P(x_s^i = w | x_t)
        transition = np.ones((NUM_STATES, NUM_STATES))
        for j in range(L):
            transition *= per_position[:, j, DIGITS[:, j]]
        dist = dist @ transition
    return dist @ REMOVAL if noise_removal else dist


def target_law() -> np.ndarray:
    """(64,) the joint p embedded in the state space (zero on states with a mask)."""
    law = np.zeros(NUM_STATES)
    clean = (DIGITS != MASK).all(axis=1)
    law[clean] = JOINT[tuple(DIGITS[clean].T)]
    return law


def assert_matches(tokens: Tensor, law: np.ndarray) -> None:
    """Chi-square test of the empirical state counts of tokens (B, L) against law (64,)."""
    counts = np.bincount(state_index(tokens).numpy(), minlength=NUM_STATES)
    impossible = law < 1e-12
    assert counts[impossible].sum() == 0, "sampled a state of probability 0"
    expected = law[~impossible] * counts.sum()
    observed = counts[~impossible]
    small = expected < 5.0  # merge rare categories into one, as the test requires
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        observed = np.append(observed[~small], observed[small].sum())
    expected *= observed.sum() / expected.sum()
    if len(expected) < 2:
        return
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > P_MIN, f"chi-square p-value {p_value:.2e}"


def run(sampler: Sampler, start: tuple[int, ...], batch: int, seed: int,
        oracle: Oracle | None = None) -> SampleOutput:
    x = torch.tensor(start).expand(batch, L).clone()
    generator = torch.Generator().manual_seed(seed)
    return sampler.sample(oracle or Oracle(), x, generator=generator)


def make(name: str, noise: NoiseSchedule | None = None, **kwargs: object) -> Sampler:
    return build_sampler(name, noise=noise or LogLinear(), mask_index=MASK, **kwargs)


def test_toy_problem_is_correlated() -> None:
    marginals = [JOINT.sum(axis=tuple(j for j in range(L) if j != i)) for i in range(L)]
    product = np.einsum("a,b,c->abc", *marginals)
    assert np.abs(JOINT - product).sum() > 0.1


# ---- 1. exact law for a finite number of steps ------------------------------------------

CASES = {
    "1step": (1, 1e-5, ALL_MASK, True),
    "2steps": (2, 1e-5, ALL_MASK, True),
    "4steps": (4, 1e-5, ALL_MASK, True),
    "removal": (2, 0.3, ALL_MASK, True),          # many positions left for noise removal
    "no_removal": (2, 0.3, ALL_MASK, False),      # ... or left masked
    "prefix": (2, 1e-5, (1, MASK, MASK), True),
    "infill": (3, 1e-5, (MASK, 2, MASK), True),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", DENOISER_SAMPLERS)
def test_exact_law_finite_steps(name: str, case: str, schedule: str) -> None:
    steps, eps, start, noise_removal = CASES[case]
    noise = SCHEDULES[schedule]()
    sampler = make(name, noise, steps=steps, eps=eps, noise_removal=noise_removal)
    out = run(sampler, start, batch=40_000, seed=1 + DENOISER_SAMPLERS.index(name))
    assert_matches(out.tokens, exact_law(noise, steps, eps, start, noise_removal))


def test_exact_law_sanity() -> None:
    """The DP itself: one step from all-mask to t ~ 0 samples the product of marginals."""
    law = exact_law(LogLinear(eps=1e-9), 1, 1e-15, ALL_MASK, noise_removal=False)
    marginals = [JOINT.sum(axis=tuple(j for j in range(L) if j != i)) for i in range(L)]
    product = target_law()
    product[product > 0] = np.einsum("a,b,c->abc", *marginals).reshape(-1)
    np.testing.assert_allclose(law, product, atol=1e-12)


# ---- 2. many steps reach the target ------------------------------------------------------

MANY_STEPS = 1000


@pytest.mark.parametrize("name", DENOISER_SAMPLERS)
def test_many_steps_reach_target(name: str) -> None:
    noise, eps = LogLinear(), 1e-5
    law = exact_law(noise, MANY_STEPS, eps, ALL_MASK, noise_removal=True)
    assert 0.5 * np.abs(law - target_law()).sum() < 1e-3
    out = run(make(name, noise, steps=MANY_STEPS, eps=eps), ALL_MASK, batch=20_000,
              seed=10 + DENOISER_SAMPLERS.index(name))
    assert_matches(out.tokens, target_law())


# ---- 3. ddpm and ddpm_cache agree -------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-5, 0.3])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cache_matches_ddpm(schedule: str, eps: float) -> None:
    noise, steps = SCHEDULES[schedule](), 200
    oracles = {name: Oracle() for name in DENOISER_SAMPLERS}
    outs = {
        name: run(make(name, noise, steps=steps, eps=eps), ALL_MASK, 8, 3, oracles[name])
        for name in DENOISER_SAMPLERS
    }
    torch.testing.assert_close(outs["ddpm"].tokens, outs["ddpm_cache"].tokens, rtol=0, atol=0)
    for name, out in outs.items():
        assert oracles[name].calls == out.nfe
    removal_calls = oracles["ddpm"].calls - steps
    assert removal_calls in (0, 1)
    assert removal_calls == (eps == 0.3)  # masks survive to t = 0.3, not to t = 1e-5
    assert outs["ddpm_cache"].nfe < outs["ddpm"].nfe
    # A call only when the state changed: at most one per newly revealed position + 1.
    assert outs["ddpm_cache"].nfe <= 8 * L + 1


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", CASES)
def test_row_selecting_cache_has_the_exact_law(case: str, schedule: str) -> None:
    """ddpm_cache with a denoiser that selects rows draws the unmasking positions first and calls the
    network for those only: the same finite-step law."""
    steps, eps, start, noise_removal = CASES[case]
    noise = SCHEDULES[schedule]()
    sampler = make("ddpm_cache", noise, steps=steps, eps=eps, noise_removal=noise_removal)
    out = run(sampler, start, batch=40_000, seed=11, oracle=RowOracle())
    assert_matches(out.tokens, exact_law(noise, steps, eps, start, noise_removal))


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_row_selecting_cache_calls_only_where_a_position_unmasks(time_conditioning: bool) -> None:
    """Same tokens as ddpm (same seed); one call per step that changes the state (plus noise removal),
    time-conditioned or not, each for exactly the positions that unmask then."""
    noise, steps, batch = Cosine(), 500, 4
    plain, rows = Oracle(), RowOracle()
    rows.record_inputs = True
    ddpm = run(make("ddpm", noise, steps=steps, eps=0.05), ALL_MASK, batch, 7, plain)
    cached = run(make("ddpm_cache", noise, steps=steps, eps=0.05, time_conditioning=time_conditioning),
                 ALL_MASK, batch, 7, rows)
    assert torch.equal(ddpm.tokens, cached.tokens)
    assert cached.nfe == rows.calls == len(rows.rows) < steps
    states = [*rows.inputs, cached.tokens]
    for k, (before, after) in enumerate(itertools.pairwise(states)):
        changed = int((before != after).sum())
        assert changed == rows.rows[k] > 0
    removal = int((rows.inputs[-1] == MASK).sum()) == rows.rows[-1] and bool((rows.inputs[-1] == MASK).any())
    assert removal  # eps = 0.05 leaves masks at the end here: the last call fills them all
    # The times of the calls are grid times at which something unmasked (not one per step).
    assert len(set(rows.sigmas)) == rows.calls


def test_cache_never_calls_on_unchanged_state() -> None:
    oracle = Oracle()
    oracle.record_inputs = True
    out = run(make("ddpm_cache", steps=500, eps=0.05), ALL_MASK, 4, 0, oracle)
    assert out.nfe == oracle.calls > 1
    for before, after in itertools.pairwise(oracle.inputs):
        assert not torch.equal(before, after)
    assert (oracle.inputs[-1] == MASK).any()


def test_time_conditioning_calls_once_per_step() -> None:
    noise, steps, batch = Cosine(), 4, 64
    ddpm_oracle, cache_oracle = Oracle(), Oracle()
    ddpm = run(make("ddpm", noise, steps=steps), ALL_MASK, batch, 5, ddpm_oracle)
    cached = run(make("ddpm_cache", noise, steps=steps, time_conditioning=True),
                 ALL_MASK, batch, 5, cache_oracle)
    assert torch.equal(ddpm.tokens, cached.tokens)
    assert cached.nfe == ddpm.nfe == cache_oracle.calls
    # With 192 positions some stay masked through every step, so there are >= `steps` calls,
    # each at its own time t_i, passed as sigma(t_i).
    times = torch.linspace(1.0, 1e-5, steps + 1, dtype=torch.float64)[:steps]
    expected = noise.total_noise(times).float().tolist()
    assert cache_oracle.sigmas[:steps] == ddpm_oracle.sigmas[:steps] == expected


def test_ddpm_passes_sigma_and_calls_once_per_step() -> None:
    noise, steps = LogLinear(), 7
    oracle = Oracle()
    out = run(make("ddpm", noise, steps=steps, eps=0.4), ALL_MASK, 256, 0, oracle)
    grid = torch.linspace(1.0, 0.4, steps + 1, dtype=torch.float64)
    assert out.nfe == oracle.calls == steps + 1  # masks left at t = 0.4 -> noise removal
    expected = noise.total_noise(grid).float().tolist()
    assert oracle.sigmas == [*expected[:steps], expected[-1]]


# ---- 4. categorical sampling in float64 -------------------------------------------------

def test_sample_categorical_frequencies() -> None:
    probs = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.35])
    draws = sample_categorical(probs.expand(200_000, 5), torch.Generator().manual_seed(0))
    assert draws.dtype == torch.long and draws.shape == (200_000,)
    counts = np.bincount(draws.numpy(), minlength=5)
    assert stats.chisquare(counts, probs.double().numpy() * counts.sum()).pvalue > P_MIN


def test_sample_categorical_is_float64_and_scale_free() -> None:
    probs = torch.rand(1000, 7, generator=torch.Generator().manual_seed(0))  # float32

    def draw(p: Tensor) -> Tensor:
        return sample_categorical(p, torch.Generator().manual_seed(1))

    reference = draw(probs.double())
    assert torch.equal(draw(probs), reference)  # float32 input: the same float64 path
    # Unnormalised rows; 1e-200 and 1e200 under- / overflow in float32, not in float64.
    assert torch.equal(draw(probs.double() * 1e-200), reference)
    assert torch.equal(draw(probs.double() * 1e200), reference)


def test_sample_categorical_is_the_float64_exponential_race() -> None:
    """Pins the documented method: argmax(p / E), E ~ Exp(1) drawn in float64 from generator.

    The tail itself (categories of relative mass ~1e-9 that float32 Gumbel noise can never
    pick) cannot be checked by frequencies at the cost of a unit test; this checks where the
    noise comes from instead.
    """
    probs = torch.rand(1000, 7, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    noise = torch.empty(1000, 7, dtype=torch.float64).exponential_(
        generator=torch.Generator().manual_seed(2)
    )
    expected = (probs.double() / noise).argmax(-1)
    assert torch.equal(sample_categorical(probs, torch.Generator().manual_seed(2)), expected)


def test_sample_categorical_never_draws_zero_mass() -> None:
    probs = torch.tensor([0.0, 1e-30, 0.0, 3e-30], dtype=torch.float64)
    draws = sample_categorical(probs.expand(100_000, 4), torch.Generator().manual_seed(0))
    counts = np.bincount(draws.numpy(), minlength=4)
    assert counts[0] == counts[2] == 0
    assert stats.binomtest(counts[3], counts.sum(), 0.75).pvalue > P_MIN


# ---- 5. given tokens, early exits -------------------------------------------------------

@pytest.mark.parametrize("name", DENOISER_SAMPLERS)
def test_given_tokens_are_kept(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (512, L), generator=generator)
    x[torch.rand(512, L, generator=generator) < 0.6] = MASK  # random prefix/infill patterns
    x_before = x.clone()
    out = make(name, steps=10).sample(Oracle(), x, generator=generator)
    assert torch.equal(x, x_before), "the input must not be modified in place"
    given = x != MASK
    assert torch.equal(out.tokens[given], x[given])
    assert (out.tokens != MASK).all()


@pytest.mark.parametrize("name", DENOISER_SAMPLERS)
def test_all_unmasked_input(name: str) -> None:
    oracle = Oracle()
    x = torch.randint(0, V, (5, L), generator=torch.Generator().manual_seed(0))
    out = make(name, steps=6).sample(oracle, x)
    assert torch.equal(out.tokens, x)
    assert out.nfe == oracle.calls == (6 if name == "ddpm" else 0)


@pytest.mark.parametrize("name", DENOISER_SAMPLERS)
def test_without_noise_removal_masks_can_remain(name: str) -> None:
    out = run(make(name, steps=1, eps=0.5, noise_removal=False), ALL_MASK, 64, 0)
    assert (out.tokens == MASK).any()
    assert out.nfe == 1


@pytest.mark.parametrize("name", DENOISER_SAMPLERS)
def test_progress_bar(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = make(name, steps=3).sample(Oracle(), torch.full((2, L), MASK), progress=True)
    assert out.tokens.shape == (2, L)
    assert "sampling" in capsys.readouterr().err


# ---- 6. configuration and input errors --------------------------------------------------

def test_build_sampler() -> None:
    assert isinstance(make("ddpm", steps=3), DDPMSampler)
    sampler = make("ddpm_cache", steps=3, time_conditioning=True)
    assert isinstance(sampler, DDPMCacheSampler) and sampler.time_conditioning
    with pytest.raises(ValueError, match=r"sampler=nope does not exist; valid choices: \['analytic', 'ar', 'conf"):
        registry.load("sampler", "nope")
    with pytest.raises(TypeError):
        make("ddpm", steps=3, time_conditioning=True)  # only the cached sampler has it


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"steps": -3},
        {"steps": 2.5},
        {"steps": True},
        {"steps": 4, "eps": 0.0},
        {"steps": 4, "eps": 1.0},
        {"steps": 4, "eps": -0.1},
        {"steps": 4, "mask_index": -1},
    ],
)
@pytest.mark.parametrize("name", DENOISER_SAMPLERS)
def test_invalid_arguments(name: str, kwargs: dict[str, object]) -> None:
    kwargs = {"noise": LogLinear(), "mask_index": MASK} | kwargs
    with pytest.raises(ValueError, match=r"steps|eps|mask_index"):
        build_sampler(name, **kwargs)


@pytest.mark.parametrize("name", DENOISER_SAMPLERS)
def test_invalid_input(name: str) -> None:
    sampler = make(name, steps=2)
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(Oracle(), torch.full((L,), MASK))
    with pytest.raises(TypeError, match="long"):
        sampler.sample(Oracle(), torch.full((2, L), float(MASK)))

    def bad_denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], x.shape[1], MASK)  # V too small for the mask id

    with pytest.raises(ValueError, match="denoiser"):
        sampler.sample(bad_denoiser, torch.full((2, L), MASK))


# ---- 7. precision switch: float64 (default) or float32 draws -----------------------------

def toy_score(x: Tensor, sigma: Tensor) -> Tensor:
    """Exact log score of the toy problem for the analytic sampler (see test_analytic_sampler.py)."""
    log_score = LOG_TABLE[state_index(x)].double() - torch.log(torch.expm1(sigma.double()))[:, None, None]
    return log_score.scatter(-1, x[..., None], 0.0).float()  # (B, L, V + 1), ratio 1 at x_t


BIGRAM = torch.randn(V + 1, V + 1, generator=torch.Generator().manual_seed(0))  # next-token logits


def bigram_model(x: Tensor, _: object) -> Tensor:
    """A toy AR model, (B, i) -> (B, i, V + 1) logits; no KV cache."""
    return BIGRAM[x]


# Draws of the float64 code before the precision switch existed (same seeds): must not change.
GOLDEN_FLOAT64 = {
    "ddpm": [[1, 1, 0], [0, 1, 0], [2, 2, 0], [2, 2, 0], [1, 1, 0], [2, 0, 1]],
    "ddpm_cache": [[1, 1, 0], [0, 1, 0], [2, 2, 0], [2, 2, 0], [1, 1, 0], [2, 0, 1]],
    "analytic": [[1, 0, 1], [1, 1, 1], [2, 1, 0], [2, 1, 1], [2, 1, 2], [2, 2, 0]],
    "ar": [[0, 2, 0, 2, 0, 1], [0, 2, 0, 2, 1, 0], [0, 2, 2, 2, 2, 0], [0, 1, 2, 0, 1, 0]],
}


def golden_run(name: str, **kwargs: object) -> Tensor:
    """The draws GOLDEN_FLOAT64[name] records, with extra sampler arguments ``kwargs``."""
    if name == "ar":
        x = torch.full((4, 6), MASK)
        x[:, 0] = 0
        # recorded with the Hugging Face nucleus, the AR sampler's rule before top_p_rule existed
        sampler = ARSampler(MASK, temperature=0.9, top_p=0.95, kv_cache=False, top_p_rule="hf", **kwargs)
        return sampler.sample(bigram_model, x, generator=torch.Generator().manual_seed(4)).tokens
    denoiser = toy_score if name == "analytic" else Oracle()
    sampler = make(name, steps=4, eps=0.05, **kwargs)
    return sampler.sample(denoiser, torch.full((6, L), MASK), generator=torch.Generator().manual_seed(3)).tokens


@pytest.mark.parametrize("name", GOLDEN_FLOAT64)
def test_float64_default_draws_are_unchanged(name: str) -> None:
    expected = torch.tensor(GOLDEN_FLOAT64[name])
    assert torch.equal(golden_run(name), expected)
    assert torch.equal(golden_run(name, dtype=torch.float64), expected)
    assert torch.equal(golden_run(name, dtype="float64"), expected)
    assert golden_run(name, dtype=torch.float32).shape == expected.shape


def test_sample_categorical_float32_is_the_float32_race() -> None:
    """float32: argmax(p / E) with E = -log U, U a float32 uniform from the generator."""
    probs = torch.rand(1000, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    uniform = torch.rand(1000, 7, generator=torch.Generator().manual_seed(2))  # float32
    expected = (probs.float() / -uniform.log()).argmax(-1)
    draw32 = sample_categorical(probs, torch.Generator().manual_seed(2), dtype=torch.float32)
    assert torch.equal(draw32, expected)
    draw64 = sample_categorical(probs, torch.Generator().manual_seed(2))
    assert not torch.equal(draw32, draw64)  # a different noise source


def test_float32_truncates_the_tail() -> None:
    """A category of relative mass 1e-9 can never win in float32.

    float32 noise is E = -log U >= -log(1 - 2^-24) = 6e-8 and E <= -log(2^-24) = 16.6 unless
    U = 0 (then 87): the rare category needs E_rare < 1e-9 E_common <= 8.7e-8, i.e. U_rare
    in its top 2 float32 values *and* U_common = 0, probability ~1e-14 per row. In float64 its
    share is 1e-9, fine for a language model's 50k-token tail; frequencies that small cannot
    be measured in a unit test, so this pins the float32 side only.
    """
    probs = torch.tensor([1.0, 1e-9]).expand(1_000_000, 2)
    draws = sample_categorical(probs, torch.Generator().manual_seed(0), dtype=torch.float32)
    assert draws.sum() == 0
    # A category 1e-3 as likely is drawn at its rate by both: the switch changes the tail only.
    probs = torch.tensor([1.0, 1e-3]).expand(200_000, 2)
    for dtype in (torch.float32, torch.float64):
        draws = sample_categorical(probs, torch.Generator().manual_seed(1), dtype=dtype)
        assert stats.binomtest(int(draws.sum()), len(draws), 1e-3 / 1.001).pvalue > P_MIN


@pytest.mark.parametrize("name", ["ddpm", "ddpm_cache", "analytic", "ar"])
def test_float32_samplers_draw_in_float32(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every draw of a float32 sampler is made in float32: the unmasking uniforms and the categorical."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []  # (probs dtype, dtype argument) per draw
    rand_dtypes: list[torch.dtype] = []
    real_categorical, real_rand = samplers.sample_categorical, torch.rand

    def spy_categorical(probs: Tensor, generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float64) -> Tensor:
        seen.append((probs.dtype, dtype))
        return real_categorical(probs, generator, dtype)

    def spy_rand(*args: object, **kwargs: object) -> Tensor:
        out = real_rand(*args, **kwargs)
        rand_dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(samplers, "sample_categorical", spy_categorical)
    monkeypatch.setattr(torch, "rand", spy_rand)
    tokens = golden_run(name, dtype=torch.float32)
    assert not (tokens == MASK).any()
    assert seen and all(pair == (torch.float32, torch.float32) for pair in seen)
    assert rand_dtypes and all(dtype == torch.float32 for dtype in rand_dtypes)


def test_float32_sampler_reaches_the_exact_law() -> None:
    """float32 changes rounding, not the law, on a problem without a tiny-probability tail."""
    noise, steps, eps = LogLinear(), 2, 1e-5
    sampler = make("ddpm", noise, steps=steps, eps=eps, dtype=torch.float32)
    out = run(sampler, ALL_MASK, batch=40_000, seed=21)
    assert_matches(out.tokens, exact_law(noise, steps, eps, ALL_MASK, noise_removal=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, "double", None])
def test_bad_dtype_is_rejected(dtype: object) -> None:
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        sample_categorical(torch.ones(2, 3), dtype=dtype)
    for name in SAMPLERS:
        with pytest.raises(ValueError, match="float32 or torch.float64"):
            make(name, steps=2, dtype=dtype)
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        ARSampler(MASK, dtype=dtype)
    assert make("ddpm", steps=2, dtype="float32").dtype is torch.float32
    assert "dtype=torch.float32" in repr(make("ddpm", steps=2, dtype=torch.float32))


def test_token_probs_apply_temperature_then_the_nucleus() -> None:
    """p = (0.6, 0.3, 0.1) at temperature 0.5 is p^2 renormalised: (0.783, 0.196, 0.022). With top_p = 0.9,
    ReMDM's rule keeps the first token only (0.783 <= 0.9 < 0.978), Hugging Face's the first two."""
    log_p = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0]]))
    cold = make("ddpm", steps=2, temperature=0.5)._token_probs(log_p.clone())
    expected = torch.tensor([0.36, 0.09, 0.01], dtype=torch.float64) / 0.46
    torch.testing.assert_close(cold[0, :V] / cold[0, :V].sum(), expected)
    assert cold[0, MASK] == 0
    for rule, kept in (("remdm", 1), ("hf", 2)):
        probs = make("ddpm", steps=2, temperature=0.5, top_p=0.9, top_p_rule=rule)._token_probs(log_p.clone())
        assert torch.all(probs[0, :kept] > 0) and torch.all(probs[0, kept:] == 0), rule
    alone = make("ddpm", steps=2, top_p=0.5)._token_probs(log_p.clone())  # 0.6 > 0.5: the top token is kept
    assert alone[0, 0] > 0 and torch.all(alone[0, 1:] == 0)
    with pytest.raises(ValueError, match=r"valid choices: \['remdm', 'hf'\]"):
        make("ddpm", steps=2, top_p_rule="nope")


def test_noise_removal_sample_draws_where_argmax_takes_the_top() -> None:
    """noise_removal=sample fills the masks left after the last step with draws, argmax (= true) with the
    most likely token; false / "none" leaves them."""
    x = torch.full((2000, L), MASK)
    outs = {}
    for mode in ("argmax", "sample", "none"):
        sampler = make("ddpm", steps=1, eps=0.9, noise_removal=mode)  # one step to t = 0.9: most stay masked
        outs[mode] = sampler.sample(Oracle(), x, generator=torch.Generator().manual_seed(0)).tokens
    assert (outs["none"] == MASK).any() and not (outs["argmax"] == MASK).any() and not (outs["sample"] == MASK).any()
    left = outs["none"] == MASK  # the same draws up to the removal step
    greedy = LOG_TABLE[state_index(outs["none"])][..., :V].argmax(-1)  # (B, L) the oracle's top token there
    assert torch.equal(outs["argmax"][left], greedy[left])
    assert (outs["sample"][left] != greedy[left]).double().mean() > 0.1
    assert make("ddpm", steps=1, noise_removal=True).noise_removal == "argmax"
    with pytest.raises(ValueError, match=r"noise_removal='nope'; valid choices: \['argmax', 'sample', 'none'\]"):
        make("ddpm", steps=1, noise_removal="nope")
