import inspect
import math

import numpy as np
import pytest
import torch
from scipy import stats
from test_d3pm import TOY_MASK, expected_loss
from torch import nn

import registry
from algorithms import (
    AR,
    D3PM,
    MDLM,
    NEG_INF,
    SEDD,
    q_xt,
    sample_times,
    subs_log_probs,
    subs_nelbo,
)
from block_diffusion import BD3LM
from config_aliases import ALGORITHM_OF_PARAMETERIZATION
from noise_schedule import Cosine, LogLinear

MASK = 5
VOCAB = 6  # 5 real tokens + mask


def slow_subs_nelbo(logits, x0, xt, t, eps):
    """Per-token NELBO straight from the formula, one token at a time in Python floats."""
    B, L, V = logits.shape
    out = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        tb = float(t[b])
        sigma = -math.log(1 - (1 - eps) * tb)
        dsigma = (1 - eps) / (1 - (1 - eps) * tb)
        for i in range(L):
            if int(xt[b, i]) != MASK:
                continue  # carry-over: log p(x0 | xt) = 0 on unmasked tokens
            row = [float(v) for v in logits[b, i]]
            row[MASK] = NEG_INF  # zero masking probability
            log_z = math.log(sum(math.exp(v - max(row)) for v in row)) + max(row)
            log_p = row[int(x0[b, i])] - log_z
            out[b, i] = -log_p * dsigma / math.expm1(sigma)
    return out


def test_subs_nelbo_matches_slow_reference() -> None:
    g = torch.Generator().manual_seed(0)
    B, L = 4, 7
    logits = torch.randn(B, L, VOCAB, generator=g) * 3
    x0 = torch.randint(0, MASK, (B, L), generator=g)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0])
    noise = LogLinear(eps=1e-3)
    xt = q_xt(x0, noise(t).move_chance[:, None], MASK, generator=g)
    assert (xt == MASK).any() and (xt != MASK).any()
    fast = subs_nelbo(logits, x0, xt, MASK, noise(t).nelbo_weight)
    torch.testing.assert_close(fast.double(), slow_subs_nelbo(logits, x0, xt, t, 1e-3), rtol=1e-5, atol=1e-5)


def test_subs_log_probs_parameterization() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, VOCAB, generator=g)
    xt = torch.tensor([[0, MASK, 2, MASK, 4], [MASK, MASK, MASK, 1, 3]])
    log_p = subs_log_probs(logits, xt, MASK)
    probs = log_p.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 5))
    assert torch.all(probs[..., MASK] == 0)  # zero masking
    unmasked = xt != MASK
    one_hot = torch.nn.functional.one_hot(xt[unmasked], VOCAB).float()
    torch.testing.assert_close(probs[unmasked], one_hot)  # carry-over
    # Masked rows: softmax of the logits without the mask column.
    expected = torch.softmax(logits[..., :MASK], -1)
    torch.testing.assert_close(probs[~unmasked][:, :MASK], expected[~unmasked])


def test_subs_nelbo_consistent_with_log_probs() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, VOCAB, generator=g)
    x0 = torch.randint(0, MASK, (3, 6), generator=g)
    xt = q_xt(x0, torch.full((3, 1), 0.5), MASK, generator=g)
    weight = torch.tensor([1.0, 2.0, 3.0])
    log_p = subs_log_probs(logits, xt, MASK).gather(-1, x0[..., None]).squeeze(-1)
    torch.testing.assert_close(subs_nelbo(logits, x0, xt, MASK, weight), -log_p * weight[:, None])


def test_antithetic_times_one_per_stratum() -> None:
    n, eps = 64, 1e-3
    t = sample_times(n, eps, antithetic=True, generator=torch.Generator().manual_seed(0))
    u = (t - eps) / (1 - eps)
    strata = torch.sort((u * n).floor().long()).values
    assert torch.equal(strata, torch.arange(n))
    assert t.min() >= eps and t.max() <= 1
    plain = sample_times(n, eps, antithetic=False, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(torch.sort((((plain - eps) / (1 - eps)) * n).floor().long()).values, torch.arange(n))


def test_q_xt_masks_at_the_right_rate() -> None:
    x0 = torch.zeros(200, 500, dtype=torch.long)
    rates = torch.linspace(0, 1, 200)[:, None]
    xt = q_xt(x0, rates, MASK, generator=torch.Generator().manual_seed(0))
    observed = (xt == MASK).float().mean(1)
    assert torch.all((observed - rates[:, 0]).abs() < 0.08)
    assert torch.all(xt[0] == 0) and torch.all(xt[-1] == MASK)


class ConstantBackbone(torch.nn.Module):
    """Returns fixed logits and records the sigma it was given."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.seen_sigma = None

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.seen_sigma = sigma
        return self.logits.expand(x.shape[0], x.shape[1], -1)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_time_conditioning_flag(time_conditioning: bool) -> None:
    backbone = ConstantBackbone(torch.zeros(1, 1, VOCAB))
    algo = MDLM(LogLinear(), MASK, time_conditioning=time_conditioning)
    algo.loss(backbone, torch.zeros(8, 4, dtype=torch.long), torch.ones(8, 4))
    assert torch.all(backbone.seen_sigma > 0) == time_conditioning
    assert torch.all(backbone.seen_sigma == 0) != time_conditioning


def test_uniform_denoiser_bound_is_log_vocab() -> None:
    # A denoiser that predicts uniformly over the 5 real tokens pays log 5 per token in
    # expectation: E_t[ (1/t) * P(masked at t) * log 5 ] = log 5 for the loglinear schedule.
    torch.manual_seed(0)
    algo = MDLM(LogLinear(eps=1e-3), MASK, sampling_eps=1e-3)
    x0 = torch.randint(0, MASK, (4096, 32))
    nll = algo.loss(ConstantBackbone(torch.zeros(1, 1, VOCAB)), x0, torch.ones_like(x0)).nll
    assert abs(float(nll.mean()) - math.log(5)) < 0.02


def test_unknown_algorithm_lists_choices() -> None:
    valid = r"\['ar', 'bd3lm', 'd3pm', 'duo', 'duo_distill', 'mdlm', 'sedd', 'udlm'\]"
    with pytest.raises(ValueError, match=f"valid choices: {valid}"):
        registry.load("algorithm", "nope")


# ---- the registry and the options each algorithm accepts ---------------------------------

CLASSES = {"mdlm": MDLM, "d3pm": D3PM, "sedd": SEDD, "ar": AR, "bd3lm": BD3LM}
BASE = {"mdlm": {}, "d3pm": {"T": 1000}, "sedd": {}, "ar": {}, "bd3lm": {"block_size": 4}}  # a valid configuration
# Each option alone on top of BASE: an argument of the class (True) or not (False: a TypeError in
# Python; from the command line, main.check_options_read names it).
SUPPORTED = {
    "mdlm": {"T": True, "subs_masking": False, "importance_sampling": True, "change_of_variables": True,
             "time_conditioning": True},
    "d3pm": {"T": True, "subs_masking": True, "importance_sampling": False, "change_of_variables": False,
             "time_conditioning": True},
    "sedd": {"T": False, "subs_masking": False, "importance_sampling": False, "change_of_variables": False,
             "time_conditioning": True},
    "ar": {"T": False, "subs_masking": False, "importance_sampling": False, "change_of_variables": False,
           "time_conditioning": False},
    # bd3lm takes time_conditioning (the original's name) only to refuse true: see test_invalid_combinations
    "bd3lm": {"T": False, "subs_masking": False, "importance_sampling": False, "change_of_variables": False},
}
ON = {"T": 100, "subs_masking": True, "importance_sampling": True, "change_of_variables": True,
      "time_conditioning": True}


def build(name: str, **kwargs: object) -> object:
    cls = CLASSES[name]
    if cls.causal:
        return cls(mask_index=MASK, **kwargs)
    return cls(noise=LogLinear(), mask_index=MASK, **kwargs)


@pytest.mark.parametrize("name", CLASSES)
def test_every_algorithm_has_its_config_and_a_fitting_default_sampler(name: str) -> None:
    algo = build(name, **BASE[name])
    assert registry.target_class("algorithm", name) is CLASSES[name] and algo.name == name
    # parameterization= of the original names one algorithm; block diffusion reuses MDLM's (subs)
    assert ALGORITHM_OF_PARAMETERIZATION[algo.parameterization] == ("mdlm" if name == "bd3lm" else name)
    assert algo.default_sampler in registry.samplers_accepting(algo.denoiser_kind)
    assert set(algo.model_options) <= set(inspect.signature(CLASSES[name]).parameters)


@pytest.mark.parametrize("option", ON)
@pytest.mark.parametrize("name", CLASSES)
def test_each_option_is_an_argument_or_not(name: str, option: str) -> None:
    kwargs = {**BASE[name], option: ON[option]}
    if option not in SUPPORTED[name]:
        pytest.skip(f"{name} refuses {option}={ON[option]} with a ValueError (test_invalid_combinations)")
    if option == "change_of_variables":
        kwargs["time_conditioning"] = True
    if SUPPORTED[name][option]:
        assert getattr(build(name, **kwargs), option) == ON[option]
    else:
        with pytest.raises(TypeError, match=option):
            build(name, **kwargs)


@pytest.mark.parametrize(
    "name,kwargs,option",
    [
        ("mdlm", {"T": 10, "importance_sampling": True}, "importance_sampling"),
        ("mdlm", {"T": 10, "change_of_variables": True, "time_conditioning": True}, "change_of_variables"),
        ("mdlm", {"importance_sampling": True, "change_of_variables": True, "time_conditioning": True},
         "change_of_variables"),
        ("mdlm", {"importance_sampling": True, "sampling_eps": 0.0}, "importance_sampling"),
        ("mdlm", {"change_of_variables": True}, "change_of_variables"),
        ("d3pm", {"T": 0}, "T"),
        ("bd3lm", {"block_size": 4, "time_conditioning": True}, "time_conditioning"),
    ],
)
def test_invalid_combinations(name: str, kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(ValueError, match=rf"{option}=.*algorithm='{name}'.*: \w"):
        build(name, **kwargs)


@pytest.mark.parametrize("T", [-1, 2.5, True])
def test_invalid_T(T: object) -> None:
    with pytest.raises(ValueError, match="T must be an integer"):
        MDLM(LogLinear(), MASK, T=T)


def test_clear_messages() -> None:
    with pytest.raises(ValueError, match="set T=1000"):
        D3PM(LogLinear(), MASK)
    with pytest.raises(ValueError, match="set time_conditioning=true"):
        MDLM(LogLinear(), MASK, change_of_variables=True)
    backbone = nn.Identity()
    assert AR(MASK).denoiser(backbone) is backbone  # the AR sampler drives the causal backbone itself


# ---- AR ------------------------------------------------------------------------------------

class RecordingBackbone(nn.Module):
    """Returns fixed logits for the first x.shape[1] positions and records its inputs."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.inputs: list[tuple[torch.Tensor, object]] = []
        self.attention_masks: list[torch.Tensor | None] = []

    def forward(self, x: torch.Tensor, sigma: object, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.inputs.append((x.clone(), sigma))
        self.attention_masks.append(attention_mask)
        return self.logits[:, : x.shape[1]]


def test_ar_loss_matches_slow_reference() -> None:
    g = torch.Generator().manual_seed(0)
    B, L = 3, 7
    x0 = torch.randint(0, MASK, (B, L), generator=g)
    attention = torch.ones(B, L)
    attention[1, -2:] = 0
    logits = torch.randn(B, L - 1, VOCAB, generator=g) * 2
    backbone = RecordingBackbone(logits)
    out = AR(MASK).loss(backbone, x0, attention)
    (seen, sigma), = backbone.inputs
    assert torch.equal(seen, x0[:, :-1]) and sigma is None
    (seen_mask,) = backbone.attention_masks
    assert torch.equal(seen_mask, attention[:, :-1])  # the backbone's inputs are x0[:, :-1]
    assert torch.equal(out.mask, attention[:, 1:])
    slow = torch.zeros(B, L - 1, dtype=torch.float64)
    for b in range(B):
        for i in range(L - 1):
            row = [float(v) for v in logits[b, i]]
            row[MASK] = NEG_INF  # the mask token is never predicted
            log_z = math.log(sum(math.exp(v - max(row)) for v in row)) + max(row)
            slow[b, i] = (log_z - row[int(x0[b, i + 1])]) * float(attention[b, i + 1])
    torch.testing.assert_close(out.nll.double(), slow, rtol=1e-5, atol=1e-5)
    assert out.nll[1, -2:].eq(0).all()


# ---- importance sampling and the change of variables -------------------------------------

def test_importance_sampling_draws_log_uniform_masking_probabilities() -> None:
    eps = 1e-3
    algo = MDLM(Cosine(), MASK, sampling_eps=eps, importance_sampling=True, antithetic_sampling=False)
    torch.manual_seed(0)
    t = algo.sample_t(20_000).double()
    f0, f1 = (math.log(float(Cosine().move_chance(torch.tensor(x, dtype=torch.float64)))) for x in (eps, 1.0))
    u = (Cosine().move_chance(t).log() - f0) / (f1 - f0)
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    assert t.min() >= eps and t.max() <= 1
    # Antithetic: one draw per stratum of u.
    anti = MDLM(Cosine(), MASK, importance_sampling=True).sample_t(64).double()
    u = (Cosine().move_chance(anti).log() - f0) / (f1 - f0)
    assert torch.equal(torch.sort((u * 64).floor().long().clamp(0, 63)).values, torch.arange(64))


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_importance_sampling_is_an_exact_estimator(schedule: str) -> None:
    """E[IS loss] equals the continuous integral over [sampling_eps, 1], to quadrature accuracy.

    Both are computed exactly on the toy problem (exact denoiser, every x0 and mask pattern).
    The original's weight -f0 (f1 taken as 0) is off by the factor -f0 / (f1 - f0).
    """
    noise = LogLinear() if schedule == "loglinear" else Cosine()
    eps = 1e-3
    algo = MDLM(noise, TOY_MASK, sampling_eps=eps, importance_sampling=True)
    f0, f1 = (float(f) for f in algo.log_move_chance_range())
    x, w = np.polynomial.legendre.leggauss(40)
    u = torch.tensor((x + 1) / 2)
    t = noise.inverse_move_chance(torch.exp(f0 + u * (f1 - f0)))
    estimator = float((torch.tensor(w) / 2 * expected_loss(algo, t)).sum())
    # The integral over [eps, 1] of the continuous loss, exact by Gauss-Legendre in m.
    m0, m1 = math.exp(f0), math.exp(f1)
    x, w = np.polynomial.legendre.leggauss(8)
    t = noise.inverse_move_chance(torch.tensor(m0 + (m1 - m0) * (x + 1) / 2))
    level = noise(t)
    integral = float((torch.tensor(w) * expected_loss(MDLM(noise, TOY_MASK), t) / (level.dsigma * level.alpha)).sum()
                     * (m1 - m0) / 2)
    assert abs(estimator / integral - 1) < 1e-6
    assert abs(-f0 / (f1 - f0) - 1) > 1e-5  # the original's approximation would fail the check above


def test_change_of_variables_conditions_on_u() -> None:
    noise, eps = Cosine(), 1e-3
    algo = MDLM(noise, MASK, sampling_eps=eps, change_of_variables=True, time_conditioning=True)
    backbone = ConstantBackbone(torch.zeros(1, 1, VOCAB))
    torch.manual_seed(0)
    x0 = torch.zeros(64, 4, dtype=torch.long)
    out = algo.loss(backbone, x0, torch.ones_like(x0))
    u = backbone.seen_sigma
    assert u.min() >= 0 and u.max() <= 1 and u.max() - u.min() > 0.9  # one per stratum of [0, 1)
    assert torch.equal(torch.sort((u * 64).floor().long().clamp(0, 63)).values, torch.arange(64))
    f0, f1 = (float(f) for f in algo.log_move_chance_range())
    masked_loss = out.nll[out.nll > 0]
    torch.testing.assert_close(masked_loss, torch.full_like(masked_loss, (f1 - f0) * math.log(5)))
    # The denoiser maps the sampler's sigma to the same u.
    t = torch.tensor([0.01, 0.5, 1.0])
    algo.denoiser(backbone)(torch.zeros(3, 4, dtype=torch.long), noise.total_noise(t))
    expected = (noise.move_chance(t.double()).log() - f0) / (f1 - f0)
    torch.testing.assert_close(backbone.seen_sigma.double(), expected, rtol=1e-5, atol=1e-5)
